"""``weighted`` (HC-SMoE option document) and ``aligned-freq`` (M-SMoE) merges.

* ``weighted``: ``mode="x,y"`` gives the dominant expert weight ``x`` and every other member weight ``y``; the weights
  are normalised to sum to one, so ``1,1`` is the plain average.
* ``aligned-freq``: MC-SMoE (Li et al. 2024, "Merge, then compress", §3.2): permute every member's intermediate
  neurons to line up with the dominant expert's (weight matching, :mod:`.align`), then average with the members'
  routing frequencies as weights.
"""

from __future__ import annotations

import torch

from ..errors import MoemergeError
from . import MERGE, GroupInputs, MergeMethod, frequency_weights, weighted_average
from .align import align_group


def parse_weighted_mode(mode: str) -> tuple[float, float]:
    """``"x,y"`` -> ``(x, y)``: non-negative numbers, not both zero; one-line error otherwise."""
    parts = str(mode).split(",")
    try:
        x, y = (float(p) for p in parts)
    except ValueError:
        raise MoemergeError(f"merge=weighted needs mode 'x,y' (dominant weight, other weight), e.g. '1,1' or "
                            f"'2,1'; got {mode!r}") from None
    if x < 0 or y < 0 or x + y == 0:
        raise MoemergeError(f"merge=weighted mode {mode!r}: weights must be non-negative and not both zero")
    return x, y


def dominant_weights(size: int, dominant: int, x: float, y: float) -> torch.Tensor:
    """α with ``x`` on the dominant member and ``y`` elsewhere, normalised to sum to one."""
    alpha = torch.full((size,), y, dtype=torch.float64)
    alpha[dominant] = x
    return alpha / alpha.sum()


def weighted_merge(inputs: GroupInputs) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = parse_weighted_mode(inputs.mode)
    return weighted_average(inputs, dominant_weights(inputs.size, inputs.dominant, x, y))


def aligned_freq_merge(inputs: GroupInputs) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up, down = align_group(inputs.gate_up, inputs.down, inputs.dominant)
    aligned = GroupInputs(gate_up, down, inputs.frequency, inputs.dominant, inputs.members, inputs.mode)
    return weighted_average(aligned, frequency_weights(inputs.frequency))


def _check_weighted_mode(mode: str) -> None:
    if mode == "normal":  # normal = 1,1 (plain average)
        return
    try:
        parse_weighted_mode(mode)
    except MoemergeError as exc:
        raise ValueError(str(exc)) from None


MERGE.add("weighted", MergeMethod(weighted_merge, description="weight x for the dominant expert, y for the others "
                                                              "(mode='x,y'; '1,1' = plain average)",
                                  check_mode=_check_weighted_mode))
MERGE.add("aligned-freq", MergeMethod(aligned_freq_merge, description="M-SMoE: align neurons to the dominant expert "
                                                                      "by weight matching, then frequency-weighted "
                                                                      "average"))
