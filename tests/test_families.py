"""Every registered family (driven by the family registry, not a list here): the identities and the stock reload
hold, on a tiny random model built from the family's registered tiny config."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import moemerge
from moemerge.families import FAMILIES, family_of, moe_layers, tiny_model


@pytest.fixture(scope="module", params=FAMILIES.names())
def family_dir(request, tmp_path_factory, tokenizer):
    """Every registered family, as a tiny random checkpoint built from the registry's own tiny config."""
    d = tmp_path_factory.mktemp(request.param)
    tiny_model(request.param, len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return request.param, d


def _recipe(d, text_file, out, **kw):
    return moemerge.Recipe.build(dict(model_path=str(d), output_path=str(out), calibration=str(text_file),
                                      seq_len=32, n_sentences=6, ppl=["none"], dtype="float32", fidelity=False,
                                      report=False), **kw)


def test_family_is_recognised(family_dir):
    family, d = family_dir
    model = AutoModelForCausalLM.from_pretrained(d)
    assert family_of(model.config).name == family and len(moe_layers(model)) == 2
    assert FAMILIES.get(family).num_experts(model.config) == 8


@pytest.mark.parametrize("router", ["keep", "collapse"])
def test_all_groups_reproduce_logits_and_reload(family_dir, text_file, tmp_path, tokenizer, router):
    _, d = family_dir
    ids = tokenizer("def fibonacci(n): And God said", return_tensors="pt")["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    result = moemerge.run(_recipe(d, text_file, tmp_path / "same", num_average_groups=8, router=router),
                          progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(result.saved.path, dtype=torch.float32)
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max() <= 1e-5


def test_collapsed_merge_shrinks_and_reloads_stock(family_dir, text_file, tmp_path):
    family, d = family_dir
    spec = FAMILIES.get(family)
    out = tmp_path / "small"
    result = moemerge.run(_recipe(d, text_file, out, num_average_groups=4, router="collapse"), progress=False)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert family_of(model.config).num_experts(model.config) == 4
    assert result.parameters_after < result.parameters_before
    saved = json.loads((out / "config.json").read_text())
    original = json.loads((d / "config.json").read_text())
    assert {k for k in original if original[k] != saved.get(k)} <= set(spec.num_experts_keys)
