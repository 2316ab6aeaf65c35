"""What the benchmark scripts share: a bundled model (or a checkpoint folder) in memory and calibration-like
windows of the bundled validation text."""

from __future__ import annotations

import resource

import torch

from moemerge import zoo
from moemerge.data import load_text, tokenize, windows
from moemerge.loading import LoadedModel, load_model


def model_and_windows(model: str, count: int, seq_len: int) -> tuple[LoadedModel, torch.Tensor]:
    """``model`` (a bundled name or a folder) in fp32 on CPU with 2 threads, and ``count`` windows of ``seq_len``
    tokens of ``bundled:validation`` (seed 0)."""
    torch.set_num_threads(2)
    path = str(zoo.model_path(model)) if model in zoo.MODELS else model
    loaded = load_model(path, dtype="float32", device="cpu")
    wins = windows(tokenize(loaded.tokenizer, load_text("bundled:validation")), seq_len, count, seed=0)
    return loaded, wins


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
