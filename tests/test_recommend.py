"""``moemerge recommend``: candidates scored once on held-out calibration windows; the winner is a runnable recipe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

import moemerge
from moemerge.loading import load_model
from moemerge.recommend import held_out_windows


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moemerge.cli", *args], capture_output=True, text=True,
                          timeout=300)


def _table_lines(stdout: str) -> list[str]:
    """The printed tables and notes (the file paths echoed after them are as long as the user's paths)."""
    return [line for line in stdout.splitlines() if not line.startswith(("wrote ", "all trials: "))]


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
    # few tokens for a fit: said once, of what the written recipe calibrates on (the trials use 3/4 of it)
    said = [line for line in out.stderr.splitlines() if "the fitted merges learn from them" in line]
    assert len(said) == 1 and "8 windows × 32 tokens" in said[0], out.stderr
    assert max(len(line) for line in _table_lines(out.stdout)) <= 80
    data = yaml.safe_load(recipe_file.read_text())
    assert data["num_average_groups"] == 4 and data["n_sentences"] == 8
    assert data["router"] in ("mapped", "collapse")  # the format that realises the size, never keep
    merged = tmp_path / "merged"
    run = _cli("merge", "--recipe", str(recipe_file), "--output", str(merged), "--ppl", str(text_file),
               "--ppl-windows", "2", "-q")
    assert run.returncode == 0, run.stderr
    assert (merged / "config.json").exists()


def test_several_budgets_in_a_stock_format(model_dirs, text_file, tmp_path):
    """``--format compact``: merges compete collapsed, recipes with uneven counts are listed as not compared; one
    recipe per budget, every trial in JSON, the frontier plot."""
    out = _cli("recommend", str(model_dirs["mixtral"]), "--num-average-groups", "4,3", "--format", "compact",
               "--output", str(tmp_path / "best.yaml"), "--calibration", str(text_file), "--seq-len", "32",
               "--n-sentences", "8", "--dtype", "float32", "--device", "cpu",
               "--candidates", "hc-smoe,moemerge,frequency-prune", "-q")
    assert out.returncode == 0, out.stderr
    assert "moemerge: not compared (uneven counts per layer" in out.stdout
    assert max(len(line) for line in _table_lines(out.stdout)) <= 80
    for budget in (4, 3):
        data = yaml.safe_load((tmp_path / f"best-{budget}.yaml").read_text())
        assert data["num_average_groups"] == budget and data["router"] == "collapse"
    trials = json.loads((tmp_path / "best-trials.json").read_text())["trials"]
    assert {(t["name"], t["budget"]) for t in trials} == {(n, b) for n in ("hc-smoe", "moemerge", "frequency-prune")
                                                          for b in (4, 3)}
    assert all(t["format"] == "compact" for t in trials)
    assert (tmp_path / "best-frontier.png").stat().st_size > 0


def test_a_trial_recipe_reproduces_its_reported_figure(model_dirs, text_file, tmp_path):
    """The checkpoint a trial's recipe writes, reloaded, scores the held-out perplexity the table reported."""
    from moemerge.evaluate.perplexity import perplexity
    from moemerge.recommend import recommend

    base = moemerge.Recipe.build(calibration=str(text_file), seq_len=32, n_sentences=8, num_average_groups=4,
                                 dtype="float32", device="cpu")
    trials, winners = recommend(str(model_dirs["qwen2_moe"]), base, ["hc-smoe+fit"])
    trial = winners[4]
    assert trial.format == "mapped" and trial.parameters < sum(
        p.numel() for p in load_model(str(model_dirs["qwen2_moe"]), "float32", "cpu").model.parameters())
    out = tmp_path / "merged"
    from moemerge.pipeline import run

    run(trial.trial_recipe.model_copy(update={"output_path": str(out), "ppl": ["none"], "report": False}),
        progress=False)
    reloaded = load_model(str(out), "float32", "cpu", require_moe=False)
    _, held = held_out_windows(reloaded.tokenizer, reloaded.model.config, base)
    assert abs(perplexity(reloaded.model, held, progress=False) / trial.ppl - 1) < 1e-4
    assert sum(p.numel() for p in reloaded.model.parameters()) == trial.parameters


def test_candidates_are_written_in_the_format_that_realises_their_size():
    from moemerge.recommend import CANDIDATES, in_format

    refit = CANDIDATES["hc-smoe+fit+rfit"]
    assert in_format(refit, "mapped")["router"] == "mapped"  # the refit follows the format it can be written in
    assert in_format(refit, "compact")["router"] == "collapse"
    assert in_format(refit, "padded")["router"] == "collapse"  # padded has no refit: compact
    assert all(in_format(CANDIDATES["reap"], f)["router"] == "collapse" for f in ("mapped", "compact", "padded"))
    assert isinstance(in_format(CANDIDATES["sub-moe-dagger"], "compact"), str)


def test_a_block_fit_too_slow_for_the_device_is_not_compared_unless_named(model_dirs, text_file, monkeypatch):
    """Candidates with ``block_fit_steps`` whose estimated time is over the limit are listed with the reason, not
    run; named in ``--candidates`` they run."""
    import moemerge.recommend as rec

    base = moemerge.Recipe.build(calibration=str(text_file), seq_len=32, n_sentences=8, num_average_groups=4,
                                 dtype="float32", device="cpu")
    monkeypatch.setattr(rec, "BLOCK_FIT_LIMIT_S", 0.0)
    monkeypatch.setattr(rec, "CANDIDATES", {k: rec.CANDIDATES[k] for k in ("frequency-prune", "moemerge+bfit")})
    trials, _ = rec.recommend(str(model_dirs["mixtral"]), base)
    slow = next(t for t in trials if t.name == "moemerge+bfit")
    assert slow.error.startswith("block fit would take about") and "--candidates" in slow.error
    trials, winners = rec.recommend(str(model_dirs["mixtral"]), base, ["moemerge+bfit"])
    steps = rec.CANDIDATES["moemerge+bfit"]["block_fit_steps"]
    assert trials[0].error is None and trials[0].trial_recipe.block_fit_steps == steps


def test_a_trial_scores_more_texts_in_the_same_walk(model_dirs, text_file):
    """``score_trial(..., more=...)``: every named text is scored by the same merged layers as the held-out one (the
    cross-domain block of ``scripts/compare.py`` scores a text-free recipe on every domain in one walk)."""
    from moemerge.loading import open_checkpoint
    from moemerge.recommend import Trial, score_trial

    ckpt = open_checkpoint(str(model_dirs["mixtral"]))
    recipe = moemerge.Recipe.build(model_path=str(model_dirs["mixtral"]), calibration=str(text_file), seq_len=32,
                                   n_sentences=8, num_average_groups=4, dtype="float32", device="cpu")
    held = torch.randint(0, ckpt.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0))
    other = torch.randint(0, ckpt.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    trial = score_trial(ckpt, Trial("hc-smoe", 4, recipe, recipe), held, more={"same": held, "other": other})
    assert trial.error is None and set(trial.ratios_on) == {"same", "other"}
    assert trial.ratios_on["same"] == pytest.approx(trial.ppl_ratio, rel=1e-6)
    alone = score_trial(ckpt, Trial("hc-smoe", 4, recipe, recipe), other)
    assert trial.ratios_on["other"] == pytest.approx(alone.ppl_ratio, rel=1e-5)
