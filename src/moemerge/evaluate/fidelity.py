"""Fidelity: how closely the merged model reproduces the original's next-token distributions.

``moemerge merge`` changes the model in place, so the original is measured first: :func:`reference` keeps the
original's full log-softmax on a few held-out windows (fp32 on CPU, capped by ``max_elements`` so a 32k-vocabulary
model stores at most ~0.5 GB) and its greedy continuations of a few prompts. After merging, :func:`compare` gives

* ``kl``: mean over predicted tokens of KL(original ‖ merged) = Σ_v p_orig(v) (log p_orig(v) − log p_merged(v)),
* ``top1``: share of tokens whose most likely next token is the same in both models,
* ``generations``: each prompt with the original's and the merged model's greedy continuation.

A model compared with itself gives exactly ``kl = 0`` and ``top1 = 1`` (the identity the tests check).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

#: Default cap on stored log-prob values (fp32): 128M values = 512 MB.
MAX_ELEMENTS = 128 * 2**20


@dataclass
class Reference:
    """The original model's outputs, kept before it is merged in place."""

    windows: torch.Tensor  # [N, S] token ids
    logprobs: torch.Tensor  # [N, S-1, V] fp32 log-softmax of positions 0..S-2 (each predicts the next token)
    prompts: list[torch.Tensor] = field(default_factory=list)  # [P_i] ids
    generations: list[torch.Tensor] = field(default_factory=list)  # [G_i] greedy continuation ids
    max_new_tokens: int = 0


def fidelity_windows(windows: torch.Tensor, vocab_size: int, count: int = 8,
                     max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """The first ``count`` windows, fewer if their log-probs would exceed ``max_elements`` (at least one, cut to
    fit in length if even one is too large)."""
    n, s = windows.shape
    per_window = (s - 1) * vocab_size
    keep = max(1, min(count, n, max_elements // max(per_window, 1)))
    w = windows[:keep]
    if per_window > max_elements:  # one window alone is too big: shorten it
        w = w[:, :max(2, max_elements // vocab_size + 1)]
    return w


@torch.no_grad()
def log_probs(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """``[N, S-1, V]`` fp32 log-softmax on CPU of every position but the last."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(windows), batch_size):
        logits = model(input_ids=windows[s:s + batch_size].to(device), use_cache=False).logits[:, :-1]
        out.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out)


def prompts_from(windows: torch.Tensor, count: int = 3, length: int = 16) -> list[torch.Tensor]:
    """Short prompts: the first ``length`` tokens of the first ``count`` windows."""
    return [windows[i, :length].clone() for i in range(min(count, len(windows)))]


@torch.no_grad()
def greedy(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, pad_token_id: int | None = None
           ) -> torch.Tensor:
    """Greedy continuation ids (without the prompt)."""
    device = next(model.parameters()).device
    ids = prompt[None].to(device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad_token_id)
    return out[0, ids.shape[1]:].cpu()


def reference(model: nn.Module, windows: torch.Tensor, count: int = 8, batch_size: int = 8, prompts: int = 3,
              prompt_tokens: int = 16, max_new_tokens: int = 24, pad_token_id: int | None = None,
              max_elements: int = MAX_ELEMENTS) -> Reference:
    """Keep what :func:`compare` needs of the original model (call before merging in place)."""
    vocab = int(model.get_output_embeddings().weight.shape[0])
    w = fidelity_windows(windows, vocab, count, max_elements)
    ps = prompts_from(windows, prompts, prompt_tokens) if max_new_tokens > 0 else []
    gens = [greedy(model, p, max_new_tokens, pad_token_id) for p in ps]
    return Reference(w, log_probs(model, w, batch_size), ps, gens, max_new_tokens)


def kl_and_agreement(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> tuple[float, float]:
    """Mean per-token KL(ref ‖ other) in nats and top-1 agreement, for ``[..., V]`` log-probs."""
    p = ref_logprobs.exp()
    # 0·log 0 = 0: where the reference gives probability 0 the term vanishes whatever the other model says
    kl = torch.where(p > 0, p * (ref_logprobs - logprobs), torch.zeros_like(p)).sum(-1)
    agree = (ref_logprobs.argmax(-1) == logprobs.argmax(-1)).float()
    return float(kl.double().mean()), float(agree.double().mean())


def compare(model: nn.Module, ref: Reference, tokenizer=None, batch_size: int = 8,
            pad_token_id: int | None = None) -> dict:
    """Fidelity of ``model`` to the original captured in ``ref``, as a JSON-ready dict."""
    kl, top1 = kl_and_agreement(ref.logprobs, log_probs(model, ref.windows, batch_size))
    out: dict = {"kl": kl, "top1": top1, "tokens": int(ref.logprobs.shape[0] * ref.logprobs.shape[1]),
                 "windows": list(ref.windows.shape), "generations": []}
    for prompt, orig in zip(ref.prompts, ref.generations):
        new = greedy(model, prompt, ref.max_new_tokens, pad_token_id)
        decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if tokenizer is not None else \
            (lambda ids: " ".join(map(str, ids.tolist())))
        same = int((new[:len(orig)] == orig[:len(new)]).cumprod(0).sum()) if len(new) and len(orig) else 0
        out["generations"].append({"prompt": decode(prompt), "original": decode(orig), "merged": decode(new),
                                   "same_prefix_tokens": same})
    return out


def fidelity(original: nn.Module, other: nn.Module, windows: torch.Tensor, tokenizer=None, **kwargs) -> dict:
    """Fidelity of ``other`` to ``original`` when both exist in memory (API convenience)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    ref = reference(original, windows, pad_token_id=pad, **kwargs)
    return compare(other, ref, tokenizer, pad_token_id=pad)


def print_fidelity(fid: dict, console=None) -> None:
    """KL / agreement line and the side-by-side generations as a rich table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(f"fidelity: KL(original ‖ merged) {fid['kl']:.4g} nats/token, top-1 agreement "
                  f"{fid['top1']:.3f} over {fid['tokens']} tokens")
    if fid.get("generations"):
        table = Table(title="greedy generations")
        for col in ("prompt", "original", "merged"):
            table.add_column(col, overflow="fold")
        for g in fid["generations"]:
            table.add_row(g["prompt"], g["original"], g["merged"])
        console.print(table)
