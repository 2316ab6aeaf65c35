"""The foundation's identities and contracts (issue 3): calibrate → group → merge → save → evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moemerge
from moemerge.calibrate import CalibrationSettings
from moemerge.data import TextSource, tokenize, windows
from moemerge.errors import MoemergeError
from moemerge.families import family_of, moe_layers
from moemerge.group.plan import LayerPlan, MergePlan
from moemerge.loading import LoadedModel, fingerprint
from moemerge.merge import GroupInputs, frequency_weights, merge_layer
from moemerge.merge.average import freq_merge
from moemerge.pipeline import calibrate
from moemerge.save import apply_plan

from conftest import FAMILIES, make_model


def _loaded(model, tokenizer) -> LoadedModel:
    return LoadedModel(model, tokenizer, "in-memory", None, fingerprint(model, None, "in-memory"))


def _recipe(model_dir, text_file, out, **kw) -> moemerge.Recipe:
    base = dict(model_path=str(model_dir), output_path=str(out), calibration=str(text_file), seq_len=32,
                n_sentences=6, ppl=[str(text_file)], ppl_windows=4, dtype="float32")
    return moemerge.Recipe.build(base, **kw)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def probe_ids(tokenizer):
    return tokenizer("def fibonacci(n): And God said", return_tensors="pt")["input_ids"]


# ---- identities -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("router", ["keep", "collapse"])
def test_as_many_groups_as_experts_reproduces_logits(family, router, model_dirs, text_file, tmp_path, probe_ids):
    reference = AutoModelForCausalLM.from_pretrained(model_dirs[family], dtype=torch.float32)
    num_experts = family_of(reference.config).num_experts(reference.config)
    result = moemerge.run(_recipe(model_dirs[family], text_file, tmp_path / "out", num_average_groups=num_experts,
                                  router=router), progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(result.saved.path, dtype=torch.float32)
    assert (_logits(reloaded, probe_ids) - _logits(reference, probe_ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_collapse_with_permuted_singletons_is_exact(family, tokenizer, probe_ids):
    """Going through the full merge + collapse path with groups of one in a shuffled order must change nothing:
    router rows and experts move together."""
    model = make_model(family, vocab_size=len(tokenizer))
    before = _logits(model, probe_ids)
    num_experts = model.config.num_local_experts if family == "mixtral" else model.config.num_experts
    order = torch.randperm(num_experts, generator=torch.Generator().manual_seed(1)).tolist()
    plan = MergePlan({l.index: LayerPlan(l.index, num_experts, [[e] for e in order], order)
                      for l in moe_layers(model)})

    class _Stats:  # frequencies are irrelevant for singletons
        def frequency(self, layer):
            return torch.ones(num_experts)

    merged = {l.index: merge_layer(l, plan.layers[l.index], "freq", _Stats()) for l in moe_layers(model)}
    apply_plan(model, plan, merged, {l.index: torch.ones(num_experts) for l in moe_layers(model)}, "collapse",
               "mean")
    assert (_logits(model, probe_ids) - before).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_merging_identical_experts_is_exact(family, tokenizer, probe_ids):
    """Two experts that are copies of each other merge into themselves; with router=keep their routing weights add
    up on the shared slot, so the block output is unchanged."""
    model = make_model(family, vocab_size=len(tokenizer))
    for layer in moe_layers(model):
        with torch.no_grad():
            layer.experts.gate_up_proj[1] = layer.experts.gate_up_proj[0]
            layer.experts.down_proj[1] = layer.experts.down_proj[0]
    before = _logits(model, probe_ids)
    num_experts = moe_layers(model)[0].num_experts
    groups = [[0, 1]] + [[e] for e in range(2, num_experts)]
    plan = MergePlan({l.index: LayerPlan(l.index, num_experts, groups, [g[0] for g in groups])
                      for l in moe_layers(model)})

    class _Stats:
        def frequency(self, layer):
            return torch.rand(num_experts)

    merged = {l.index: merge_layer(l, plan.layers[l.index], "freq", _Stats()) for l in moe_layers(model)}
    apply_plan(model, plan, merged, {l.index: torch.ones(num_experts) for l in moe_layers(model)}, "keep", "mean")
    assert (_logits(model, probe_ids) - before).abs().max() <= 1e-5


def test_freq_merge_is_the_frequency_weighted_average():
    gu, dn = torch.randn(3, 8, 4), torch.randn(3, 4, 4)
    f = torch.tensor([0.5, 0.25, 0.25])
    out_gu, out_dn = freq_merge(GroupInputs(gu, dn, f))
    torch.testing.assert_close(out_gu, 0.5 * gu[0] + 0.25 * gu[1] + 0.25 * gu[2])
    torch.testing.assert_close(out_dn, 0.5 * dn[0] + 0.25 * dn[1] + 0.25 * dn[2])


def test_never_routed_group_is_averaged_not_zeroed():
    """HC-SMoE defect 2: Σf·W / (Σf + 1e-7) zeroes groups whose members were never counted."""
    alpha = frequency_weights(torch.zeros(2))
    assert torch.allclose(alpha, torch.tensor([0.5, 0.5], dtype=alpha.dtype))


# ---- statistics -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_frequency_matches_hand_computation(family, tokenizer, text_file):
    model = make_model(family, vocab_size=len(tokenizer))
    loaded = _loaded(model, tokenizer)
    settings = CalibrationSettings(str(text_file), n_sentences=4, seq_len=24, train_batch_size=2, use_cache=False)
    stats = calibrate(loaded, settings, ["frequency"], progress=False)
    from moemerge.calibrate import calibration_windows

    wins, _ = calibration_windows(loaded.tokenizer, settings)
    spec = family_of(model.config)
    top_k = spec.top_k(model.config)
    with torch.no_grad():
        out = model(input_ids=wins, output_router_logits=True)
    for layer, logits in zip(moe_layers(model), out.router_logits):
        chosen = torch.topk(torch.softmax(logits.float(), -1), top_k, dim=-1).indices
        counts = torch.bincount(chosen.reshape(-1), minlength=layer.num_experts).double()
        torch.testing.assert_close(stats.frequency(layer.index).double(), counts / logits.shape[0])
        assert stats.frequency(layer.index).sum().item() == pytest.approx(top_k)


def test_windows_never_pad_or_repeat(tokenizer):
    ids = torch.arange(100)
    w = windows(ids, 30)
    assert w.shape == (3, 30) and torch.equal(w.reshape(-1), ids[:90])
    picked = windows(ids, 10, count=4, seed=0)
    assert picked.shape == (4, 10) and len({tuple(r.tolist()) for r in picked}) == 4
    with pytest.raises(MoemergeError, match="fewer than one window"):
        windows(torch.arange(5), 10)
    assert tokenize(tokenizer, TextSource(["a b", "c"], "t")).dim() == 1


def test_second_merge_reuses_the_cache(model_dirs, text_file, tmp_path):
    # A seed no other test uses: other tests may have cached this model's statistics already.
    first = moemerge.run(_recipe(model_dirs["mixtral"], text_file, tmp_path / "a", num_average_groups=4,
                                 ppl=["none"], seed=1234), progress=False)
    assert first.stats.meta["model_runs"] == 1
    second = moemerge.run(_recipe(model_dirs["mixtral"], text_file, tmp_path / "b", num_average_groups=6,
                                  ppl=["none"], seed=1234), progress=False)
    assert second.stats.meta["model_runs"] == 0
    assert second.plan.counts() == {0: 6, 1: 6}


# ---- grouping ---------------------------------------------------------------------------------------------------

def test_hierarchical_groups_identical_experts_together():
    from moemerge.group.cluster import hierarchical

    feats = torch.randn(6, 5).numpy()
    feats[4] = feats[1]
    for method in ("single", "complete", "average", "ward"):
        labels = hierarchical(feats, 5, linkage_method=method)
        assert labels[1] == labels[4] and len(set(labels.tolist())) == 5


def test_complete_linkage_merges_the_closest_pair():
    """HC-SMoE defect 10: its `complete` linkage merged the farthest pair ({0,1,11},{10})."""
    from moemerge.group.cluster import hierarchical

    labels = hierarchical(torch.tensor([[0.0], [1.0], [10.0], [11.0]]).numpy(), 2, linkage_method="complete")
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[0] != labels[2]


# ---- saving -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_collapsed_checkpoint_is_smaller_stock_and_honest(family, model_dirs, text_file, tmp_path, probe_ids):
    out = tmp_path / "out"
    result = moemerge.run(_recipe(model_dirs[family], text_file, out, num_average_groups=4, router="collapse"),
                          progress=False)
    original = json.loads((model_dirs[family] / "config.json").read_text())
    saved = json.loads((out / "config.json").read_text())
    count_key = "num_local_experts" if family == "mixtral" else "num_experts"
    assert saved[count_key] == 4
    assert {k for k in original if original[k] != saved.get(k)} == {count_key}
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    expert_ids = {int(k.split(".experts.")[1].split(".")[0]) for k in keys if ".experts." in k}
    assert expert_ids == {0, 1, 2, 3}  # per-expert hub names, contiguous ids
    if family == "qwen2_moe":  # shared expert and its gate untouched
        ref = AutoModelForCausalLM.from_pretrained(model_dirs[family], dtype=torch.float32)
        for name in ("shared_expert.gate_proj.weight", "shared_expert_gate.weight"):
            a = dict(ref.named_parameters())[f"model.layers.0.mlp.{name}"]
            b = dict(model.named_parameters())[f"model.layers.0.mlp.{name}"]
            assert torch.equal(a, b)
    assert result.parameters_after < result.parameters_before
    assert result.saved.file_bytes < sum(f.stat().st_size for f in model_dirs[family].glob("*.safetensors"))
    info_json = json.loads((out / "merge_info.json").read_text())
    assert info_json["moemerge_recipe"]["num_average_groups"] == 4
    assert set(info_json["experts_per_layer"].values()) == {4}
    assert len(info_json["plan"]["0"]["groups"]) == 4
    assert json.loads((out / "eval.json").read_text())["perplexity"]["after"]


def test_collapse_refuses_start_layer(model_dirs, text_file, tmp_path):
    with pytest.raises(MoemergeError, match="start_layer"):
        moemerge.run(_recipe(model_dirs["mixtral"], text_file, tmp_path / "o", num_average_groups=4,
                             router="collapse", start_layer=1), progress=False)
    assert not (tmp_path / "o").exists()


def test_start_layer_leaves_earlier_layers_untouched(model_dirs, text_file, tmp_path):
    result = moemerge.run(_recipe(model_dirs["mixtral"], text_file, tmp_path / "o", num_average_groups=4,
                                  start_layer=1, ppl=["none"]), progress=False)
    assert result.plan.layers[0].is_identity and result.plan.layers[1].num_groups == 4


# ---- bad input: one line, no output folder ----------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moemerge.cli", *args], capture_output=True, text=True,
                          timeout=300)


def _dense_model(tmp_path, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize("case", ["bad_path", "dense", "empty_calibration", "below_top_k", "unknown_merge",
                                  "linkage_without_hierarchical"])
def test_bad_input_gives_one_line_and_no_output(case, model_dirs, text_file, tmp_path, tokenizer):
    out = tmp_path / "out"
    model, extra = str(model_dirs["mixtral"]), []
    if case == "bad_path":
        model = str(tmp_path / "does-not-exist")
    elif case == "dense":
        model = str(_dense_model(tmp_path, tokenizer))
    elif case == "empty_calibration":
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        extra = ["--calibration", str(empty)]
    elif case == "below_top_k":
        extra = ["--num-average-groups", "1"]
    elif case == "unknown_merge":
        extra = ["--merge", "average-everything"]
    elif case == "linkage_without_hierarchical":
        extra = ["--cluster", "kmeans", "--linkage", "ward"]
    args = ["merge", model, "--output", str(out), "--num_average_groups", "4", "--seq-len", "32", "--ppl", "none",
            "-q", *extra]
    if case != "empty_calibration":
        args += ["--calibration", str(text_file)]
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_recipe_yaml_round_trip_and_cli_spellings(tmp_path):
    r = moemerge.Recipe.build({"num-average-groups": 4, "similarity_base": "router-logits", "format": "collapse"})
    path = tmp_path / "r.yaml"
    path.write_text(r.to_yaml())
    again = moemerge.Recipe.load(path)
    assert again == r and again.router == "collapse"
    assert moemerge.Recipe.load("hc-smoe").linkage == "average"


def test_mapped_checkpoint_evaluates_but_is_not_merged_again(model_dirs, text_file, tmp_path):
    out = tmp_path / "mapped"
    moemerge.run(_recipe(model_dirs["mixtral"], text_file, out, num_average_groups=4, router="mapped"),
                 progress=False)
    proc = _cli("eval", str(out), "--ppl", str(text_file), "--seq-len", "32", "-q")
    assert proc.returncode == 0 and "perplexity" in proc.stdout, proc.stderr
    proc = _cli("merge", str(out), "--output", str(tmp_path / "again"), "--num-average-groups", "2", "-q")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ") and "mapped" in proc.stderr
