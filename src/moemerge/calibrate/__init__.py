"""Stage 1, calibrate: run the model on calibration text once and keep, per MoE layer, the statistics a plan needs.

>>> stats = calibrate(loaded, CalibrationSettings(calibration="bundled", n_sentences=32, seq_len=256),
...                   ["frequency", "expert_output_mean"])
>>> stats.frequency(layer=0)      # share of tokens whose top-k holds each expert
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

import torch

from ..data import default_calibration, load_text, tokenize, windows
from ..families import moe_layers
from ..loading import LoadedModel, cache_root
from .cache import LayerStats, StatsCache, cache_key
from .observer import observe
from .stats import STATISTICS, LayerBatch, Statistic

LOG = logging.getLogger(__name__)

__all__ = ["CalibrationSettings", "Stats", "calibrate", "calibration_windows", "STATISTICS", "LayerBatch",
           "Statistic"]


@dataclass
class CalibrationSettings:
    """What text the model runs on; part of the recipe (same names as the HC-SMoE argument document)."""

    calibration: str | None = None  # None: C4 when online, else the bundled corpus
    n_sentences: int = 32
    seq_len: int = 2048
    train_batch_size: int = 2
    seed: int = 0
    use_cache: bool = True


@dataclass
class Stats:
    """Per-layer statistics plus where they came from."""

    layers: LayerStats
    meta: dict

    def get(self, layer: int, name: str) -> dict[str, torch.Tensor]:
        return self.layers[layer][name]

    def frequency(self, layer: int) -> torch.Tensor:
        """Share of tokens whose top-k holds each expert, ``[E]`` (sums to top-k)."""
        f = self.get(layer, "frequency")
        return (f["counts"] / f["tokens"].clamp_min(1)).float()


# The last windows made: calibrate(), the plan-aware passes and every step of the sequential path ask for the same
# ones, and re-reading and re-tokenizing the calibration text (a dataset download, for c4) each time is waste.
_LAST_WINDOWS: dict[tuple, tuple[torch.Tensor, str]] = {}


def calibration_windows(loaded: LoadedModel, settings: CalibrationSettings) -> tuple[torch.Tensor, str]:
    """The calibration token windows ``[n_sentences, seq_len]`` and a description of their source."""
    spec = settings.calibration or default_calibration()
    stamp = os.stat(spec).st_mtime_ns if os.path.exists(spec) else None  # an edited local file is re-read
    key = (id(loaded.tokenizer), getattr(loaded.tokenizer, "name_or_path", ""), spec, stamp, settings.seq_len,
           settings.n_sentences, settings.seed)
    if key not in _LAST_WINDOWS:
        source = load_text(spec)
        ids = tokenize(loaded.tokenizer, source)
        w = windows(ids, settings.seq_len, settings.n_sentences, settings.seed, what=f"calibration text {spec!r}")
        _LAST_WINDOWS.clear()
        _LAST_WINDOWS[key] = (w, source.description)
    return _LAST_WINDOWS[key]


def calibrate(loaded: LoadedModel, settings: CalibrationSettings, names: list[str],
              progress: bool = True) -> Stats:
    """Statistics ``names`` for every MoE layer, from the cache when possible, else from one forward pass that
    computes only the missing ones."""
    for n in names:
        STATISTICS.get(n)  # unknown names fail before any work
    wins, description = calibration_windows(loaded, settings)
    key = cache_key(loaded.fingerprint, wins)
    cache = StatsCache(cache_root(), key)
    meta = {"model": loaded.source, "model_fingerprint": loaded.fingerprint, "calibration": description,
            "settings": asdict(settings), "windows": list(wins.shape), "cache_key": key}
    have = cache.available() if settings.use_cache else set()
    missing = [n for n in dict.fromkeys(names) if n not in have]
    layers: LayerStats = cache.load([n for n in names if n in have]) if have else {}
    meta["from_cache"] = sorted(set(names) - set(missing))
    if missing:
        LOG.info("calibrating on %s: %d windows of %d tokens (%s)", description, *wins.shape, ", ".join(missing))
        fresh = observe(loaded.model, moe_layers(loaded.model), wins, missing, settings.train_batch_size, progress)
        for li, per in fresh.items():
            layers.setdefault(li, {}).update(per)
        if settings.use_cache:
            cache.save(fresh, meta)
    meta["model_runs"] = 1 if missing else 0
    return Stats(layers, meta)
