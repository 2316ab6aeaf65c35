"""``sequential: true``: layer-by-layer calibration and merging on the already-merged model."""

from __future__ import annotations

import pytest
import torch

import moemerge
from moemerge.errors import MoemergeError
from moemerge.families import moe_layers
from moemerge.loading import LoadedModel, fingerprint
from moemerge.pipeline import merge_model

from conftest import FAMILIES, make_model


def _loaded(model, tokenizer) -> LoadedModel:
    return LoadedModel(model, tokenizer, "in-memory", None, fingerprint(model, None, "in-memory"))


def _recipe(text_file, **kw) -> moemerge.Recipe:
    return moemerge.Recipe.build(dict(calibration=str(text_file), seq_len=32, n_sentences=6, cache=False,
                                      sequential=True), **kw)


@pytest.fixture(scope="module")
def probe_ids(tokenizer):
    return tokenizer("def fibonacci(n): And God said, Let there be light", return_tensors="pt")["input_ids"]


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("router", ["keep", "collapse"])
@pytest.mark.parametrize("merge", ["freq", "fit"])
def test_as_many_groups_as_experts_reproduces_logits(family, router, merge, tokenizer, text_file, probe_ids):
    model = make_model(family, vocab_size=len(tokenizer))
    before = _logits(model, probe_ids)
    num_experts = moe_layers(model)[0].num_experts
    result = merge_model(_loaded(model, tokenizer), _recipe(text_file, num_average_groups=num_experts,
                                                            router=router, merge=merge), progress=False)
    assert (_logits(model, probe_ids) - before).abs().max() <= 1e-5
    assert result.stats.meta["model_runs"] == 1  # one forward pass in total, sequential included


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_merges_every_layer_to_the_target(family, tokenizer, text_file, probe_ids):
    model = make_model(family, vocab_size=len(tokenizer))
    result = merge_model(_loaded(model, tokenizer), _recipe(text_file, num_average_groups=4, router="collapse",
                                                            merge="fit"), progress=False)
    assert set(result.plan.counts().values()) == {4}
    assert all(layer.num_experts == 4 for layer in moe_layers(model))
    assert torch.isfinite(_logits(model, probe_ids)).all()
    assert set(result.stats.layers) == {l.index for l in moe_layers(model)}  # frequencies kept for merge_info


def test_sequential_first_layer_equals_the_one_shot_merge(tokenizer, text_file, probe_ids):
    """Layer 0 sees the same hidden states either way, so its merged experts must be identical."""
    seq, one = make_model("mixtral", vocab_size=len(tokenizer)), make_model("mixtral", vocab_size=len(tokenizer))
    merge_model(_loaded(seq, tokenizer), _recipe(text_file, num_average_groups=4), progress=False)
    merge_model(_loaded(one, tokenizer), _recipe(text_file, num_average_groups=4, sequential=False), progress=False)
    a, b = moe_layers(seq)[0].expert_weights(), moe_layers(one)[0].expert_weights()
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_sequential_refuses_cross_layer_allocation(tokenizer, text_file):
    model = make_model("mixtral", vocab_size=len(tokenizer))
    with pytest.raises(MoemergeError, match="one layer at a time"):
        merge_model(_loaded(model, tokenizer), _recipe(text_file, num_average_groups=4, dynamic_group=True),
                     progress=False)
