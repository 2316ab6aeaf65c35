"""Pruning baselines (issue 4): frequency-prune, output-prune, REAP; pruned checkpoints load in stock transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import moemerge
from moemerge.calibrate import CalibrationSettings
from moemerge.group.prune import PRUNE, prune_plan
from moemerge.loading import LoadedModel, fingerprint
from moemerge.pipeline import calibrate

from conftest import FAMILIES, make_model


def test_prune_plan_keeps_the_best_scores_and_drops_the_rest():
    plan = prune_plan(0, torch.tensor([0.1, 0.9, 0.0, 0.5, 0.5]), 3)
    assert plan.groups == [[1], [3], [4]] and plan.dropped == [0, 2]


@pytest.mark.parametrize("criterion", ["frequency", "output", "reap"])
def test_scores_match_a_hand_computation(criterion, tokenizer, text_file):
    model = make_model("qwen2_moe", vocab_size=len(tokenizer))
    loaded = LoadedModel(model, tokenizer, "in-memory", None, fingerprint(model, None, "in-memory"))
    stats = calibrate(loaded, CalibrationSettings(str(text_file), 2, 16, 2, 0, False),
                      ["frequency", "routed_output_norm"], progress=False)
    s = stats.get(0, "routed_output_norm")
    scores = PRUNE.get(criterion).score(stats, 0)
    expected = {"frequency": stats.frequency(0).double(),
                "output": s["norm_sum"] / s["counts"].clamp_min(1),
                "reap": s["weighted_norm_sum"] / s["counts"].clamp_min(1)}[criterion]
    assert torch.allclose(scores, expected.double())
    if criterion == "reap":  # REAP ≤ output norm: gate values are at most one
        assert (scores <= PRUNE.get("output").score(stats, 0) + 1e-9).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", ["frequency-prune", "output-prune", "reap"])
def test_pruned_model_drops_experts_and_loads_in_stock_transformers(family, preset, model_dirs, text_file, tmp_path):
    out = tmp_path / "pruned"
    recipe = moemerge.Recipe.load(preset, model_path=str(model_dirs[family]), output_path=str(out),
                                  calibration=str(text_file), seq_len=32, n_sentences=4, ppl=[str(text_file)],
                                  ppl_windows=2, dtype="float32", num_average_groups=5, report=False, fidelity=False)
    result = moemerge.run(recipe, progress=False)
    assert all(len(lp.dropped) == 3 for lp in result.plan.layers.values())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for layer in moe_layers_of(reloaded):
        assert layer.experts.gate_up_proj.shape[0] == 5 and layer.router.weight.shape[0] == 5
    assert result.parameters_after < result.parameters_before


def moe_layers_of(model):
    from moemerge.families import moe_layers

    return moe_layers(model)


def test_pruning_with_router_keep_is_refused_early(model_dirs, text_file, tmp_path):
    with pytest.raises(moemerge.MoemergeError, match="router=collapse"):
        moemerge.Recipe.load("reap", router="keep")
