"""``moemerge recommend``: candidates scored once on held-out calibration windows; the winner is a runnable recipe."""

from __future__ import annotations

import subprocess
import sys

import torch
import yaml

import moemerge
from moemerge.loading import load_model
from moemerge.recommend import held_out_windows


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moemerge.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_held_out_windows_are_disjoint_from_calibration(model_dirs, text_file):
    from moemerge.calibrate import calibration_windows
    from moemerge.pipeline import calibration_settings

    loaded = load_model(str(model_dirs["mixtral"]), "float32", "cpu")
    base = moemerge.Recipe.build(calibration=str(text_file), seq_len=32, n_sentences=8, num_average_groups=4)
    n_cal, held = held_out_windows(loaded.tokenizer, loaded.model.config, base)
    settings = calibration_settings(base.model_copy(update={"n_sentences": n_cal}), loaded.model.config)
    calib, _ = calibration_windows(loaded.tokenizer, settings)
    assert n_cal == 6 and held.shape == (2, 32)
    assert not any(torch.equal(h, c) for h in held for c in calib)


def test_recommend_prints_the_table_and_writes_a_runnable_recipe(model_dirs, text_file, tmp_path):
    recipe_file = tmp_path / "best.yaml"
    out = _cli("recommend", str(model_dirs["mixtral"]), "--num-average-groups", "4", "--output", str(recipe_file),
               "--calibration", str(text_file), "--seq-len", "32", "--n-sentences", "8", "--dtype", "float32",
               "--device", "cpu", "--candidates", "hc-smoe,hc-smoe+fit,frequency-prune", "-q")
    assert out.returncode == 0, out.stderr
    for name in ("hc-smoe", "hc-smoe+fit", "frequency-prune", "winner"):
        assert name in out.stdout
    data = yaml.safe_load(recipe_file.read_text())
    assert data["num_average_groups"] == 4 and data["n_sentences"] == 8
    merged = tmp_path / "merged"
    run = _cli("merge", "--recipe", str(recipe_file), "--output", str(merged), "--ppl", str(text_file),
               "--ppl-windows", "2", "-q")
    assert run.returncode == 0, run.stderr
    assert (merged / "config.json").exists()
