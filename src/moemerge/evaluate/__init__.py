"""Stage 5, evaluate: perplexity of the original and merged models on held-out text, as tables and JSON."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data import hub_reachable, load_text, tokenize, windows
from .perplexity import perplexity, window_nll

__all__ = ["EvalText", "eval_texts", "default_ppl_sources", "perplexity", "window_nll", "perplexities"]


@dataclass
class EvalText:
    name: str
    description: str
    windows: torch.Tensor


def default_ppl_sources() -> list[str]:
    return ["wikitext2"] if hub_reachable() else ["bundled:test"]


#: longest default window: the length perplexity is usually reported at (HC-SMoE, Sub-MoE: 2048)
DEFAULT_WINDOW = 2048


def window_length(config, requested: int | None = None) -> tuple[int, str | None]:
    """``(tokens per window, note)``: ``requested`` or the model's max positions (at most :data:`DEFAULT_WINDOW`);
    a request longer than the model's positions is capped, and the note says so (it is printed, never silent)."""
    max_pos = int(getattr(config, "max_position_embeddings", None) or DEFAULT_WINDOW)
    if requested is None:
        return min(DEFAULT_WINDOW, max_pos), None
    if requested > max_pos:
        return max_pos, (f"note: --seq-len {requested} is longer than the model's {max_pos} positions; windows of "
                         f"{max_pos} tokens are used")
    return requested, None


def eval_texts(tokenizer, sources: list[str], seq_len: int, max_windows: int | None = None) -> list[EvalText]:
    """Tokenize each source once into non-overlapping windows (``max_windows`` of them when given, evenly spaced
    over the text: :func:`spread_windows`)."""
    out = []
    for spec in sources:
        src = load_text(spec)
        w = windows(tokenize(tokenizer, src), seq_len, what=f"evaluation text {spec!r}")
        out.append(EvalText(spec, src.description, spread_windows(w, max_windows)))
    return out


def spread_windows(windows: torch.Tensor, count: int | None) -> torch.Tensor:
    """``count`` of ``windows [N, S]`` evenly spaced from the first (all of them for None or ``count ≥ N``): the first
    ``count`` of a text made of parts (a corpus of several domains, a file of several books) would score its first
    part only."""
    n = windows.shape[0]
    if not count or count >= n:
        return windows
    return windows[(torch.arange(count) * n) // count]


def perplexities(model: nn.Module, texts: list[EvalText], batch_size: int = 8, progress: bool = True
                 ) -> dict[str, float]:
    return {t.name: perplexity(model, t.windows, batch_size, progress, desc=f"ppl {t.name}") for t in texts}
