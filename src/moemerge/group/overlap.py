"""``overlap_metric``: how similar two experts' outputs are, for single-shot grouping (``dominant=frequency``) on
``similarity_base=expert-output``.

The reference HC-SMoE ``overlap.py`` compares the experts' output vectors token by token: ``cosine`` (the original
single-shot grouping), a symmetric KL divergence between the softmax-normalised outputs, and a Wasserstein distance
between the sorted output values. Here each is accumulated over all calibration tokens as ``[E, E]`` sums, batched
over experts (no per-token storage), and turned into a similarity (higher = more alike):

* ``cosine``: mean over tokens of ``cos(E_i(x), E_j(x))`` (statistic ``expert_output_cosine``).
* ``kl-divergence``: minus the mean over tokens of ``KL(p_i‖p_j) + KL(p_j‖p_i)`` with ``p_e = softmax(E_e(x))`` over
  the hidden dimension. Since ``KL(p‖q) + KL(q‖p) = Σ_h (p − q)(log p − log q)``, it needs only the matrix
  ``A_ij = Σ_t Σ_h p_i log p_j``: sym-KL_ij = A_ii + A_jj − A_ij − A_ji.
* ``wasserstein``: minus the mean over tokens of the squared 2-Wasserstein distance between the empirical
  distributions of the two output vectors' values, ``mean_h (sort(y_i) − sort(y_j))²``, which needs only the Gram
  matrix of the sorted outputs (the reference's 1-Wasserstein has no such form).
"""

from __future__ import annotations

import numpy as np
import torch

from ..calibrate import LayerBatch, Stats
from ..calibrate.stats import STATISTICS, Statistic


@STATISTICS.register("expert_output_overlap")
class ExpertOutputOverlap(Statistic):
    """Σ_t Σ_h p_i log p_j (``kl_cross``) and Σ_t sort(y_i)·sort(y_j) (``sorted_gram``), ``[E, E]``; ``tokens``."""

    needs_outputs = True

    def update(self, batch: LayerBatch) -> None:
        y = batch.expert_outputs()  # [E, T, H]
        logp = torch.log_softmax(y, dim=-1)
        self._add("kl_cross", torch.einsum("eth,fth->ef", logp.exp(), logp))
        s = y.sort(dim=-1).values
        self._add("sorted_gram", torch.einsum("eth,fth->ef", s, s) / y.shape[-1])
        self._add("tokens", torch.tensor(batch.num_tokens))


OVERLAP_STATISTIC = {"cosine": "expert_output_cosine", "kl-divergence": "expert_output_overlap",
                     "wasserstein": "expert_output_overlap"}


def symmetric_kl(kl_cross: torch.Tensor) -> torch.Tensor:
    """sym-KL_ij = A_ii + A_jj − A_ij − A_ji from ``A_ij = Σ p_i log p_j``."""
    d = kl_cross.diagonal()
    return d[:, None] + d[None, :] - kl_cross - kl_cross.T


def squared_distances_from_gram(gram: torch.Tensor) -> torch.Tensor:
    d = gram.diagonal()
    return (d[:, None] + d[None, :] - 2 * gram).clamp_min(0)


def overlap_similarity(stats: Stats, layer: int, metric: str) -> np.ndarray:
    """``[E, E]`` similarity of the experts' outputs under ``metric`` (higher = more overlap)."""
    s = stats.get(layer, OVERLAP_STATISTIC[metric])
    tokens = s["tokens"].clamp_min(1).to(torch.float64)
    if metric == "cosine":
        return (s["sum"] / tokens).numpy()
    if metric == "kl-divergence":
        return (-symmetric_kl(s["kl_cross"]) / tokens).numpy()
    return (-squared_distances_from_gram(s["sorted_gram"]) / tokens).numpy()
