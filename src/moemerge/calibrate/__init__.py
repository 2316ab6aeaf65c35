"""Stage 1, calibrate: the calibration text, the per-layer statistics a plan needs (accumulated by observer hooks on
each MoE block while the executor walks the layers, :mod:`moemerge.execute`), and their cache.

>>> stats = moemerge.calibrate(loaded, CalibrationSettings(calibration="bundled", n_sentences=32, seq_len=256),
...                            ["frequency", "expert_output_mean"])
>>> stats.frequency(layer=0)      # share of tokens whose top-k holds each expert
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..data import default_calibration, load_text, tokenize, windows
from ..errors import MoemergeError
from .cache import LayerStats
from .stats import STATISTICS, LayerBatch, Statistic

LOG = logging.getLogger(__name__)

__all__ = ["CalibrationSettings", "Sampler", "Stats", "calibration_windows", "STATISTICS", "LayerBatch",
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
    self_calibration: float = 0.0  # share of the windows sampled from the model (self_text.py)

    @property
    def self_windows(self) -> int:
        """How many of the ``n_sentences`` windows are sampled from the model rather than cut from the text."""
        return round(self.n_sentences * self.self_calibration)


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


# The last windows made: every run asks for the same ones more than once (recommend, tests), and re-reading and
# re-tokenizing the calibration text (a dataset download, for c4) each time is waste.
_LAST_WINDOWS: dict[tuple, tuple[torch.Tensor, str]] = {}


#: ``sample(count, seq_len, seed) -> [count, seq_len]`` token windows sampled from the model (self_text.py)
Sampler = Callable[[int, int, int], torch.Tensor]


def calibration_windows(tokenizer, settings: CalibrationSettings, sample: Sampler | None = None
                        ) -> tuple[torch.Tensor, str]:
    """The calibration token windows ``[n_sentences, seq_len]`` and a description of their source: windows cut from
    the calibration text, then (``self_calibration``) windows ``sample`` draws from the model itself."""
    n_self = settings.self_windows
    if settings.self_calibration and not n_self:
        LOG.warning("self_calibration=%g of %d windows rounds to none: no window is sampled", settings.self_calibration,
                    settings.n_sentences)
    parts, described = [], []
    if n_self < settings.n_sentences:
        text, description = _text_windows(tokenizer, settings, settings.n_sentences - n_self)
        parts.append(text)
        described.append(description)
    if n_self:
        if sample is None:
            raise MoemergeError("self_calibration samples windows from the model, and none was given to sample from")
        parts.append(sample(n_self, settings.seq_len, settings.seed))
        described.append(f"{n_self} windows sampled from the model (temperature 1, seed {settings.seed})")
    return torch.cat(parts), " + ".join(described)


def _text_windows(tokenizer, settings: CalibrationSettings, count: int) -> tuple[torch.Tensor, str]:
    spec = settings.calibration or default_calibration()
    stamp = os.stat(spec).st_mtime_ns if os.path.exists(spec) else None  # an edited local file is re-read
    key = (id(tokenizer), getattr(tokenizer, "name_or_path", ""), spec, stamp, settings.seq_len, count, settings.seed)
    if key not in _LAST_WINDOWS:
        source = load_text(spec)
        ids = tokenize(tokenizer, source)
        w = windows(ids, settings.seq_len, count, settings.seed, what=f"calibration text {spec!r}")
        _LAST_WINDOWS.clear()
        _LAST_WINDOWS[key] = (w, source.description)
    return _LAST_WINDOWS[key]
