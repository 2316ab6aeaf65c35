"""``torchrun --nproc-per-node 2 -m moemerge merge ...`` on CPU (gloo): the same plan and the same merged tensors as
one process on the same windows, and a killed rank ends the job with nothing written."""

from __future__ import annotations

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

ARGS = ["--num-average-groups", "4", "--n-sentences", "8", "--seq-len", "32", "--train-batch-size", "2",
        "--ppl-windows", "4", "--dtype", "float32", "--no-cache", "-q"]


def _merge(model: Path, out: Path, text: Path, ranks: int, *extra: str, env: dict | None = None,
           wait: bool = True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                "--master-port", str(29500 + os.getpid() % 1000)] if ranks > 1 else [sys.executable]
    cmd = [*launcher, "-m", "moemerge", "merge", str(model), "-o", str(out), "--calibration", str(text),
           "--ppl", str(text), *ARGS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("recipe", [
    [],  # HC-SMoE: per-layer plan
    ["--recipe", "moemerge", "--router", "mapped"],  # global distance threshold over all layers + fit
    ["--recipe", "sub-moe", "--merge", "fit"],  # Sub-MoE multi-layer allocation + fit
    # refit sample in window order (each rank corrects its own share), held out; block fit broadcast from rank 0
    ["--merge", "fit", "--router", "compact", "--router-fit", "--block-fit-steps", "20", "--error-feedback"],
], ids=["per-layer", "global-threshold+fit", "multi-layer+fit", "compact+router-fit+block-fit"])
def test_two_ranks_equal_one(recipe, model_dirs, text_file, tmp_path):
    one = _merge(model_dirs["qwen2_moe"], tmp_path / "one", text_file, 1, *recipe)
    two = _merge(model_dirs["qwen2_moe"], tmp_path / "two", text_file, 2, *recipe)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    info1, info2 = (json.loads((tmp_path / n / "merge_info.json").read_text()) for n in ("one", "two"))
    assert info1["plan"] == info2["plan"]  # identical grouping
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for key in a:
        scale = a[key].abs().max().clamp_min(1e-12)
        assert ((a[key] - b[key]).abs().max() / scale) <= 1e-6, key
    e1, e2 = (json.loads((tmp_path / n / "eval.json").read_text()) for n in ("one", "two"))
    for name, value in e1["perplexity"]["after"].items():
        assert e2["perplexity"]["after"][name] == pytest.approx(value, rel=1e-6)


def _rank_pid(env_key: str, env_value: str, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(e.split("=", 1) for e in (proc / "environ").read_text().split("\0") if "=" in e)
        except OSError:
            continue
        if env.get(env_key) == env_value and env.get("RANK") == str(rank) and "LOCAL_RANK" in env:
            return int(proc.name)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process through /proc")
def test_a_killed_rank_ends_the_job_with_nothing_written(model_dirs, text_file, tmp_path):
    out = tmp_path / "out"
    tag = str(tmp_path)
    proc = _merge(model_dirs["mixtral"], out, text_file, 2, "--n-sentences", "64", "--seq-len", "64",
                  env={"MOEMERGE_TEST_TAG": tag, "MOEMERGE_DIST_TIMEOUT": "60"}, wait=False)
    deadline = time.time() + 120
    victim = None
    while time.time() < deadline and (victim is None or not list(tmp_path.glob(".out.tmp-*"))):
        victim = victim or _rank_pid("MOEMERGE_TEST_TAG", tag, 1)
        time.sleep(0.05)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
