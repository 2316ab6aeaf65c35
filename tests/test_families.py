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


def test_routing_statistics_equal_the_family_router(family_dir, text_file):
    """Calibration (the executor's layer-by-layer walk) counts exactly the experts the family's own router picks when
    the stock model runs on the same windows."""
    from moemerge.calibrate import CalibrationSettings, calibration_windows
    from moemerge.pipeline import calibrate

    _, d = family_dir
    loaded = moemerge.load_model(str(d), dtype="float32", device="cpu")
    settings = CalibrationSettings(str(text_file), n_sentences=4, seq_len=32, train_batch_size=2, use_cache=False)
    stats = calibrate(loaded, settings, ["frequency"], progress=False)
    windows, _ = calibration_windows(loaded.tokenizer, settings)
    counts, handles = {}, []
    for layer in moe_layers(loaded.model):
        def hook(module, args, output, layer=layer):
            counts[layer.index] = counts.get(layer.index, 0) + torch.bincount(output[2].flatten(),
                                                                               minlength=layer.num_experts)
        handles.append(layer.router.register_forward_hook(hook))
    with torch.no_grad():
        loaded.model(input_ids=windows)
    for h in handles:
        h.remove()
    for li, c in counts.items():
        assert torch.equal(stats.get(li, "frequency")["counts"].long(), c.long())


FORMAT_CASES = {"keep": dict(router="keep"), "compact": dict(router="compact"),
                "padded": dict(router="padded", dominant="frequency"),
                "prune": dict(router="compact", prune="reap", merge="freq"),
                "mapped": dict(router="mapped"),
                "lowrank": dict(router="lowrank", merge="sub-moe", rank_ratio=0.5)}
REMOTE = ("mapped", "lowrank")


@pytest.mark.parametrize("fmt", list(FORMAT_CASES))
def test_half_merge_in_every_format_reloads(family_dir, text_file, tmp_path, tokenizer, fmt):
    """8 → 4 experts per layer in each format reloads with zero missing or unexpected keys and gives the in-memory
    merged model's logits: stock formats with stock ``from_pretrained``; ``mapped`` / ``lowrank`` (model type
    ``<family>_mapped``, one shipped modeling implementation for every family) through moemerge's registered
    classes, with only the merged experts stored."""
    family, d = family_dir
    recipe = _recipe(d, text_file, tmp_path / "o", num_average_groups=4, **FORMAT_CASES[fmt])
    loaded = moemerge.load_model(str(d), dtype="float32", device="cpu")
    result = moemerge.merge_model(loaded, recipe, progress=False)
    counts = result.plan.counts()
    assert sum(counts.values()) == 4 * len(counts)  # padded: non-uniform counts, padded to the largest
    assert fmt == "padded" or set(counts.values()) == {4}
    out = tmp_path / "saved"
    original = json.loads((d / "config.json").read_text())
    moemerge.save_checkpoint(loaded.model, tokenizer, out, original)
    if fmt in REMOTE:
        from moemerge.save.remote.registered import register_folder

        register_folder(out)  # moemerge's own mapped model types
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = tokenizer("def fibonacci(n): And God said, Let there be light", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - loaded.model(input_ids=ids).logits).abs().max() <= 1e-5
    if fmt in REMOTE:
        saved = json.loads((out / "config.json").read_text())
        assert saved["model_type"] == original["model_type"] + "_mapped"
        assert saved["architectures"] == [type(reloaded).__name__] and type(reloaded).__name__.endswith(
            "MappedForCausalLM")
        assert set(saved["expert_map"]) == {str(v.index) for v in moe_layers(loaded.model)}
        assert ("expert_ranks" in saved) == (fmt == "lowrank")
        for layer in family_of(loaded.model.config).moe_layers(reloaded):  # only the merged experts are stored
            assert len(layer.router_weight) == 8
            assert max(layer.experts.expert_map_list) + 1 == 4
