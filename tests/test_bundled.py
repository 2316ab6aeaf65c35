"""End to end on the bundled, trained tiny models and text (what `moemerge demo` and the README promise)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import moemerge
from moemerge import zoo
from moemerge.calibrate import CalibrationSettings
from moemerge.data import load_text
from moemerge.families import family_of
from moemerge.pipeline import calibrate


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_bundled_model_is_small_balanced_and_servable(name):
    path = zoo.model_path(name)
    assert sum(f.stat().st_size for f in path.iterdir()) <= 10 * 2**20
    config = json.loads((path / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] in (32, 64)  # vLLM CPU head sizes
    loaded = moemerge.load_model(str(path), dtype="float32")
    stats = calibrate(loaded, CalibrationSettings("bundled:validation", n_sentences=8, seq_len=256), ["frequency"],
                      progress=False)
    top_k = family_of(loaded.model.config).top_k(loaded.model.config)
    for layer in stats.layers:
        share = stats.frequency(layer)
        num_experts = share.numel()
        assert share.min() > 0.5 * top_k / num_experts, f"layer {layer} has a starved expert: {share}"


def test_bundled_corpus_has_three_domains_in_every_split():
    for split in ("train", "validation", "test"):
        domains = {json.loads(line)["domain"] for line in zoo.corpus_path(split).read_text().splitlines()}
        assert domains == {"bible", "python-code", "python-docs"}
    assert len(load_text("bundled:test").docs) > 10


def test_demo_runs_offline_and_prints_the_table(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moemerge.cli", "demo", "-q", "--output", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "perplexity bundled:test" in proc.stdout and "weights on disk" in proc.stdout
    info = json.loads((tmp_path / "demo" / "merge_info.json").read_text())
    assert set(info["experts_per_layer"].values()) == {8}
    from transformers import AutoModelForCausalLM

    model, loading = AutoModelForCausalLM.from_pretrained(tmp_path / "demo", output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
