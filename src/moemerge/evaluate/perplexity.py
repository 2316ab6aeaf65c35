"""Perplexity the way the merging papers measure it: the text's tokens cut into non-overlapping windows of
``seq_len`` (2048 by default), each scored independently; perplexity = exp(mean next-token NLL over all windows)."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = False,
               desc: str = "perplexity") -> tuple[float, int]:
    """Summed next-token negative log-likelihood (fp32) over ``windows [N, S]`` and the number of predicted
    tokens, ``N * (S - 1)``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, unit="batch"):
        ids = windows[s:s + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                          reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return total, count


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = False,
               desc: str = "perplexity") -> float:
    total, count = window_nll(model, windows, batch_size, progress, desc)
    return math.exp(total / count)
