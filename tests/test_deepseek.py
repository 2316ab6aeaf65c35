"""DeepSeek-V2 / V3 layouts (shared experts, dense first layer, routed scaling, V3's sigmoid scores with a
score-correction bias and group-limited choice): what works, and the one-line refusals for what cannot."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moemerge
from moemerge.families import family_of, moe_layers


def _tiny(version: str, vocab_size: int, n_group: int):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                  num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8,
                  n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=n_group, topk_group=1,
                  max_position_embeddings=128, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                  qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.0, bos_token_id=1, eos_token_id=2,
                  pad_token_id=3)
    if version == "v2":
        cfg = DeepseekV2Config(**common, topk_method="greedy" if n_group == 1 else "group_limited_greedy")
        model = DeepseekV2ForCausalLM(cfg)
    else:
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**common, norm_topk_prob=True))
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.weight.normal_(0, 0.5)
            if hasattr(layer.router, "e_score_correction_bias"):
                layer.router.e_score_correction_bias.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=[("v2", 1), ("v3", 1), ("v3", 2)], ids=["v2", "v3", "v3-grouped"])
def deepseek_dir(request, tmp_path_factory, tokenizer):
    version, n_group = request.param
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp(f"deepseek-{version}-{n_group}")
    _tiny(version, len(tokenizer), n_group).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return version, n_group, d


def _recipe(d, text_file, out, **kw):
    return moemerge.Recipe.build(dict(model_path=str(d), output_path=str(out), calibration=str(text_file),
                                      seq_len=32, n_sentences=6, ppl=["none"], dtype="float32", fidelity=False,
                                      report=False), **kw)


def test_moe_layers_skip_the_dense_first_layer(deepseek_dir):
    _, _, d = deepseek_dir
    model = AutoModelForCausalLM.from_pretrained(d)
    assert [layer.index for layer in moe_layers(model)] == [1, 2]
    assert family_of(model.config).num_experts(model.config) == 8


def test_keep_with_all_groups_is_exact_and_merging_reloads(deepseek_dir, text_file, tmp_path, tokenizer):
    _, _, d = deepseek_dir
    ids = tokenizer("def fibonacci(n): And God said", return_tensors="pt")["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    same = moemerge.run(_recipe(d, text_file, tmp_path / "same", num_average_groups=8), progress=False)
    merged = moemerge.run(_recipe(d, text_file, tmp_path / "merged", num_average_groups=4), progress=False)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(same.saved.path, dtype=torch.float32)(input_ids=ids).logits
        b = reference(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-5
    assert merged.plan.counts() == {1: 4, 2: 4}


def test_collapse_and_pruning_follow_the_expert_groups(deepseek_dir, text_file, tmp_path):
    version, n_group, d = deepseek_dir
    out = tmp_path / "small"
    for recipe in (_recipe(d, text_file, out, num_average_groups=4, router="collapse"),
                   moemerge.Recipe.load("reap", **_recipe(d, text_file, out, num_average_groups=4,
                                                          overwrite=True).model_dump(exclude_defaults=True))):
        result = moemerge.run(recipe, progress=False)
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert family_of(model.config).num_experts(model.config) == 4
        assert model.config.n_group == n_group  # the routing groups stay valid
        if version == "v3":
            assert moe_layers(model)[0].router.e_score_correction_bias.shape == (4,)
        assert result.parameters_after < result.parameters_before
        size = 8 // n_group  # every merged group stays inside one routing group, each routing group keeps 4/n_group
        for plan in result.plan.layers.values():
            assert all(len({e // size for e in g}) == 1 for g in plan.groups)
            assert [g[0] // size for g in plan.groups] == sorted(b for b in range(n_group) for _ in range(4 // n_group))


def test_router_refit_runs_with_the_family_routing(deepseek_dir, text_file, tmp_path):
    _, _, d = deepseek_dir
    result = moemerge.run(_recipe(d, text_file, tmp_path / "o", num_average_groups=4, router="collapse",
                                  router_fit=True), progress=False)
    assert set(result.router_fit) == {1, 2}
    assert all(v["after"] <= v["before"] for v in result.router_fit.values())


@pytest.mark.parametrize("fmt", ["mapped", "lowrank"])
def test_formats_with_shipped_code_run_end_to_end(deepseek_dir, text_file, tmp_path, fmt):
    """``mapped`` / ``lowrank`` through the streamed pipeline (written, read back and checked layer by layer by
    ``run``), with per-layer counts (``dominant: frequency``); every router row and correction bias stays, so
    group-limited routing (the v3-grouped case, ``n_group = 2``) is untouched."""
    _, n_group, d = deepseek_dir
    extra = dict(merge="sub-moe", rank_ratio=0.5) if fmt == "lowrank" else {}
    out = tmp_path / "o"
    result = moemerge.run(_recipe(d, text_file, out, num_average_groups=4, router=fmt, dominant="frequency",
                                  **extra), progress=False)
    assert result.parameters_after < result.parameters_before
    from moemerge.save.remote.registered import register_folder

    register_folder(out)  # moemerge's own mapped model types

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.model_type.endswith("_mapped") and model.config.n_group == n_group
    assert set(model.config.expert_map) == {"1", "2"}
    spec = family_of(AutoConfig.from_pretrained(d))  # the stock family of the mapped model
    for layer in spec.moe_layers(model):
        assert layer.router_weight.shape[0] == 8 and max(layer.experts.expert_map_list) < 8
