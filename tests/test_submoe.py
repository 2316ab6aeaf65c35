"""Sub-MoE (arXiv 2506.23266) as a recipe: eq. 2 similarity, multi-layer allocation, subspace merge, Sub-MoE†."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import moemerge
from moemerge.calibrate import CalibrationSettings, LayerBatch
from moemerge.calibrate.stats import STATISTICS
from moemerge.errors import MoemergeError
from moemerge.families import family_of, moe_layers
from moemerge.group import plan_groups
from moemerge.group.allocation import allocate, allocate_block, cluster_cost
from moemerge.loading import LoadedModel, fingerprint
from moemerge.merge import GroupInputs, frequency_weights, merge_layer
from moemerge.merge.subspace import (
    clamp_psd,
    submoe_merge,
    subspace_merge_matrix,
    truncation_rank,
    union_svd_merge_matrix,
)
from moemerge.pipeline import calibrate

from conftest import FAMILIES, make_model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _group(n: int, out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, out_f, in_f, generator=g)
    alpha = frequency_weights(torch.rand(n, generator=g) + 0.05).float()
    return w, alpha


def _covs(n: int, d: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4 * d, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d, dtype=torch.float64)
    return x.transpose(1, 2) @ x


# ---- eq. 2: the similarity statistic ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_expert_output_cosine_matches_pairwise_definition(family):
    model = make_model(family)
    layer = moe_layers(model)[0]
    hidden = torch.randn(40, model.config.hidden_size)
    with torch.no_grad():
        weights, index = layer.route(hidden @ layer.router_weight.T, model.config)
        batch = LayerBatch(layer, hidden, index, weights, None)
        stat = STATISTICS.get("expert_output_cosine")(layer, hidden.device)
        stat.update(batch)
        sim = stat.result()["sum"] / stat.result()["tokens"]
        outputs = layer.run_experts(hidden).double()  # [E, T, H]
    for i in range(layer.num_experts):  # the definition, pair by pair (the implementation has no such loop)
        for j in range(layer.num_experts):
            direct = torch.nn.functional.cosine_similarity(outputs[i], outputs[j], dim=-1).mean()
            assert float(sim[i, j]) == pytest.approx(float(direct), abs=1e-5)


def test_intermediate_cov_matches_routed_tokens():
    model = make_model("qwen2_moe")
    layer = moe_layers(model)[1]
    hidden = torch.randn(30, model.config.hidden_size)
    with torch.no_grad():
        weights, index = layer.route(hidden @ layer.router_weight.T, model.config)
        stat = STATISTICS.get("intermediate_cov")(layer, hidden.device)
        stat.update(LayerBatch(layer, hidden, index, weights, None))
        gate_up, _ = layer.expert_weights()
        for e in range(layer.num_experts):
            x = hidden[(index == e).any(-1)]
            g, u = (x @ gate_up[e].T).chunk(2, dim=-1)
            h = (layer.experts.act_fn(g) * u).double()
            torch.testing.assert_close(stat.result()["sum"][e], h.T @ h, rtol=1e-4, atol=1e-5)


# ---- eqs. 5–8 and 10–12: the merge -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 24, 16), (4, 16, 24), (2, 64, 32)])
def test_full_rank_subspace_merge_is_the_weighted_average(shape):
    w, alpha = _group(*shape)
    average = torch.einsum("n,noi->oi", alpha, w)
    svd, _ = union_svd_merge_matrix(w, alpha)
    fast, factors = subspace_merge_matrix(w, alpha)
    assert _rel(svd, average) <= 1e-5
    assert fast.dtype == torch.float32 and _rel(fast, average) <= 1e-6 and factors is None
    # Whitening does not change the full-rank result either (the de-whitened blocks are exact).
    whitened, _ = union_svd_merge_matrix(w, alpha, cov=_covs(shape[0], shape[2]))
    assert _rel(whitened, average) <= 1e-5


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("rank", [None, 4, 11])
def test_fast_path_equals_union_svd(whiten, rank):
    w, alpha = _group(3, 20, 12, seed=2)
    cov = _covs(3, 12) if whiten else None
    svd, (a_svd, b_svd) = union_svd_merge_matrix(w, alpha, rank, cov)
    fast, factors = subspace_merge_matrix(w, alpha, rank, cov)
    assert _rel(fast, svd) <= 1e-5
    assert _rel(a_svd @ b_svd, svd) <= 1e-5
    if rank is not None:
        a, b = factors
        assert a.shape == (20, rank) and b.shape == (rank, 12)
        assert _rel(a @ b, fast) <= 1e-6


def test_truncated_merge_projects_the_average_on_the_shared_subspace():
    w, alpha = _group(4, 30, 10, seed=3)
    rank = 7
    union = np.concatenate(list(w.double().numpy()), axis=1)  # [O, nI]
    u = np.linalg.svd(union, full_matrices=False)[0][:, :rank]
    expected = u @ u.T @ np.einsum("n,noi->oi", alpha.double().numpy(), w.double().numpy())
    merged, _ = union_svd_merge_matrix(w, alpha, rank)
    assert _rel(merged, torch.from_numpy(expected)) <= 1e-5
    fast, _ = subspace_merge_matrix(w, alpha, rank)
    assert _rel(fast, torch.from_numpy(expected)) <= 1e-5


def test_clamp_psd_makes_zero_covariance_factorable():
    c = clamp_psd(torch.zeros(2, 5, 5))
    torch.linalg.cholesky(c)  # no error
    assert truncation_rank(0.5, 48, 32) == 16 and truncation_rank(None, 4, 4) is None
    with pytest.raises(MoemergeError):
        truncation_rank(1.5, 4, 4)


def test_dagger_factors_multiply_to_the_dense_merge():
    w_gu, alpha = _group(3, 2 * 12, 8, seed=4)
    w_dn, _ = _group(3, 8, 12, seed=5)
    inputs = GroupInputs(w_gu, w_dn, torch.tensor([0.5, 0.2, 0.1]))
    merged = submoe_merge(inputs, rank_ratio=0.5)
    assert set(merged.factors) == {"gate", "up", "down"}
    a, b = merged.factors["gate"]
    assert a.shape == (12, 4) and b.shape == (4, 8)
    torch.testing.assert_close(a @ b, merged.gate_up[:12], rtol=1e-5, atol=1e-5)
    a, b = merged.factors["up"]
    torch.testing.assert_close(a @ b, merged.gate_up[12:], rtol=1e-5, atol=1e-5)
    a, b = merged.factors["down"]
    assert a.shape == (8, 4) and b.shape == (4, 12)
    torch.testing.assert_close(a @ b, merged.down, rtol=1e-5, atol=1e-5)
    full = submoe_merge(inputs)  # no rank: the frequency-weighted average, no factors
    assert full.factors is None
    torch.testing.assert_close(full.gate_up, torch.einsum("n,noi->oi", frequency_weights(inputs.frequency).float(),
                                                          w_gu), rtol=1e-6, atol=1e-6)


# ---- multi-layer allocation ---------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.integers(1, 4), st.integers(1, 3), st.integers(4, 10), st.data())
def test_allocation_meets_budget_exactly_and_respects_top_k(num_layers, multi_layer, top_k, experts, data):
    groups = data.draw(st.integers(top_k, experts))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    table = {(li, c): float(rng.random()) for li in range(num_layers) for c in range(1, experts + 1)}
    counts = allocate({li: experts for li in range(num_layers)}, groups, multi_layer, top_k,
                      lambda li, c: table[li, c])
    assert sum(counts.values()) == groups * num_layers
    assert all(top_k <= c <= experts for c in counts.values())
    for start in range(0, num_layers, multi_layer):  # every block keeps its own budget: nothing crosses blocks
        block = range(start, min(start + multi_layer, num_layers))
        assert sum(counts[li] for li in block) == groups * len(block)
    if multi_layer == 1:
        assert set(counts.values()) == {groups}


def test_allocation_gives_fewer_groups_to_the_more_similar_layer():
    # Layer 0 merges for free down to 3 groups; layer 1 pays for every merge.
    cost = {0: lambda c: 0.0 if c >= 3 else 10.0 * (3 - c), 1: lambda c: float(8 - c)}
    counts = allocate_block({0: 8, 1: 8}, 8, 2, lambda li, c: cost[li](c))
    assert counts == {0: 3, 1: 5}
    with pytest.raises(MoemergeError):
        allocate_block({0: 8, 1: 8}, 3, 2, lambda li, c: 0.0)


def test_cluster_cost_is_the_kmeans_objective():
    x = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]])
    assert cluster_cost(x, np.array([0, 0, 1])) == pytest.approx(2.0)


# ---- grouping on a model ----------------------------------------------------------------------------------------

def _loaded(model, tokenizer) -> LoadedModel:
    return LoadedModel(model, tokenizer, "in-memory", None, fingerprint(model, None, "in-memory"))


def _duplicate_experts(model, layer_index: int, source: int, targets: list[int]) -> None:
    layer = moe_layers(model)[layer_index]
    with torch.no_grad():
        for t in targets:
            layer.experts.gate_up_proj[t] = layer.experts.gate_up_proj[source]
            layer.experts.down_proj[t] = layer.experts.down_proj[source]


@pytest.fixture(scope="module")
def similar_layer0(tokenizer, text_file):
    """A tiny Mixtral whose layer 0 has experts 0–3 identical, with its Sub-MoE statistics."""
    model = make_model("mixtral", vocab_size=len(tokenizer), seed=3)
    _duplicate_experts(model, 0, 0, [1, 2, 3])
    loaded = _loaded(model, tokenizer)
    stats = calibrate(loaded, CalibrationSettings(str(text_file), n_sentences=6, seq_len=32, use_cache=False),
                      ["frequency", "expert_output_cosine", "expert_output_gram"], progress=False)
    return model, stats


def test_identical_experts_share_a_cluster_and_make_their_layer_smaller(similar_layer0):
    model, stats = similar_layer0
    layers = moe_layers(model)
    top_k = family_of(model.config).top_k(model.config)
    for multi_layer in (1, 2):
        recipe = moemerge.Recipe.load("sub-moe", num_average_groups=5, multi_layer=multi_layer)
        plan = plan_groups(recipe, stats, layers, top_k)
        groups0 = plan.layers[0].groups
        assert any({0, 1, 2, 3} <= set(g) for g in groups0)
        counts = plan.counts()
        assert sum(counts.values()) == 10 and min(counts.values()) >= top_k
        if multi_layer == 1:
            assert counts == {0: 5, 1: 5}
        else:
            assert counts[0] < counts[1]  # the layer with more similar experts gets fewer groups


# ---- end to end -------------------------------------------------------------------------------------------------

def _recipe(name, model_dir, text_file, out, **kw) -> moemerge.Recipe:
    base = dict(model_path=str(model_dir), output_path=str(out), calibration=str(text_file), seq_len=32,
                n_sentences=6, ppl=[str(text_file)], ppl_windows=2, dtype="float32", fidelity=False, report=False)
    return moemerge.Recipe.load(name, **{**base, **kw})


@pytest.mark.parametrize("family", FAMILIES)
def test_sub_moe_recipe_saves_and_reloads(family, model_dirs, text_file, tmp_path, tokenizer):
    out = tmp_path / "out"
    loaded = moemerge.load_model(str(model_dirs[family]), "float32", "cpu")
    result = moemerge.run(_recipe("sub-moe", model_dirs[family], text_file, out, num_average_groups=5),
                          progress=False, loaded=loaded)
    info = json.loads((out / "merge_info.json").read_text())
    counts = {int(k): v for k, v in info["experts_per_layer"].items()}
    assert counts == result.plan.counts() and sum(counts.values()) == 5 * len(counts)
    assert (out / "experts_per_layer.png").exists() == (len(set(counts.values())) > 1)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tokenizer("And God said", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - loaded.model(input_ids=ids).logits).abs().max()
    assert diff <= 1e-5


def test_sub_moe_dagger_whitened_end_to_end(model_dirs, text_file, tmp_path):
    out = tmp_path / "dagger"
    result = moemerge.run(_recipe("sub-moe-dagger", model_dirs["qwen2_moe"], text_file, out, num_average_groups=6,
                                  multi_layer=1, router="keep"), progress=False)
    assert set(result.plan.counts().values()) == {6}
    assert {"input_cov", "intermediate_cov"} <= set(result.stats.meta["statistics"])
    # The dense product of the rank-r factors is what keep saves: every merged down_proj has rank ≤ r.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    down = moe_layers(reloaded)[0].experts.down_proj.data
    r = truncation_rank(0.5, down.shape[1], down.shape[2])
    assert int(torch.linalg.matrix_rank(down[0])) <= r


def test_sub_moe_dagger_preset_saves_two_factors_and_shrinks(model_dirs, text_file, tmp_path):
    out = tmp_path / "dagger-lowrank"
    result = moemerge.run(_recipe("sub-moe-dagger", model_dirs["mixtral"], text_file, out, num_average_groups=4),
                          progress=False)
    assert result.recipe.router == "lowrank"
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True,
                                                          output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sum(p.numel() for p in reloaded.parameters()) < result.parameters_before


def test_merge_layer_returns_factors_for_every_group_including_singletons(similar_layer0):
    model, stats = similar_layer0
    layer = moe_layers(model)[1]
    recipe = moemerge.Recipe.load("sub-moe", num_average_groups=6, rank_ratio=0.25, multi_layer=1)
    plan = plan_groups(recipe, stats, moe_layers(model), family_of(model.config).top_k(model.config)).layers[1]
    merged = merge_layer(layer, plan, "sub-moe", stats, recipe=recipe)
    assert merged.factors is not None and len(merged.factors) == plan.num_groups
    inter = layer.intermediate_size
    for g, f in enumerate(merged.factors):
        torch.testing.assert_close(f["gate"][0] @ f["gate"][1], merged.gate_up[g, :inter], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(f["down"][0] @ f["down"][1], merged.down[g], rtol=1e-4, atol=1e-5)


def test_router_collapse_works_with_uniform_counts_and_refuses_non_uniform(model_dirs, text_file, tmp_path,
                                                                           similar_layer0, tokenizer):
    out = tmp_path / "collapse"
    result = moemerge.run(_recipe("sub-moe", model_dirs["mixtral"], text_file, out, num_average_groups=4,
                                  multi_layer=1, router="collapse"), progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert moe_layers(reloaded)[0].num_experts == 4 and result.saved is not None
    model, _ = similar_layer0
    with pytest.raises(MoemergeError, match="router=collapse needs the same expert count"):
        moemerge.merge_model(_loaded(model, tokenizer),
                             _recipe("sub-moe", "unused", text_file, tmp_path / "x", num_average_groups=5,
                                     router="collapse"), progress=False)
