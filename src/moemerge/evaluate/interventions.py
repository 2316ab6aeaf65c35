"""Routing interventions: mask experts or force tokens onto chosen experts, without touching any weight.

A forward hook on each router replaces its output ``(router_logits, top_k_weights, top_k_index)``: the logits of
masked experts (or, when forcing, of every expert *not* chosen) become −inf, and the weights and indices the MoE
block uses are recomputed with the family's own routing (:meth:`FamilySpec.route`: softmax or sigmoid scores, the
score-correction bias, group-limited choice, renormalisation and scaling exactly as the model's), with the blocked
experts excluded from the choice itself (a sigmoid router's bias could otherwise still pick an expert whose logit is
−inf). Removing the hooks restores the model bit for bit.

>>> with intervene(model, mask={0: [3, 5]}):
...     loss = ...            # layer 0 never routes to experts 3 and 5
>>> expert_importance(model, windows)   # loss increase when each expert alone is masked
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import MoemergeError
from ..families import moe_layers
from .perplexity import window_nll

Selection = dict[int, list[int]]  # MoE layer index -> expert indices


def parse_selection(specs: str | list[str] | tuple[str, ...] | None, layers: list[int] | None = None) -> Selection:
    """``"0:3,5"`` (layer 0, experts 3 and 5), ``"all:2"`` (expert 2 in every MoE layer) or several such items
    separated by ``;`` or given as a list."""
    if not specs:
        return {}
    items = specs.split(";") if isinstance(specs, str) else [p for s in specs for p in s.split(";")]
    out: Selection = {}
    for item in (i.strip() for i in items if i.strip()):
        head, sep, tail = item.partition(":")
        try:
            experts = [int(x) for x in tail.split(",") if x.strip()]
            targets = (layers or []) if head.strip() == "all" else [int(head)]
        except ValueError:
            raise MoemergeError(f"bad expert selection {item!r}; expected LAYER:E1,E2 (e.g. 0:3,5 or all:2)") from None
        if not sep or not experts:
            raise MoemergeError(f"bad expert selection {item!r}; expected LAYER:E1,E2 (e.g. 0:3,5 or all:2)")
        for li in targets:
            out.setdefault(li, [])
            out[li] += [e for e in experts if e not in out[li]]
    return out


def _check(selection: Selection, sizes: dict[int, int], what: str) -> None:
    for li, experts in selection.items():
        if li not in sizes:
            raise MoemergeError(f"{what}: layer {li} is not an MoE layer (MoE layers: {sorted(sizes)})")
        bad = [e for e in experts if not 0 <= e < sizes[li]]
        if bad:
            raise MoemergeError(f"{what}: layer {li} has experts 0..{sizes[li] - 1}, not {bad}")


@contextmanager
def intervene(model: nn.Module, mask: Selection | None = None, force: Selection | None = None) -> Iterator[None]:
    """Within the block, routers never pick ``mask`` experts and pick only among ``force`` experts."""
    mask, force = mask or {}, force or {}
    layers = {layer.index: layer for layer in moe_layers(model)}
    sizes = {li: layer.router_weight.shape[0] for li, layer in layers.items()}
    _check(mask, sizes, "mask")
    _check(force, sizes, "force")
    handles = []
    for li, layer in layers.items():
        if li not in mask and li not in force:
            continue
        blocked = torch.zeros(sizes[li], dtype=torch.bool)
        if li in force:
            blocked[:] = True
            blocked[force[li]] = False
        blocked[mask.get(li, [])] = True
        if bool(blocked.all()):
            raise MoemergeError(f"layer {li}: the intervention leaves no expert to route to")
        handles.append(layer.router.register_forward_hook(_router_hook(layer, blocked, model.config)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _router_hook(layer, blocked: torch.Tensor, config):
    def hook(module: nn.Module, args, output):
        logits, weights, _ = output
        allowed = ~blocked.to(logits.device)
        edited = logits.masked_fill(~allowed, float("-inf"))
        # Fewer allowed experts than top-k: the extra picks get weight 0, so they add nothing.
        new_w, new_i = layer.route(edited, config, allowed=allowed)
        return edited, new_w.to(weights.dtype), new_i

    return hook


def loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token NLL (nats) over ``windows``."""
    total, count = window_nll(model, windows, batch_size)
    return total / count


def expert_importance(model: nn.Module, windows: torch.Tensor, batch_size: int = 8,
                      layers: list[int] | None = None, progress: bool = False) -> tuple[float, dict[int, list[float]]]:
    """Base loss and, per MoE layer, the loss increase when each expert alone is masked (one pass per expert).

    Experts that share a slot in a ``router=keep`` merged checkpoint are masked slot by slot, as the router sees
    them.
    """
    from tqdm.auto import tqdm

    base = loss(model, windows, batch_size)
    out: dict[int, list[float]] = {}
    targets = [l for l in moe_layers(model) if layers is None or l.index in layers]
    jobs = [(l.index, e) for l in targets for e in range(l.router_weight.shape[0])]
    for li, e in tqdm(jobs, desc="importance", unit="expert", disable=not progress):
        with intervene(model, mask={li: [e]}):
            out.setdefault(li, []).append(loss(model, windows, batch_size) - base)
    return base, out


def perplexity_under(model: nn.Module, windows: torch.Tensor, mask: Selection | None = None,
                     force: Selection | None = None, batch_size: int = 8) -> tuple[float, float]:
    """Perplexity without and with the intervention."""
    base = loss(model, windows, batch_size)
    with intervene(model, mask, force):
        edited = loss(model, windows, batch_size)
    return math.exp(base), math.exp(edited)
