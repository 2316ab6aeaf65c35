"""``merge: fit`` (output-fitted down projection, after MergeMoE) and its plan-aware calibration pass."""

from __future__ import annotations

import pytest
import torch

import moemerge
from moemerge.calibrate import Stats
from moemerge.execute.executor import layer_passes
from moemerge.families import moe_layers
from moemerge.group.plan import LayerPlan, MergePlan
from moemerge.loading import LoadedModel, fingerprint
from moemerge.merge import merge_layer
from moemerge.merge.fit import (
    CANDIDATES,
    DAMP,
    DAMP_GRID,
    choose_damping,
    fit_objective,
    held_out_windows,
    part_sums,
    solve_down,
    start_method,
)
from moemerge.pipeline import merge_model

from conftest import FAMILIES, make_model


def _windows(tokenizer, count: int = 6, seq_len: int = 32) -> torch.Tensor:
    from conftest import TEXT

    ids = tokenizer(" ".join(TEXT[:10]), return_tensors="pt")["input_ids"][0]
    return ids[: count * seq_len].reshape(count, seq_len)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _fit_layer(model, tokenizer, groups, **options):
    """Plan ``groups`` in every layer, run the fit pass, merge with ``fit`` and the start method."""
    layers = moe_layers(model)
    num_experts = layers[0].num_experts
    plan = MergePlan({l.index: LayerPlan(l.index, num_experts, groups, [g[0] for g in groups]) for l in layers})
    stats = Stats({l.index: {"frequency": {"counts": torch.rand(num_experts) + 0.1, "tokens": torch.tensor(1.0)}}
                   for l in layers}, {})
    stats = layer_passes(model, moemerge.Recipe(merge="fit", **options), plan, stats, _windows(tokenizer, 8))
    fitted = {l.index: merge_layer(l, plan.layers[l.index], "fit", stats) for l in layers}
    start = {l.index: merge_layer(l, plan.layers[l.index], start_method("normal"), stats) for l in layers}
    return layers, plan, stats, fitted, start


@pytest.mark.parametrize("family", FAMILIES)
def test_group_of_one_is_returned_unchanged(family, tokenizer):
    model = make_model(family, vocab_size=len(tokenizer))
    num_experts = moe_layers(model)[0].num_experts
    groups = [[0, 1, 2]] + [[e] for e in range(3, num_experts)]
    layers, _, _, fitted, _ = _fit_layer(model, tokenizer, groups)
    for layer in layers:
        gate_up, down = layer.expert_weights()
        for gi, g in enumerate(groups[1:], start=1):
            assert torch.equal(fitted[layer.index].gate_up[gi], gate_up[g[0]])
            assert torch.equal(fitted[layer.index].down[gi], down[g[0]])


@pytest.mark.parametrize("scope", ["down", "expert"])
@pytest.mark.parametrize("family", FAMILIES)
def test_group_of_identical_experts_is_fitted_exactly(family, scope, tokenizer):
    """Whole-expert fit (and down-only fit) on a group of identical experts gives the expert back."""
    model = make_model(family, vocab_size=len(tokenizer))
    with torch.no_grad():
        for layer in moe_layers(model):
            for e in (1, 2):
                layer.experts.gate_up_proj[e] = layer.experts.gate_up_proj[0]
                layer.experts.down_proj[e] = layer.experts.down_proj[0]
    num_experts = moe_layers(model)[0].num_experts
    groups = [[0, 1, 2]] + [[e] for e in range(3, num_experts)]
    layers, _, stats, fitted, _ = _fit_layer(model, tokenizer, groups, fit_scope=scope)
    for layer in layers:
        gate_up, down = layer.expert_weights()
        assert torch.allclose(fitted[layer.index].gate_up[0], gate_up[0], atol=1e-6)
        assert torch.allclose(fitted[layer.index].down[0], down[0], atol=1e-6)
        per = stats.get(layer.index, "fit")
        assert float(per["0-1-2.objective"]) <= 1e-8 * float(part_sums(per, "start.0-1-2", "C", None)[0])


@pytest.mark.parametrize("scope", ["down", "expert"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fit_never_worse_than_its_start_on_its_objective(family, scope, tokenizer):
    model = make_model(family, vocab_size=len(tokenizer), seed=3)
    num_experts = moe_layers(model)[0].num_experts
    groups = [list(range(0, num_experts, 2)), list(range(1, num_experts, 2))]
    layers, _, stats, fitted, start = _fit_layer(model, tokenizer, groups, fit_scope=scope)
    improved = 0
    for layer in layers:
        per = stats.get(layer.index, "fit")
        for gi, g in enumerate(groups):
            key = "-".join(map(str, g))
            a, b, c = part_sums(per, f"start.{key}", "ABC", None)  # eq. 1 sums of the start's gate/up
            before = fit_objective(start[layer.index].down[gi].double(), a, b, c)
            assert float(per[f"{key}.start_objective"]) == pytest.approx(before, rel=1e-9)
            after = float(per[f"{key}.objective"])
            assert after <= before * (1 + 1e-9)
            choice = CANDIDATES[int(per[f"{key}.choice"])]
            if choice in ("start", "down"):  # gate/up kept: the objective can be checked from the start's sums
                assert torch.equal(fitted[layer.index].gate_up[gi], start[layer.index].gate_up[gi])
                recomputed = fit_objective(fitted[layer.index].down[gi].double(), a, b, c)
                assert recomputed == pytest.approx(after, rel=1e-4, abs=1e-6 * float(c))
            else:  # refitted gate/up: from the second pass's sums of that candidate
                a2, b2, c2 = part_sums(per, f"expert.{key}.{choice}", "ABC", None)
                assert float(c2) == pytest.approx(float(c), rel=1e-9)  # same tokens, same targets
                recomputed = fit_objective(fitted[layer.index].down[gi].double(), a2, b2, c2)
                assert recomputed == pytest.approx(after, rel=1e-4, abs=1e-6 * float(c))
            improved += after < 0.9 * before
    assert improved > 0  # on random experts, least squares beats the average by a wide margin


def test_held_out_windows_are_spread_and_counted():
    held = held_out_windows(torch.arange(16), 0.25)
    assert held.nonzero().squeeze(1).tolist() == [3, 7, 11, 15]
    for n in (3, 7, 10, 33):
        assert int(held_out_windows(torch.arange(n), 0.3).sum()) == int(n * 0.3)
    assert not held_out_windows(torch.arange(8), 0.0).any()


@pytest.mark.parametrize("family", FAMILIES)
def test_damping_is_chosen_from_the_grid_on_held_out_windows(family, tokenizer):
    """For each group, the down projection's damping is a grid value, and no other grid value has a lower
    held-out objective; a choice by held-out objective is recorded for every group."""
    model = make_model(family, vocab_size=len(tokenizer), seed=4)
    num_experts = moe_layers(model)[0].num_experts
    groups = [list(range(0, num_experts, 2)), list(range(1, num_experts, 2))]
    layers, _, stats, _, start = _fit_layer(model, tokenizer, groups, fit_scope="down")
    checked = 0
    for layer in layers:
        per = stats.get(layer.index, "fit")
        for gi, g in enumerate(groups):
            key = "start." + "-".join(map(str, g))
            fit, held = part_sums(per, key, "ABC", "fit"), part_sums(per, key, "ABC", "held")
            assert fit is not None and held is not None  # 8 windows, every 4th held out
            w0 = start[layer.index].down[gi].double()
            _, damp, scores = choose_damping(fit, held, w0)
            assert damp in DAMP_GRID and set(scores) == set(DAMP_GRID)
            assert all(scores[damp] <= v for v in scores.values())
            checked += 1
    assert checked
    _, damp, scores = choose_damping(fit, None, w0)  # nothing held out: the fixed damping
    assert damp == DAMP and not scores


@pytest.mark.parametrize("family", FAMILIES)
def test_as_many_groups_as_experts_reproduces_the_original(family, tokenizer, text_file):
    ids = _windows(tokenizer, 2)
    reference = _logits(make_model(family, vocab_size=len(tokenizer), seed=6), ids)
    model = make_model(family, vocab_size=len(tokenizer), seed=6)
    loaded = LoadedModel(model, tokenizer, "in-memory", None, fingerprint(model, None, "in-memory"))
    num_experts = moe_layers(model)[0].num_experts
    recipe = moemerge.Recipe.build(calibration=str(text_file), seq_len=32, n_sentences=8,
                                   num_average_groups=num_experts, merge="fit", cache=False)
    merge_model(loaded, recipe, progress=False)
    assert torch.equal(_logits(model, ids), reference)


def test_fit_info_reports_train_and_held_out_objectives(model_dirs, text_file, tmp_path):
    """merge_info.json holds, per merged layer, the relative objectives on the fitted and held-out windows and
    their gap, the choices and dampings (from the grid)."""
    import json

    out = tmp_path / "out"
    recipe = moemerge.Recipe.build(model_path=str(model_dirs["qwen2_moe"]), output_path=str(out),
                                   calibration=str(text_file), seq_len=32, n_sentences=8, num_average_groups=4,
                                   merge="fit", ppl=["none"], report=False, dtype="float32", cache=False)
    moemerge.run(recipe, progress=False)
    info = json.loads((out / "merge_info.json").read_text())["fit"]
    assert info
    for layer in info.values():
        rel = layer["relative_error"]
        assert layer["gap"] == pytest.approx(rel["chosen"]["held_out"] - rel["chosen"]["train"])
        assert rel["chosen"]["held_out"] <= rel["start"]["held_out"] + 1e-9 or layer["chosen"]["start"]
        assert sum(layer["chosen"].values()) == len(layer["groups"])
        for group in layer["groups"].values():
            assert group["chosen"] in CANDIDATES
            assert all(group[k] in DAMP_GRID for k in ("gate", "up", "down") if k in group)


def test_fit_options_only_with_merge_fit():
    with pytest.raises(moemerge.MoemergeError, match="fit_scope only applies to merge=fit"):
        moemerge.Recipe.build(merge="freq", fit_scope="down")
    with pytest.raises(moemerge.MoemergeError, match="fit_held_out"):
        moemerge.Recipe.build(merge="fit", fit_held_out=1.0)
    assert moemerge.Recipe.build(merge="fit", fit_scope="down", fit_held_out=0).fit_held_out == 0


def test_solve_down_recovers_a_planted_solution():
    torch.manual_seed(0)
    h = torch.randn(500, 6, dtype=torch.float64)
    s = torch.rand(500, dtype=torch.float64) + 0.5
    w_true = torch.randn(4, 6, dtype=torch.float64)
    y = s[:, None] * (h @ w_true.T)
    a, b = (h * (s * s)[:, None]).T @ h, (y * s[:, None]).T @ h
    w = solve_down(a, b, damp=0.0)
    assert torch.allclose(w, w_true, atol=1e-8)
    assert abs(fit_objective(w, a, b, (y * y).sum())) < 1e-6
    assert solve_down(torch.zeros(6, 6), torch.zeros(4, 6)) is None  # no tokens: nothing to fit


@pytest.mark.parametrize("family", FAMILIES)
def test_fit_through_the_pipeline_is_closer_to_the_original_than_its_start(family, tokenizer, text_file):
    """End to end with router=keep: the fitted model's logits are closer to the original's than the start's."""
    ids = _windows(tokenizer, 2)
    reference = make_model(family, vocab_size=len(tokenizer), seed=5)
    ref = _logits(reference, ids)
    errors = {}
    for merge in ("fit", start_method("normal")):
        model = make_model(family, vocab_size=len(tokenizer), seed=5)
        loaded = LoadedModel(model, tokenizer, "in-memory", None, fingerprint(model, None, "in-memory"))
        recipe = moemerge.Recipe.build(calibration=str(text_file), seq_len=32, n_sentences=8, num_average_groups=4,
                                       merge=merge, cache=False)
        merge_model(loaded, recipe, progress=False)
        errors[merge] = (_logits(model, ids) - ref).pow(2).mean().item()
    assert errors["fit"] < errors[start_method("normal")]


def test_fit_without_its_pass_fails_with_one_line(tokenizer):
    model = make_model("mixtral", vocab_size=len(tokenizer))
    layer = moe_layers(model)[0]
    plan = LayerPlan(layer.index, 8, [[0, 1]] + [[e] for e in range(2, 8)], [0] + list(range(2, 8)))
    stats = Stats({layer.index: {"frequency": {"counts": torch.ones(8), "tokens": torch.tensor(1.0)}}}, {})
    with pytest.raises(moemerge.MoemergeError, match="fit pass"):
        merge_layer(layer, plan, "fit", stats)


@pytest.mark.parametrize("family,sequential", [("mixtral", False), ("qwen2_moe", True)])
def test_router_fit_lowers_the_block_output_error(family, sequential, tokenizer, text_file):
    """router_fit (collapse) starts from the router_adapt rows and never ends worse on its sample objective; on
    random tiny models it improves it, and the merged model stays finite."""
    model = make_model(family, vocab_size=len(tokenizer), seed=2)
    loaded = LoadedModel(model, tokenizer, "in-memory", None, fingerprint(model, None, "in-memory"))
    recipe = moemerge.Recipe.build(calibration=str(text_file), seq_len=32, n_sentences=6, num_average_groups=4,
                                   router="collapse", router_fit=True, cache=False, sequential=sequential)
    result = merge_model(loaded, recipe, progress=False)
    if not sequential:
        assert all(v["after"] <= v["before"] for v in result.router_fit.values())
        assert any(v["after"] < v["before"] for v in result.router_fit.values())
    assert torch.isfinite(_logits(model, _windows(tokenizer, 1))).all()


def test_few_calibration_tokens_for_a_fit_are_warned_once(caplog):
    from moemerge.pipeline import warn_few_tokens

    warn_few_tokens.cache_clear()
    with caplog.at_level("WARNING", logger="moemerge.pipeline"):
        for windows, seq_len in ((32, 256), (32, 256), (32, 2048)):  # HC-SMoE's 32 × 2048 is enough
            warn_few_tokens(windows, seq_len)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("calibration:")]
    assert len(said) == 1 and "8192 tokens" in said[0] and "--n-sentences 256" in said[0]


def test_default_calibration_holds_hc_smoe_tokens():
    """Unset, n_sentences is 32 windows of 2048 or more shorter windows holding the same 65,536 tokens; an explicit
    count is kept, and the resolved recipe (merge_info.json) records the count used."""
    from types import SimpleNamespace

    from moemerge.pipeline import calibration_settings, resolved
    from moemerge.recipe import CALIBRATION_TOKENS, default_window_count

    assert default_window_count(2048) == default_window_count(4096) == 32
    assert default_window_count(256) == 256 and default_window_count(1000) == 66
    assert all(default_window_count(s) * s >= CALIBRATION_TOKENS for s in (2, 100, 257, 2047))
    config = SimpleNamespace(max_position_embeddings=256)
    assert calibration_settings(moemerge.Recipe(), config).n_sentences == 256
    assert calibration_settings(moemerge.Recipe(n_sentences=8), config).n_sentences == 8
    recipe = resolved(moemerge.Recipe(calibration="bundled"), config)
    assert (recipe.n_sentences, recipe.seq_len) == (256, 256)
