"""Pruning criteria (``prune``): score every expert of a layer, keep the ``num_average_groups`` best, drop the rest.

Each entry maps a layer's statistics to a score per expert (higher = more important) and names the statistics it
reads. ``no`` means no pruning (merge instead). A pruned layer is a plan of singleton groups plus dropped experts;
saved with ``router=collapse``, the dropped experts and their router rows disappear and the model loads in stock
transformers.

* ``frequency``: share of calibration tokens whose top-k holds the expert (the usual frequency baseline).
* ``output``: mean L2 norm of the expert's output over the tokens routed to it (expert activation norm, EAN).
* ``reap``: REAP (Lasby et al. 2025, "REAP: Router-weighted Expert Activation Pruning", eq. 5): mean over the tokens
  routed to the expert of ``g_e(x) · ‖E_e(x)‖``, the gate value the model really used times the output norm.

An expert never routed to scores 0 under every criterion (it is pruned first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..calibrate import Stats
from ..registry import Registry
from .plan import LayerPlan


@dataclass(frozen=True)
class PruneCriterion:
    score: Callable[[Stats, int], torch.Tensor] | None  # (stats, layer index) -> [E]
    needs: tuple[str, ...] = ()
    description: str = ""


PRUNE: Registry[PruneCriterion] = Registry("prune")
PRUNE.add("no", PruneCriterion(None, (), "no pruning"))


def _routed_mean(stats: Stats, layer: int, field: str) -> torch.Tensor:
    s = stats.get(layer, "routed_output_norm")
    return (s[field] / s["counts"].clamp_min(1)).to(torch.float64)


PRUNE.add("frequency", PruneCriterion(lambda stats, layer: stats.frequency(layer).to(torch.float64), ("frequency",),
                                      "share of tokens routed to the expert"))
PRUNE.add("output", PruneCriterion(lambda stats, layer: _routed_mean(stats, layer, "norm_sum"),
                                   ("routed_output_norm",), "mean output norm over the tokens routed to the expert"))
PRUNE.add("reap", PruneCriterion(lambda stats, layer: _routed_mean(stats, layer, "weighted_norm_sum"),
                                 ("routed_output_norm",), "REAP: mean gate value × output norm over routed tokens"))


def prune_plan(layer: int, scores: torch.Tensor, keep: int) -> LayerPlan:
    """Keep the ``keep`` highest-scoring experts (ties: lower index kept) as singleton groups; drop the rest."""
    num_experts = len(scores)
    s = scores.to(torch.float64).nan_to_num(nan=float("-inf")).tolist()
    order = sorted(range(num_experts), key=lambda e: (-s[e], e))
    kept = sorted(order[:keep])
    return LayerPlan(layer, num_experts, [[e] for e in kept], kept, sorted(order[keep:]))
