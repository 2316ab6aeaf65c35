"""Averaging merges: ``freq`` (HC-SMoE, M-SMoE without alignment, full-rank Sub-MoE)."""

from __future__ import annotations

import torch

from . import MERGE, GroupInputs, MergeMethod, frequency_weights, weighted_average


def freq_merge(inputs: GroupInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequency-weighted average of gate, up and down: W = Σ_i α_i W_i with α_i = f_i / Σ_j f_j (HC-SMoE eq. 4)."""
    return weighted_average(inputs, frequency_weights(inputs.frequency))


MERGE.add("freq", MergeMethod(freq_merge, description="frequency-weighted average of the group's weights"))


def _unmerged(inputs: GroupInputs) -> tuple[torch.Tensor, torch.Tensor]:
    raise AssertionError("merge=no never merges: the pipeline evaluates the original model instead")


MERGE.add("no", MergeMethod(_unmerged, description="no merging: evaluate the original model"))
