"""The layer-by-layer executor: streamed from shards equals whole-model in memory, the checkpoint is written as
layers finish and checked without a second copy, bad shards and full disks are one-line errors, killed runs resume."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moemerge
from moemerge.execute.source import ModelSource, ShardSource
from moemerge.execute.trunk import Trunk, run_layer
from moemerge.loading import load_model
from moemerge.zoo import model_path

from conftest import FAMILIES, make_model

BASE = dict(n_sentences=4, seq_len=32, train_batch_size=2, dtype="float32", ppl_windows=2, report=False,
            fidelity=False)

# Every preset, and the merge methods and options that have their own passes, in the formats they can be saved in.
CASES = [
    ("hc-smoe", {"router": "keep"}),
    ("hc-smoe", {"router": "collapse"}),
    ("hc-smoe", {"router": "collapse", "merge": "fit", "router_fit": True}),
    ("hc-smoe", {"merge": "fit", "sequential": True}),
    ("hc-smoe", {"merge": "zipit", "mode": "all", "ingredient": "act+weight", "data_limit": 40}),
    ("hc-smoe", {"merge": "fix-dom-same", "router": "mapped"}),
    ("hc-smoe", {"merge": "weighted", "mode": "2,1", "cluster": "kmeans"}),
    ("moemerge", {"router": "mapped"}),
    ("moemerge", {"router": "mapped", "router_fit": True, "router_fit_rounds": 2}),
    ("moemerge", {"router": "padded"}),
    ("sub-moe", {}),
    ("sub-moe-dagger", {"multi_layer": 1}),
    ("m-smoe", {}),
    ("m-smoe", {"similarity_base": "weight", "router": "padded"}),
    ("hc-smoe", {"dynamic_group": True}),
    ("frequency-prune", {}),
    ("reap", {}),
]


def _state(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _in_memory(model_dir: Path, recipe: moemerge.Recipe) -> dict[str, torch.Tensor]:
    """The same recipe on the whole model in memory, then saved (hub names) for comparison."""
    loaded = load_model(str(model_dir), "float32", "cpu")
    moemerge.merge_model(loaded, recipe, progress=False)
    out = Path(recipe.output_path + "-memory")
    moemerge.save_checkpoint(loaded.model, loaded.tokenizer, out, json.loads((model_dir / "config.json").read_text()))
    return _state(out)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset, options", CASES, ids=[f"{p}-{'-'.join(f'{k}={v}' for k, v in o.items())}"
                                                         for p, o in CASES])
def test_streamed_equals_whole_model(family, preset, options, model_dirs, text_file, tmp_path):
    num = 4
    recipe = moemerge.Recipe.load(preset, model_path=str(model_dirs[family]), output_path=str(tmp_path / "out"),
                                  calibration=str(text_file), ppl=[str(text_file)], num_average_groups=num,
                                  cache=False, **BASE, **options)
    result = moemerge.run(recipe, progress=False)
    streamed = _state(result.saved.path)
    whole = _in_memory(model_dirs[family], recipe)
    assert streamed.keys() == whole.keys()
    for key, value in streamed.items():
        assert torch.equal(value, whole[key]), key


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen-moe"])
def test_bundled_streamed_equals_whole_model(name, tmp_path):
    recipe = moemerge.Recipe.load("moemerge", model_path=str(model_path(name)), output_path=str(tmp_path / "out"),
                                  calibration="bundled", ppl=["bundled:validation"], num_average_groups=4,
                                  router="mapped", cache=False, **{**BASE, "seq_len": 64, "n_sentences": 8})
    result = moemerge.run(recipe, progress=False)
    assert result.ppl_after["bundled:validation"] > 0
    streamed = _state(result.saved.path)
    whole = _in_memory(model_path(name), recipe)
    assert streamed.keys() == whole.keys() and all(torch.equal(v, whole[k]) for k, v in streamed.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_forward_is_the_model_forward(family, model_dirs):
    """Trunk + one layer at a time from the shards gives the logits of the whole model, bit for bit."""
    ids = torch.randint(0, 200, (2, 24))
    source = ShardSource(model_dirs[family], dtype=torch.float32)
    trunk = Trunk(source.model)
    hidden, calls = trunk.layer_inputs(ids)
    with torch.no_grad():
        for i in range(source.num_layers):
            hidden = run_layer(source.layer(i), hidden, calls[i])
            source.release(i)
        logits = trunk.logits(ids, hidden)
    source.close()
    model = load_model(str(model_dirs[family]), "float32", "cpu").model
    with torch.no_grad():
        assert torch.equal(logits, model(input_ids=ids).logits)
    assert all(p.device.type == "meta" for p in source.layers.parameters())  # every layer freed


def test_in_memory_source_uses_the_model_itself(tokenizer):
    model = make_model("mixtral", vocab_size=len(tokenizer))
    source = ModelSource(model)
    assert source.layer(0) is model.model.layers[0] and source.resident


def test_output_shards_stay_under_the_limit_and_reload(model_dirs, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = moemerge.Recipe.load("hc-smoe", model_path=str(model_dirs["qwen2_moe"]), output_path=str(tmp_path / "o"),
                                  calibration=str(text_file), ppl=["none"], num_average_groups=4, router="collapse",
                                  cache=False, max_shard_size="40KB", **BASE)
    out = moemerge.run(recipe, progress=False).saved.path
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    assert all(s.stat().st_size <= 40_000 + 4096 for s in shards if len(load_file(s)) > 1)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_merge_info_recipe_reproduces_the_checkpoint(model_dirs, text_file, tmp_path):
    first = moemerge.run(moemerge.Recipe.load("moemerge", model_path=str(model_dirs["mixtral"]),
                                              output_path=str(tmp_path / "a"), calibration=str(text_file),
                                              num_average_groups=4, router="mapped", **BASE), progress=False)
    again = moemerge.Recipe.load(str(first.saved.path / "merge_info.json"), output_path=str(tmp_path / "b"))
    assert again.merge == "fit" and again.hierarchical_stopping_metric == "distance"
    second = moemerge.run(again, progress=False)
    a, b = _state(first.saved.path), _state(second.saved.path)
    assert a.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in a.items())


# ---- bad input -----------------------------------------------------------------------------------------------------
def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moemerge.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def sharded(tmp_path, tokenizer):
    """A tiny Qwen2-MoE saved in several shards."""
    d = tmp_path / "sharded"
    make_model("qwen2_moe", vocab_size=len(tokenizer)).save_pretrained(d, max_shard_size="100KB")
    tokenizer.save_pretrained(d)
    assert len(list(d.glob("*.safetensors"))) > 2
    return d


def _merge_args(model: Path, out: Path, text_file: Path) -> list[str]:
    return ["merge", str(model), "-o", str(out), "--num-average-groups", "4", "--calibration", str(text_file),
            "--n-sentences", "4", "--seq-len", "32", "--ppl", "none", "-q"]


def _no_output(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_missing_shard_is_one_line(sharded, text_file, tmp_path):
    victim = sorted(sharded.glob("*.safetensors"))[1]
    victim.unlink()
    r = _cli(*_merge_args(sharded, tmp_path / "out", text_file))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and victim.name in r.stderr and "missing" in r.stderr
    assert _no_output(tmp_path / "out")


def test_truncated_shard_is_one_line(sharded, text_file, tmp_path):
    victim = sorted(sharded.glob("*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2])
    r = _cli(*_merge_args(sharded, tmp_path / "out", text_file))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and victim.name in r.stderr and "truncated" in r.stderr
    assert _no_output(tmp_path / "out")


def test_full_disk_while_writing_is_one_line_and_leaves_nothing(model_dirs, text_file, tmp_path, monkeypatch):
    from moemerge.execute import sink

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sink, "save_file", full)
    out = tmp_path / "out"
    recipe = moemerge.Recipe.build(model_path=str(model_dirs["mixtral"]), output_path=str(out),
                                   calibration=str(text_file), num_average_groups=4, ppl=["none"], **BASE)
    with pytest.raises(moemerge.MoemergeError, match="disk .* is full"):
        moemerge.run(recipe, progress=False)
    assert _no_output(out)


def test_killed_run_resumes_from_the_cached_layers(tmp_path):
    """SIGKILL in the middle of the walk: the rerun clears the dead run's temporary folder and takes the statistics
    of the layers already done from the cache."""
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    env = {**os.environ, "MOEMERGE_CACHE": str(cache)}
    args = [sys.executable, "-m", "moemerge.cli", "merge", str(model_path("tiny-mixtral")), "-o", str(out),
            "--num-average-groups", "4", "--calibration", "bundled", "--n-sentences", "48", "--seq-len", "128",
            "--ppl", "none", "-q", "--dtype", "float32"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    # meta.json is written once layer 0's last statistic is: waiting for the first statistic's file alone raced
    # with the kill (layer 0 half cached, so recomputed and not listed as from the cache)
    while time.time() < deadline and not list(cache.glob("stats/*/meta.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(cache.glob("stats/*/layer-0/*.safetensors")), "layer 0 was never cached"
    assert not out.exists()
    done = subprocess.run(args + ["--result-path", str(tmp_path / "eval.json")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    info = json.loads((out / "merge_info.json").read_text())
    assert 0 in info["calibration"]["layers_from_cache"]
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_tensors_the_model_does_not_use_are_ignored_as_from_pretrained_does(model_dirs, text_file, tmp_path):
    """Old checkpoints store rotary tables per layer; like from_pretrained, the streamed reader leaves them out."""
    import shutil

    from safetensors.torch import save_file

    d = tmp_path / "extra"
    shutil.copytree(model_dirs["mixtral"], d)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    recipe = moemerge.Recipe.build(model_path=str(d), output_path=str(tmp_path / "out"), calibration=str(text_file),
                                   num_average_groups=4, ppl=["none"], **BASE)
    out = moemerge.run(recipe, progress=False).saved.path
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in _state(out)
