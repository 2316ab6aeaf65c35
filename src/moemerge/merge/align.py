"""Permutation alignment of intermediate neurons (MC-SMoE, Li et al. 2024, §3.2 "expert permutation alignment").

An expert ``E(x) = W_down (act(W_gate x) ⊙ W_up x)`` is unchanged when its intermediate neurons are permuted: rows of
``W_gate``/``W_up`` and columns of ``W_down`` move together. Before averaging two experts, MC-SMoE permutes each one so
that its neurons line up with the dominant expert's. The permutation maximises the summed similarity of matched
neurons, a linear assignment problem solved exactly by scipy's ``linear_sum_assignment`` (Hungarian algorithm); with
weight matching (Ainsworth et al., Git Re-Basin) the similarity of neuron ``i`` of A and ``j`` of B is
``<gate_A_i, gate_B_j> + <up_A_i, up_B_j> + <down_A_:i, down_B_:j>``.

Everything here is a pure tensor function, shared by ``aligned-freq`` (M-SMoE), ``fix-dom-same`` and ``zipit``.
"""

from __future__ import annotations

import numpy as np
import torch


def neuron_features(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Each intermediate neuron as one vector ``[gate row, up row, down column]``: ``[2I,H],[H,I] -> [I, 3H]``."""
    inter = down.shape[-1]
    return torch.cat([gate_up[:inter], gate_up[inter:], down.T], dim=1)


def weight_similarity(ref_gate_up: torch.Tensor, ref_down: torch.Tensor, gate_up: torch.Tensor,
                      down: torch.Tensor) -> torch.Tensor:
    """Weight-matching similarity ``[I_ref, I]`` between the neurons of a reference expert and another expert."""
    a = neuron_features(ref_gate_up, ref_down).to(torch.float64)
    b = neuron_features(gate_up, down).to(torch.float64)
    return a @ b.T


def match_permutation(similarity: torch.Tensor | np.ndarray) -> np.ndarray:
    """The permutation ``perm`` maximising ``Σ_i similarity[i, perm[i]]``: neuron ``perm[i]`` of the other expert is
    matched to neuron ``i`` of the reference (exact linear assignment, scipy)."""
    from scipy.optimize import linear_sum_assignment

    s = similarity.detach().cpu().numpy() if isinstance(similarity, torch.Tensor) else np.asarray(similarity)
    if not np.all(np.isfinite(s)):
        s = np.nan_to_num(s, nan=-1.0, posinf=1e300, neginf=-1e300)
    rows, cols = linear_sum_assignment(s, maximize=True)
    perm = np.empty(s.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def permute_expert(gate_up: torch.Tensor, down: torch.Tensor, perm) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder the intermediate neurons of one expert (function unchanged): neuron ``i`` becomes old ``perm[i]``."""
    inter = down.shape[-1]
    p = torch.as_tensor(np.asarray(perm), dtype=torch.long, device=gate_up.device)
    return torch.cat([gate_up[:inter][p], gate_up[inter:][p]]), down[:, p]


def align_to(ref_gate_up: torch.Tensor, ref_down: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gate_up, down)`` permuted so that its neurons line up with the reference expert's (weight matching)."""
    perm = match_permutation(weight_similarity(ref_gate_up, ref_down, gate_up, down))
    return permute_expert(gate_up, down, perm)


def align_group(gate_up: torch.Tensor, down: torch.Tensor, dominant: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every member of a group ``[n, 2I, H], [n, H, I]`` aligned to member ``dominant`` (which is left as it is)."""
    out_gu, out_dn = [], []
    for k in range(gate_up.shape[0]):
        if k == dominant:
            out_gu.append(gate_up[k])
            out_dn.append(down[k])
        else:
            gu, dn = align_to(gate_up[dominant], down[dominant], gate_up[k], down[k])
            out_gu.append(gu)
            out_dn.append(dn)
    return torch.stack(out_gu), torch.stack(out_dn)
