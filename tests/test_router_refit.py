"""``router_fit``: the collapsed (or mapped) router and the merged experts refitted for the routing the written
layer really uses (``save/router_refit.py``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moemerge
from moemerge.families import moe_layers
from moemerge.loading import LoadedModel, fingerprint
from moemerge.pipeline import merge_model
from moemerge.save.router_refit import (
    REFIT_BYTES,
    RoutedOutputSample,
    block_fit_seconds,
    block_output,
    fit_block,
    refit_downs,
    refit_layer,
    ridge_steps,
    routed_from,
    routed_target,
    sample_tokens,
    spread_tokens,
)

from conftest import make_model


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(2, 12), cols=st.integers(2, 12), damp=st.sampled_from([1e-4, 1e-2, 1.0]),
       seed=st.integers(0, 10_000))
def test_ridge_step_equals_the_direct_solve(rows, cols, damp, seed):
    """Eq. 2 from one eigendecomposition (primal when rows ≥ cols, dual otherwise) is the ridge solution."""
    gen = torch.Generator().manual_seed(seed)
    phi = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    resid = torch.randn(rows, 3, generator=gen, dtype=torch.float64)
    lam = damp * (phi * phi).sum() / cols
    direct = torch.linalg.solve(phi.T @ phi + lam * torch.eye(cols, dtype=torch.float64), phi.T @ resid)
    assert torch.allclose(ridge_steps(phi, resid, [damp])[damp], direct, atol=1e-8, rtol=1e-6)


def _routing(layer, hidden: torch.Tensor, config):
    return layer.family.routing(config)(hidden @ layer.router_weight.float().T, layer.choice_bias)


def test_expert_sweeps_recover_the_down_projections_under_a_fixed_routing():
    """With targets made by the layer itself (top-2, experts overlapping on tokens), Gauss-Seidel sweeps of eq. 2
    from perturbed down projections converge back to them."""
    model = make_model("mixtral", seed=3)
    layer = moe_layers(model)[0]
    hidden = torch.randn(3000, model.config.hidden_size)
    weights, index = _routing(layer, hidden, model.config)
    _, down = layer.expert_weights()
    truth = down.clone()
    target = routed_from(weights, index, layer.run_experts(hidden))
    down.add_(0.3 * torch.randn_like(down))
    expert_out = layer.run_experts(hidden)
    start = (routed_from(weights, index, expert_out) - target).pow(2).sum()
    held = torch.zeros(hidden.shape[0], dtype=torch.bool)
    for _ in range(30):
        refit_downs(layer, hidden, target, held, weights, index, expert_out, (1e-9,))
    assert torch.allclose(down, truth, atol=1e-3)
    assert (routed_from(weights, index, expert_out) - target).pow(2).sum() < 1e-6 * start
    assert torch.allclose(expert_out, layer.run_experts(hidden), atol=1e-5)  # kept up to date


@pytest.mark.parametrize("block", [0, 30])
def test_refit_of_an_unmerged_layer_changes_nothing(block):
    """Identity: a layer whose experts already give the target (nothing merged) keeps its router and experts
    bit-identical, with or without the block fit (nothing to gain on the held-out tokens: not kept)."""
    model = make_model("qwen2_moe", seed=1)
    layer = moe_layers(model)[0]
    hidden = torch.randn(400, model.config.hidden_size)
    weights, index = _routing(layer, hidden, model.config)
    target = routed_from(weights, index, layer.run_experts(hidden))
    before = [t.clone() for t in (layer.router_weight.detach(), *layer.expert_weights())]
    info = refit_layer(layer, (hidden, target, torch.arange(400) % 4 == 0), model.config, block_steps=block)
    assert info["before"] < 1e-10 and info["rounds_kept"] == 0
    assert info.get("block_kept", False) is False and info.get("block_steps", 0) <= block
    assert all(torch.equal(a, b) for a, b in zip(before, (layer.router_weight, *layer.expert_weights())))


def _batch(windows: int, length: int, hidden_size: int, num_experts: int):
    class Batch:  # routed to expert 0
        num_tokens = windows * length
        hidden = torch.randn(windows * length, hidden_size)

        @staticmethod
        def routed_weights():
            return torch.nn.functional.one_hot(torch.zeros(windows * length, dtype=torch.long), num_experts).T.float()

    return Batch


@settings(max_examples=30, deadline=None)
@given(windows=st.integers(1, 12), length=st.integers(1, 40), split=st.integers(0, 12),
       share=st.floats(0.01, 1.0))
def test_spread_tokens_are_even_and_the_same_however_the_windows_are_batched(windows, length, split, share):
    ids = torch.arange(windows)
    whole = spread_tokens(ids, windows * length, share)
    split = min(split, windows)
    parts = torch.cat([spread_tokens(ids[:split], split * length, share) if split else torch.zeros(0, dtype=bool),
                       spread_tokens(ids[split:], (windows - split) * length, share)])
    assert torch.equal(whole, parts)  # batches (and ranks) see the job's token indices, not their own
    total = windows * length
    assert abs(int(whole.sum()) - total * share) <= 1
    gaps = whole.nonzero().squeeze(1).diff()
    if share < 1 and gaps.numel():
        assert int(gaps.max()) <= int(1 / share) + 1  # evenly spaced, never a run of skipped windows


def test_sample_spreads_over_every_window_and_holds_some_out_of_long_windows():
    """At seq_len 2048 the first 4096 tokens were two windows, none held out: spread, 8 windows of 512 tokens kept
    at a quarter give tokens of all 8, whole windows held out."""
    model = make_model("mixtral")
    layer = moe_layers(model)[0]
    sample = RoutedOutputSample(layer, max_tokens=1024, held_out=0.25, total_tokens=8 * 512)
    batch = _batch(8, 512, model.config.hidden_size, 8)
    for first in (0, 4):  # two batches of 4 windows
        sample.start_batch(torch.arange(first, first + 4))
        part = _batch(4, 512, model.config.hidden_size, 8)
        part.hidden = batch.hidden[first * 512:(first + 4) * 512]
        sample.update(part)
    hidden, target, held = sample.result()
    assert sample.count == 1024 and sample.full()
    positions = sample.kept_positions()
    assert torch.equal(hidden, batch.hidden[positions])
    assert sorted(set((positions // 512).tolist())) == list(range(8))
    assert torch.equal(held, (positions // 512 % 4 == 3))
    assert torch.allclose(target, layer.run_experts(hidden)[0])


def test_sample_holds_out_whole_windows():
    model = make_model("mixtral")
    layer = moe_layers(model)[0]
    sample = RoutedOutputSample(layer, max_tokens=10_000, held_out=0.25)
    batch = _batch(8, 5, model.config.hidden_size, 8)  # 8 windows of 5 tokens
    sample.start_batch(torch.arange(8))
    sample.update(batch)
    _, target, held = sample.result()
    assert held.view(8, 5).all(1).tolist() == [False, False, False, True] * 2  # every 4th window, whole
    assert torch.allclose(target, layer.run_experts(batch.hidden)[0])


@pytest.mark.parametrize("family,fmt,block,feedback", [
    ("mixtral", "collapse", 0, False), ("qwen2_moe", "collapse", 0, False), ("mixtral", "mapped", 0, False),
    ("qwen2_moe", "collapse", 40, False), ("mixtral", "mapped", 40, False), ("qwen2_moe", "collapse", 0, True),
    ("mixtral", "mapped", 40, True)])
def test_refit_never_ends_worse_and_stops_on_held_out(family, fmt, block, feedback, tokenizer, text_file):
    """On the merged model the refit never ends above the start (all sample tokens, held-out tokens), stops within
    the cap and, after a collapse, lowers its objective; so does the block fit after it, and so do both when they fit
    the merged model's inputs (error_feedback)."""
    model = make_model(family, vocab_size=len(tokenizer), seed=2)
    loaded = LoadedModel(model, tokenizer, "in-memory", None, fingerprint(model, None, "in-memory"))
    recipe = moemerge.Recipe.build(calibration=str(text_file), seq_len=32, n_sentences=8, num_average_groups=4,
                                   merge="fit", router=fmt, router_fit=True, router_fit_rounds=4, cache=False,
                                   block_fit_steps=block, error_feedback=feedback)
    result = merge_model(loaded, recipe, progress=False)
    assert result.router_fit
    for info in result.router_fit.values():
        assert info["after"] <= info["before"]
        assert info["held_out_tokens"] > 0 and info["held_out_after"] <= info["held_out_before"]
        assert info["rounds_kept"] <= info["rounds"] <= 4
        assert ("block_kept" in info) == bool(block) and info.get("block_steps", 0) <= block
    if fmt == "collapse":  # (mapped: merge=fit already fitted each group under the exact routing)
        assert any(info["after"] < info["before"] for info in result.router_fit.values())


def test_router_fit_is_refused_for_formats_without_a_per_expert_router():
    with pytest.raises(ValueError, match="router_fit"):
        moemerge.Recipe(router="padded", router_fit=True)


def test_routed_target_runs_each_expert_on_its_tokens_only():
    model = make_model("qwen2_moe", seed=4)
    layer = moe_layers(model)[0]
    hidden = torch.randn(50, model.config.hidden_size)
    with torch.no_grad():
        weights, index = _routing(layer, hidden, model.config)
        dense = torch.zeros(layer.num_experts, 50).scatter_(0, index.T, weights.T)  # [E, T]
        full = routed_from(weights, index, layer.run_experts(hidden))
        assert torch.allclose(routed_target(layer, hidden, dense), full, atol=1e-5)


def test_sample_size_is_cut_for_many_wide_experts():
    assert sample_tokens(4096, 8, 128) == 4096  # the bundled models: the whole cap
    cut = sample_tokens(4096, 256, 7168)  # DeepSeek-V3's experts: 2·G·T·H fp32 within the budget
    assert 256 <= cut < 4096 and 8 * 256 * 7168 * cut <= REFIT_BYTES


def test_a_given_plan_collects_what_the_router_needs(tokenizer):
    """A walk with a fixed plan (``Job.plan``) gathers the router inputs that ``router_adapt: fit`` and the refit
    use (it used to ask only for the merge's statistics and fail at the first collapsed layer)."""
    from moemerge.execute.executor import Job, execute
    from moemerge.execute.source import ModelSource
    from moemerge.group.plan import LayerPlan, MergePlan

    model = make_model("mixtral", vocab_size=len(tokenizer))
    plan = MergePlan({l.index: LayerPlan(l.index, 8, [[0, 1], [2, 3], [4, 5], [6, 7]], [0, 2, 4, 6])
                      for l in moe_layers(model)})
    recipe = moemerge.Recipe.build(merge="fit", router="collapse", router_fit=True, train_batch_size=2, cache=False)
    windows = torch.randint(0, len(tokenizer), (8, 16))
    out = execute(ModelSource(model), recipe, Job(windows=windows, plan=plan, progress=False))
    assert set(out.router_fit) == set(plan.layers)
    assert all(layer.num_experts == 4 for layer in moe_layers(model))


def _slots_layer(family: str, seed: int, mapped: bool):
    """A layer and its router slots: mapped feeds slot ``e`` to expert ``e // 2`` of the first half."""
    model = make_model(family, seed=seed)
    layer = moe_layers(model)[0]
    slots = torch.arange(layer.num_experts) // 2 if mapped else None
    return model, layer, slots


@pytest.mark.parametrize("mapped", [False, True])
def test_block_output_is_the_routed_sum_of_the_experts(mapped):
    """Identity: the sparse, differentiable block output equals eq. 1's sum over every expert's dense output."""
    model, layer, slots = _slots_layer("qwen2_moe", 5, mapped)
    hidden = torch.randn(300, model.config.hidden_size)
    gate_up, down = layer.expert_weights()
    routing = layer.family.routing(model.config)
    rows = layer.router_weight.detach().float()
    weights, index = routing(hidden @ rows.T, layer.choice_bias)
    dense = routed_from(weights, index if slots is None else slots[index], layer.run_experts(hidden))
    sparse = block_output(rows, gate_up.float(), down.float(), hidden, routing, layer.experts.act_fn,
                          layer.choice_bias, slots)
    assert torch.allclose(sparse, dense, atol=1e-5)


def test_block_fit_recovers_a_perturbed_expert_under_its_own_routing():
    """Targets made by the layer itself; gate/up and down perturbed: Adam on the whole block (no held-out tokens:
    it runs every step) brings the error down by two orders of magnitude."""
    torch.manual_seed(0)
    model, layer, _ = _slots_layer("mixtral", 3, False)
    hidden = torch.randn(600, model.config.hidden_size)
    routing = layer.family.routing(model.config)
    rows = layer.router_weight.detach().float()
    target = block_output(rows, *(t.float() for t in layer.expert_weights()), hidden, routing, layer.experts.act_fn)
    gate_up, down = layer.expert_weights()
    gate_up.add_(0.05 * gate_up.abs().mean() * torch.randn_like(gate_up))
    down.add_(0.05 * down.abs().mean() * torch.randn_like(down))
    start = float((block_output(rows, gate_up, down, hidden, routing, layer.experts.act_fn) - target).pow(2).sum())
    held = torch.zeros(600, dtype=torch.bool)
    fit = fit_block(layer, rows, hidden, target, held, routing, None, torch.arange(layer.num_experts), 400, lr=1e-2)
    (new_rows, new_gate_up, new_down), run = fit.params, fit.steps
    end = float((block_output(new_rows, new_gate_up, new_down, hidden, routing, layer.experts.act_fn)
                 - target).pow(2).sum())
    assert run == 400 and end < 0.01 * start
    assert torch.equal(layer.expert_weights()[0], gate_up)  # fit_block itself changes nothing in the layer


def test_block_fit_cost_estimate_scales_with_the_shapes():
    class View:  # Mixtral-8x7B's expert shapes, without the weights
        intermediate_size = 14336

        class experts:  # noqa: N801 - mimics MoeLayer.experts
            down_proj = torch.empty(8, 4096, 14336, device="meta")

    cpu = block_fit_seconds(300, [View], top_k=2, device="cpu")
    assert 12 * 3600 < cpu < 3 * 86400  # about a day for one layer on two CPU cores (16384 tokens: the memory cut)
    assert block_fit_seconds(300, [View], top_k=2, device="cuda") < cpu / 100
    assert block_fit_seconds(600, [View, View], top_k=2, device="cpu") == 4 * cpu


def test_error_feedback_changes_only_layers_after_a_merged_one(tokenizer):
    """error_feedback: the first merged layer's inputs are still the original model's, so the gap it adds to its
    targets is exactly zero and its refit is the plain one, bit for bit; the layer after it fits the merged model's
    inputs to corrected targets: another sample, another starting error."""
    from moemerge.execute.executor import Job, execute
    from moemerge.execute.source import ModelSource
    from moemerge.group.plan import LayerPlan, MergePlan

    windows = torch.randint(0, len(tokenizer), (8, 16), generator=torch.Generator().manual_seed(0))
    written, fits = {}, {}
    for feedback in (False, True):
        model = make_model("mixtral", vocab_size=len(tokenizer), seed=3)
        plan = MergePlan({l.index: LayerPlan(l.index, 8, [[0, 1], [2, 3], [4, 5], [6, 7]], [0, 2, 4, 6])
                          for l in moe_layers(model)})
        recipe = moemerge.Recipe.build(merge="fit", router="collapse", router_fit=True, error_feedback=feedback,
                                       train_batch_size=2, cache=False)
        fits[feedback] = execute(ModelSource(model), recipe, Job(windows=windows, plan=plan, progress=False)).router_fit
        written[feedback] = [(l.router_weight.detach().clone(), *[t.clone() for t in l.expert_weights()])
                             for l in moe_layers(model)]
    first, *later = sorted(fits[False])
    assert fits[False][first] == fits[True][first]
    assert all(torch.equal(a, b) for a, b in zip(written[False][0], written[True][0]))
    assert later and all(fits[False][i]["before"] != fits[True][i]["before"] for i in later)


def test_error_feedback_needs_router_fit_and_is_not_sequential(model_dirs, text_file, tmp_path):
    with pytest.raises(ValueError, match="error_feedback only applies with router_fit"):
        moemerge.Recipe(merge="fit", router="collapse", error_feedback=True)
    recipe = moemerge.Recipe.build(model_path=str(model_dirs["mixtral"]), output_path=str(tmp_path / "o"),
                                   calibration=str(text_file), seq_len=32, n_sentences=4, num_average_groups=4,
                                   merge="fit", router="collapse", router_fit=True, error_feedback=True,
                                   sequential=True)
    with pytest.raises(moemerge.MoemergeError, match="error_feedback"):
        moemerge.run(recipe, progress=False)
    assert not (tmp_path / "o").exists()


def test_block_fit_needs_router_fit():
    with pytest.raises(ValueError, match="block_fit_steps only applies with router_fit"):
        moemerge.Recipe(merge="fit", router="collapse", block_fit_steps=10)


def test_report_lists_the_block_fit_when_there_is_one():
    from moemerge.evaluate.report_page import _router_fit_section

    base = {"before": 2.0, "after": 1.0, "held_out_before": 2.5, "held_out_after": 1.5, "rounds": 2, "rounds_kept": 1}
    assert "block fit" not in "\n".join(_router_fit_section({"0": base}))
    text = "\n".join(_router_fit_section({"0": {**base, "block_steps": 120, "block_kept": True},
                                         "1": {**base, "block_steps": 50, "block_kept": False}}))
    assert "block fit" in text and "120 steps, kept" in text and "50 steps, not kept" in text
