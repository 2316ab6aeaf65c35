"""Merging options of the HC-SMoE document (issue 4): weighted, aligned-freq (M-SMoE), zipit, fix-dom-same, with the
plan-aware calibration pass; identities on hand-made cases and end to end on both families."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import moemerge
from moemerge.loading import LoadedModel, fingerprint
from moemerge.merge import MERGE, GroupInputs, weighted_average
from moemerge.merge.align import align_group, match_permutation, permute_expert, weight_similarity
from moemerge.merge.zipit import merge_by_assignment, zip_features

from conftest import make_model

I, H = 6, 5


def _expert(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * I, H, generator=g), torch.randn(H, I, generator=g)


def _group(*experts, freq=None, dominant=0, mode="normal") -> GroupInputs:
    gu = torch.stack([e[0] for e in experts])
    dn = torch.stack([e[1] for e in experts])
    f = torch.tensor(freq if freq is not None else [0.5] * len(experts))
    return GroupInputs(gu, dn, f, dominant, list(range(len(experts))), mode)


def _run_expert(gate_up, down, x):
    gate, up = (x @ gate_up.T).chunk(2, -1)
    return (torch.nn.functional.silu(gate) * up) @ down.T


# ---- weighted ------------------------------------------------------------------------------------------------------

def test_weighted_one_one_is_the_plain_average():
    g = _group(_expert(0), _expert(1), _expert(2), mode="1,1")
    gu, dn = MERGE.get("weighted").fn(g)
    assert torch.allclose(gu, g.gate_up.mean(0)) and torch.allclose(dn, g.down.mean(0))


def test_weighted_gives_x_to_the_dominant():
    g = _group(_expert(0), _expert(1), dominant=1, mode="3,1")
    gu, _ = MERGE.get("weighted").fn(g)
    assert torch.allclose(gu, 0.25 * g.gate_up[0] + 0.75 * g.gate_up[1], atol=1e-6)


# ---- permutation alignment ---------------------------------------------------------------------------------------

def test_alignment_recovers_a_known_permutation_exactly():
    gu, dn = _expert(3)
    perm = np.array([4, 0, 5, 2, 1, 3])
    pgu, pdn = permute_expert(gu, dn, perm)
    x = torch.randn(7, H)
    assert torch.allclose(_run_expert(gu, dn, x), _run_expert(pgu, pdn, x), atol=1e-5)  # same function
    found = match_permutation(weight_similarity(gu, dn, pgu, pdn))
    back_gu, back_dn = permute_expert(pgu, pdn, found)
    assert torch.equal(back_gu, gu) and torch.equal(back_dn, dn)


def test_aligned_freq_of_a_permuted_copy_is_the_expert():
    gu, dn = _expert(4)
    pgu, pdn = permute_expert(gu, dn, np.array([5, 4, 3, 2, 1, 0]))
    mgu, mdn = MERGE.get("aligned-freq").fn(_group((gu, dn), (pgu, pdn), freq=[0.3, 0.1]))
    assert torch.allclose(mgu, gu) and torch.allclose(mdn, dn)
    a_gu, _ = align_group(torch.stack([pgu, gu]), torch.stack([pdn, dn]), dominant=0)
    assert torch.equal(a_gu[0], pgu)  # the dominant itself is never moved


# ---- fix-dom-same and zipit ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fix-dom-same", "zipit"])
def test_group_of_one_is_returned_unchanged(method):
    e = _expert(5)
    gu, dn = MERGE.get(method).fn(_group(e))
    assert torch.equal(gu, e[0]) and torch.equal(dn, e[1])


@pytest.mark.parametrize("method", ["fix-dom-same", "zipit"])
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("mode", ["normal", "input-weight"])
def test_group_of_identical_experts_returns_that_expert(method, n, mode):
    e = _expert(6)
    gu, dn = MERGE.get(method).fn(_group(*[e] * n, freq=[0.4, 0.0, 0.2][:n], mode=mode))
    x = torch.randn(9, H)
    assert torch.allclose(_run_expert(gu, dn, x), _run_expert(*e, x), atol=1e-5)


def test_fix_dom_same_keeps_the_dominant_neuron_order():
    gu, dn = _expert(7)
    pgu, pdn = permute_expert(gu, dn, np.array([1, 2, 3, 4, 5, 0]))
    mgu, mdn = MERGE.get("fix-dom-same").fn(_group((pgu, pdn), (gu, dn), dominant=0))
    assert torch.allclose(mgu, pgu, atol=1e-6) and torch.allclose(mdn, pdn, atol=1e-6)


def test_zip_features_pairs_perfectly_correlated_features():
    # Features 0..2 of expert A equal features (2, 0, 1) of expert B; correlations of unrelated features are lower.
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3))
    feats = np.concatenate([a, a[:, [2, 0, 1]]], 1)
    assign = zip_features(torch.as_tensor(np.corrcoef(feats.T)), 3)
    assert assign[0] == assign[4] and assign[1] == assign[5] and assign[2] == assign[3]


def test_merge_by_assignment_coefficients_sum_to_one():
    """The reference's input-weight coefficients were overwritten in a loop; here α is used as given."""
    e1, e2 = _expert(8), _expert(9)
    gu = torch.stack([e1[0], e2[0]])
    dn = torch.stack([e1[1], e2[1]])
    assign = np.concatenate([np.arange(I), np.arange(I)])  # neuron j with neuron j: plain weight average
    mgu, mdn = merge_by_assignment(gu, dn, assign, torch.tensor([0.25, 0.75]))
    ref = weighted_average(GroupInputs(gu, dn, torch.ones(2)), torch.tensor([0.25, 0.75]))
    assert torch.allclose(mgu, ref[0], atol=1e-6) and torch.allclose(mdn, ref[1], atol=1e-6)


# ---- plan-aware pass -------------------------------------------------------------------------------------------

def test_partition_does_not_change_the_result(tokenizer, text_file):
    """Defect 8: later partitions must not see an already-merged model; partition only bounds memory."""
    out = {}
    for partition in (1, 3, 50):
        model = make_model("mixtral", vocab_size=len(tokenizer))
        loaded = LoadedModel(model, tokenizer, "in-memory", None, fingerprint(model, None, "in-memory"))
        recipe = moemerge.Recipe.build(merge="zipit", mode="all", ingredient="act+weight", partition=partition,
                                       calibration=str(text_file), seq_len=32, n_sentences=4, cache=False,
                                       num_average_groups=4)
        moemerge.merge_model(loaded, recipe, progress=False)
        out[partition] = [p.detach().clone() for p in model.parameters()]
    for other in (3, 50):
        assert all(torch.equal(a, b) for a, b in zip(out[1], out[other]))


def _recipe(model_dir, text_file, out, **kw) -> moemerge.Recipe:
    base = dict(model_path=str(model_dir), output_path=str(out), calibration=str(text_file), seq_len=32,
                n_sentences=4, ppl=[str(text_file)], ppl_windows=2, dtype="float32", report=False, fidelity=False)
    return moemerge.Recipe.build(base, **kw)


@pytest.mark.parametrize("family, options", [
    ("mixtral", dict(merge="zipit", mode="all", ingredient="act+weight", partition=2, data_limit=40)),
    ("qwen2_moe", dict(merge="fix-dom-same", dominant="frequency", mode="input-weight")),
    ("qwen2_moe", dict(merge="weighted", mode="2,1", cluster="kmeans")),
    ("mixtral", dict(merge="aligned-freq", dominant="frequency", similarity_base="router-logits")),
])
def test_end_to_end_merge_save_reload(family, options, model_dirs, text_file, tmp_path):
    out = tmp_path / "out"
    result = moemerge.run(_recipe(model_dirs[family], text_file, out, num_average_groups=4, **options),
                          progress=False)
    assert sum(result.plan.counts().values()) == 8
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(np.isfinite(v) for v in result.ppl_after.values())
    info = json.loads((out / "merge_info.json").read_text())
    assert info["moemerge_recipe"]["merge"] == options["merge"]
    assert reloaded is not None


def test_merge_no_changes_nothing(model_dirs, text_file, tokenizer):
    """Defect 4: merge=no on Qwen ran ZipIt in the reference."""
    loaded = moemerge.loading.load_model(str(model_dirs["qwen2_moe"]), "float32", "cpu")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    recipe = moemerge.Recipe.build(calibration=str(text_file), seq_len=32, n_sentences=4, num_average_groups=4,
                                   merge="no")
    moemerge.merge_model(loaded, recipe, progress=False)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
