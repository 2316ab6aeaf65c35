"""The other registered families with the fused-experts layout (OLMoE, Qwen3-MoE): the identities and the stock
reload hold for them too, built from tiny random configs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import moemerge
from moemerge.families import family_of, moe_layers


def _tiny(family: str, vocab_size: int):
    from transformers import OlmoeConfig, OlmoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                  num_experts=8, num_experts_per_tok=2)
    if family == "olmoe":
        model = OlmoeForCausalLM(OlmoeConfig(**common, intermediate_size=24, norm_topk_prob=False))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, moe_intermediate_size=24, intermediate_size=64,
                                                   norm_topk_prob=True, head_dim=16))
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.weight.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module", params=["olmoe", "qwen3_moe"])
def family_dir(request, tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp(request.param)
    _tiny(request.param, len(tokenizer)).save_pretrained(d)
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
    out = tmp_path / "small"
    result = moemerge.run(_recipe(d, text_file, out, num_average_groups=4, router="collapse"), progress=False)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert family_of(model.config).num_experts(model.config) == 4
    assert result.parameters_after < result.parameters_before
    saved = json.loads((out / "config.json").read_text())
    original = json.loads((d / "config.json").read_text())
    assert {k for k in original if original[k] != saved.get(k)} <= {"num_experts", "num_local_experts"}
