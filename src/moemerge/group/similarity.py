"""Expert features to compare when grouping (``similarity_base``).

Each entry turns one layer's statistics into a feature matrix ``[E, D]`` whose Euclidean geometry is the one the
method compares experts with. Where the natural feature is huge (router-logit columns over all tokens, flattened
weights), we keep only its Gram matrix ``G = F Fᵀ`` and embed it as ``V Λ^½`` (eigendecomposition of G): an ``[E, E]``
matrix with exactly the same pairwise distances and inner products, so k-means, every linkage and Ward's criterion
give the same answer as on the full features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..calibrate import Stats
from ..families import MoeLayer
from ..registry import Registry


@dataclass(frozen=True)
class SimilarityBase:
    needs: tuple[str, ...]
    features: Callable[[Stats, MoeLayer], np.ndarray]
    description: str


SIMILARITY: Registry[SimilarityBase] = Registry("similarity_base")


def gram_embedding(gram: torch.Tensor) -> np.ndarray:
    """Rows ``X`` with ``X Xᵀ = gram`` (negative eigenvalues from round-off clipped to 0)."""
    g = gram.to(torch.float64)
    g = (g + g.T) / 2
    evals, evecs = torch.linalg.eigh(g)
    return (evecs * evals.clamp_min(0).sqrt()).numpy()


def _expert_output(stats: Stats, layer: MoeLayer) -> np.ndarray:
    s = stats.get(layer.index, "expert_output_mean")
    return (s["sum"] / s["tokens"].clamp_min(1)).numpy()


def _router_logits(stats: Stats, layer: MoeLayer) -> np.ndarray:
    s = stats.get(layer.index, "router_logits")
    # Columns scaled by 1/sqrt(T): distances become RMS differences of logits, independent of how many tokens.
    return gram_embedding(s["gram"] / s["tokens"].clamp_min(1))


def _weight(stats: Stats, layer: MoeLayer) -> np.ndarray:
    return gram_embedding(stats.get(layer.index, "weight_gram")["gram"])


def _expert_output_cosine(stats: Stats, layer: MoeLayer) -> np.ndarray:
    # Sub-MoE eq. 2/3: each expert's feature is its per-token-normalised output collection; ‖Ŷ_i − Ŷ_j‖² over the
    # collection is 2T(1 − Sim_ij), so the Gram of mean cosines embeds it exactly (up to the constant T).
    s = stats.get(layer.index, "expert_output_cosine")
    return gram_embedding(s["sum"] / s["tokens"].clamp_min(1))


def _expert_output_collection(stats: Stats, layer: MoeLayer) -> np.ndarray:
    # Sub-MoE eq. 3 as written: each expert's feature is its raw output collection Y_j over all tokens; the Gram
    # embedding keeps ‖Y_i − Y_j‖² / T exactly (mean squared output difference per token).
    s = stats.get(layer.index, "expert_output_gram")
    return gram_embedding(s["sum"] / s["tokens"].clamp_min(1))


SIMILARITY.add("expert-output", SimilarityBase(("expert_output_mean",), _expert_output,
                                               "mean output of each expert over all calibration tokens (HC-SMoE)"))
SIMILARITY.add("router-logits", SimilarityBase(("router_logits",), _router_logits,
                                               "each expert's router-logit column over calibration tokens (MC-SMoE)"))
SIMILARITY.add("weight", SimilarityBase(("weight_gram",), _weight, "flattened gate, up and down weights"))
SIMILARITY.add("expert-output-cosine", SimilarityBase(("expert_output_cosine",), _expert_output_cosine,
                                                      "per-token cosine of expert outputs (Sub-MoE eq. 2)"))
SIMILARITY.add("expert-output-collection", SimilarityBase(
    ("expert_output_gram",), _expert_output_collection,
    "raw output collections over all tokens (Sub-MoE eq. 3 unnormalised; mean squared output difference)"))
