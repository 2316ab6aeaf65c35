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
    refit_downs,
    refit_layer,
    ridge_steps,
    routed_from,
    routed_target,
    sample_tokens,
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


def test_refit_of_an_unmerged_layer_changes_nothing():
    """Identity: a layer whose experts already give the target (nothing merged) keeps its router and experts."""
    model = make_model("qwen2_moe", seed=1)
    layer = moe_layers(model)[0]
    hidden = torch.randn(400, model.config.hidden_size)
    weights, index = _routing(layer, hidden, model.config)
    target = routed_from(weights, index, layer.run_experts(hidden))
    rows, down = layer.router_weight.detach().clone(), layer.expert_weights()[1].clone()
    held = torch.arange(400) % 4 == 0
    info = refit_layer(layer, (hidden, target, held), model.config)
    assert info["before"] < 1e-10 and info["rounds_kept"] == 0
    assert torch.equal(layer.router_weight, rows) and torch.equal(layer.expert_weights()[1], down)


def test_sample_holds_out_whole_windows():
    model = make_model("mixtral")
    layer = moe_layers(model)[0]
    sample = RoutedOutputSample(layer, max_tokens=10_000, held_out=0.25)

    class Batch:  # 8 windows of 5 tokens, routed to expert 0
        num_tokens = 40
        hidden = torch.randn(40, model.config.hidden_size)

        @staticmethod
        def routed_weights():
            return torch.nn.functional.one_hot(torch.zeros(40, dtype=torch.long), 8).T.float()

    sample.start_batch(torch.arange(8))
    sample.update(Batch)
    _, target, held = sample.result()
    assert held.view(8, 5).all(1).tolist() == [False, False, False, True] * 2  # every 4th window, whole
    assert torch.allclose(target, layer.run_experts(Batch.hidden)[0])


@pytest.mark.parametrize("family,fmt", [("mixtral", "collapse"), ("qwen2_moe", "collapse"), ("mixtral", "mapped")])
def test_refit_never_ends_worse_and_stops_on_held_out(family, fmt, tokenizer, text_file):
    """On the merged model the refit never ends above the start (all sample tokens, held-out tokens), stops within
    the cap and, after a collapse, lowers its objective."""
    model = make_model(family, vocab_size=len(tokenizer), seed=2)
    loaded = LoadedModel(model, tokenizer, "in-memory", None, fingerprint(model, None, "in-memory"))
    recipe = moemerge.Recipe.build(calibration=str(text_file), seq_len=32, n_sentences=8, num_average_groups=4,
                                   merge="fit", router=fmt, router_fit=True, router_fit_rounds=4, cache=False)
    result = merge_model(loaded, recipe, progress=False)
    assert result.router_fit
    for info in result.router_fit.values():
        assert info["after"] <= info["before"]
        assert info["held_out_tokens"] > 0 and info["held_out_after"] <= info["held_out_before"]
        assert info["rounds_kept"] <= info["rounds"] <= 4
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
