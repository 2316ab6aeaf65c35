"""Pruning criteria (``prune``): score every expert of a layer, keep the ``num_average_groups`` best, drop the rest.

Each entry maps a layer's statistics to a score per expert (higher = more important) and names the statistics it
reads. ``no`` means no pruning (merge instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..calibrate import Stats
from ..registry import Registry


@dataclass(frozen=True)
class PruneCriterion:
    score: Callable[[Stats, int], torch.Tensor] | None  # (stats, layer index) -> [E]
    needs: tuple[str, ...] = ()
    description: str = ""


PRUNE: Registry[PruneCriterion] = Registry("prune")
PRUNE.add("no", PruneCriterion(None, (), "no pruning"))
