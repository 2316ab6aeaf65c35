"""``self_calibration``: calibration windows sampled from the model itself (calibrate/self_text.py)."""

from __future__ import annotations

import json

import pytest
import torch

import moemerge
from moemerge.calibrate import CalibrationSettings, calibration_windows
from moemerge.calibrate.self_text import cached_sampler, carried, sample_windows, start_token
from moemerge.errors import MoemergeError
from moemerge.families import FAMILIES
from moemerge.loading import load_model
from moemerge.recommend import held_out_windows

from conftest import make_model


def test_windows_are_whole_chains_from_the_start_token_and_follow_the_seed(tokenizer):
    model = make_model("mixtral", vocab_size=len(tokenizer))
    start = start_token(tokenizer)
    state = torch.random.get_rng_state()
    a = sample_windows(model, start, count=5, seq_len=12, seed=3, chains=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left alone
    assert a.shape == (5, 12) and (a[:2, 0] == start).all()  # two chains, each opened by the start token
    carry = carried(12)
    for i in range(2, 5):  # window i continues window i - 2 of its chain, prompted by that window's tail
        assert torch.equal(a[i, :carry], a[i - 2, -carry:])
    assert torch.equal(a, sample_windows(model, start, count=5, seq_len=12, seed=3, chains=2))
    assert not torch.equal(a, sample_windows(model, start, count=5, seq_len=12, seed=4, chains=2))


def test_tokens_follow_the_models_own_distribution(tokenizer):
    """Temperature 1, no top-k / top-p: the first sampled token's counts fit the softmax of the model's logits after
    the start token (a hand computation) by a chi-square test, which rejects temperature 0.8 and top-50 sampling."""
    from scipy.stats import chisquare

    model = make_model("qwen2_moe", vocab_size=len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a peaked distribution (entropy ~4 nats): 4000 draws tell sampling rules apart
        logits = model(input_ids=torch.tensor([[start_token(tokenizer)]])).logits[0, -1].double()
    n = 4000
    first = sample_windows(model, start_token(tokenizer), count=n, seq_len=2, seed=0, chains=n)[:, 1]
    counts = torch.bincount(first, minlength=logits.numel()).double()
    p = torch.softmax(logits, -1)
    big = p * n >= 5  # the chi-square test's bins: every token expected 5 times, and the rest pooled

    def fits(q: torch.Tensor) -> float:
        pooled = lambda v: torch.cat([v[big], v[~big].sum()[None]]).numpy()  # noqa: E731
        return chisquare(pooled(counts), pooled(q * n)).pvalue

    top50 = torch.where(p >= p.topk(50).values[-1], p, 0.0)
    assert fits(p) > 1e-3
    assert fits(torch.softmax(logits / 0.8, -1)) < 1e-6 and fits(top50 / top50.sum()) < 1e-6


def test_share_of_sampled_windows_and_no_text_needed_for_all(tokenizer, text_file, tmp_path):
    calls = []

    def sample(count, seq_len, seed):
        calls.append((count, seq_len, seed))
        return torch.full((count, seq_len), 7)

    settings = CalibrationSettings(str(text_file), n_sentences=8, seq_len=16, seed=1, self_calibration=0.25)
    wins, described = calibration_windows(tokenizer, settings, sample)
    assert wins.shape == (8, 16) and calls == [(2, 16, 1)]
    assert (wins[6:] == 7).all() and not (wins[:6] == 7).all()
    assert "2 windows sampled from the model" in described
    text_only, _ = calibration_windows(tokenizer, CalibrationSettings(str(text_file), 6, 16, seed=1))
    assert torch.equal(wins[:6], text_only)  # the text part is the text-only draw of 6 windows

    nothing = CalibrationSettings(str(tmp_path / "missing.jsonl"), n_sentences=4, seq_len=16, self_calibration=1.0)
    wins, described = calibration_windows(tokenizer, nothing, sample)  # the missing text is never read
    assert (wins == 7).all() and "bundled" not in described and "missing" not in described
    with pytest.raises(MoemergeError, match="samples windows from the model"):
        calibration_windows(tokenizer, nothing)


def test_sampled_windows_are_cached_and_reused(tokenizer, tmp_path):
    loads = []
    model = make_model("mixtral", vocab_size=len(tokenizer))

    def load():
        loads.append(1)
        return model

    sample = cached_sampler("f" * 16, tokenizer, load, tmp_path)
    a = sample(3, 10, 0)
    b = sample(3, 10, 0)
    assert torch.equal(a, b) and len(loads) == 1 and list(tmp_path.glob("*.part")) == []
    sample(3, 10, 1)
    assert len(loads) == 2


def test_merge_with_self_calibration_records_it_and_held_out_text_ignores_it(model_dirs, text_file, tmp_path):
    out = tmp_path / "merged"
    recipe = moemerge.Recipe.build(model_path=str(model_dirs["mixtral"]), output_path=str(out),
                                   calibration=str(text_file), seq_len=32, n_sentences=8, ppl=[str(text_file)],
                                   ppl_windows=2, dtype="float32", num_average_groups=4, merge="fit",
                                   self_calibration=0.5)
    moemerge.run(recipe, progress=False)
    info = json.loads((out / "merge_info.json").read_text())
    assert info["moemerge_recipe"]["self_calibration"] == 0.5
    assert info["calibration"]["windows"] == [8, 32]
    assert info["calibration"]["calibration"].endswith("+ 4 windows sampled from the model (temperature 1, seed 0)")
    reloaded = load_model(str(out), dtype="float32")
    assert reloaded.model.config.num_local_experts == 8  # keep: every router row, slots share the merged experts

    # recommend holds out windows of the user's text only: what the recipe must do well on
    loaded = load_model(str(model_dirs["mixtral"]), dtype="float32")
    plain = held_out_windows(loaded.tokenizer, loaded.model.config, recipe.model_copy(update={"self_calibration": 0}))
    assert torch.equal(held_out_windows(loaded.tokenizer, loaded.model.config, recipe)[1], plain[1])


def test_a_model_too_large_to_sample_from_is_refused_in_one_line(model_dirs, monkeypatch):
    import psutil

    from moemerge.pipeline import check_fits_whole

    class Tiny:
        available = 1024

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    with pytest.raises(MoemergeError, match="whole model in memory") as err:
        check_fits_whole(model_dirs["mixtral"], torch.device("cpu"), None)
    assert "\n" not in str(err.value)
    check_fits_whole(model_dirs["mixtral"], torch.device("cpu"), "auto")  # spread by device_map: not refused


def test_recommend_carries_self_calibration_into_its_trials_and_the_written_recipe(model_dirs, text_file, tmp_path):
    import subprocess
    import sys

    import yaml

    recipe_file = tmp_path / "best.yaml"
    out = subprocess.run([sys.executable, "-m", "moemerge.cli", "recommend", str(model_dirs["mixtral"]),
                          "--num-average-groups", "4", "--output", str(recipe_file), "--calibration", str(text_file),
                          "--seq-len", "32", "--n-sentences", "8", "--dtype", "float32", "--device", "cpu",
                          "--candidates", "hc-smoe+fit", "--self-calibration", "0.5", "-q"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(recipe_file.read_text())["self_calibration"] == 0.5
    trials = json.loads(next(tmp_path.glob("*trials.json")).read_text())
    assert trials["trials"][0]["trial_recipe"]["self_calibration"] == 0.5


def test_sampling_cost_estimate_scales_and_warns_at_real_sizes(model_dirs, caplog):
    from moemerge.calibrate.self_text import sampling_seconds
    from moemerge.execute.source import ShardSource
    from moemerge.loading import open_checkpoint
    from moemerge.pipeline import validate_for_model

    qwen = dict(active_parameters=int(2.7e9), weight_bytes=int(28.6e9))
    cpu = sampling_seconds(16, 2048, device="cpu", **qwen)
    assert 2 * 3600 < cpu < 5 * 3600 and sampling_seconds(16, 2048, device="cuda", **qwen) < 600
    # 8 chains of 2 windows: 2047 + 1536 decoding steps each (the second window is prompted by 512 carried tokens);
    # 8 chains of 4 windows: 2047 + 3 × 1536 (reading the weights bounds both)
    eight = sampling_seconds(16, 2048, device="cpu", chains=8, **qwen)
    assert sampling_seconds(32, 2048, device="cpu", chains=8, **qwen) == pytest.approx(
        eight * (2047 + 3 * 1536) / (2047 + 1536))
    assert cpu < eight  # the default 16 chains: one window each, fewer decoding steps

    ckpt = open_checkpoint(str(model_dirs["mixtral"]))
    source = ShardSource(ckpt.folder, config=ckpt.config)
    recipe = moemerge.Recipe.build(num_average_groups=4, self_calibration=0.5, seq_len=32, device="cpu")
    with caplog.at_level("WARNING"):
        validate_for_model(recipe, source)  # a tiny model: no warning
    assert "self_calibration" not in caplog.text


@pytest.mark.parametrize("family", FAMILIES.names())
def test_every_family_samples_whole_windows(family):
    """``generate`` with the cache of each family (sliding windows, linear attention, MLA...) runs to full length."""
    wins = sample_windows(make_model(family, vocab_size=300), start=1, count=3, seq_len=12, seed=0, chains=2)
    assert wins.shape == (3, 12) and (wins[:2, 0] == 1).all() and torch.equal(wins[2, :carried(12)],
                                                                               wins[0, -carried(12):])


def test_the_calibrate_api_samples_from_the_model_in_memory(tokenizer, text_file):
    from moemerge.loading import LoadedModel, fingerprint
    from moemerge.pipeline import calibrate

    model = make_model("qwen2_moe", vocab_size=len(tokenizer))
    loaded = LoadedModel(model, tokenizer, "in-memory", None, fingerprint(model, None, "in-memory"))
    settings = CalibrationSettings(str(text_file), n_sentences=4, seq_len=16, use_cache=False, self_calibration=0.5)
    stats = calibrate(loaded, settings, ["frequency"], progress=False)
    assert stats.meta["windows"] == [4, 16]
    assert stats.meta["calibration"].endswith("+ 2 windows sampled from the model (temperature 1, seed 0)")


def test_the_samples_do_not_depend_on_the_evaluation_batch(tokenizer):
    """The chain count changes the samples, so it is fixed (``CHAINS``), not the recipe's ``eval_batch_size``."""
    from moemerge.calibrate.self_text import CHAINS
    from moemerge.pipeline import self_sampler

    model = make_model("mixtral", vocab_size=len(tokenizer))
    drawn = [self_sampler(moemerge.Recipe(self_calibration=1.0, eval_batch_size=b, cache=False), tokenizer, "fp",
                          None, model=model)(CHAINS + 2, 6, 0) for b in (2, 32)]
    assert torch.equal(drawn[0], drawn[1])
    start = start_token(tokenizer)
    assert (drawn[0][:CHAINS, 0] == start).all() and not (drawn[0][CHAINS:, 0] == start).all()
