"""Sub-MoE subspace expert merging (Li et al., "Sub-MoE: Efficient Mixture-of-Expert LLMs Compression via Subspace
Expert Merging", arXiv 2506.23266), eqs. 5–8, and its truncated, optionally whitened variant Sub-MoE† (eqs. 10–12).

For one group and one matrix type (gate, up or down, each ``W_i ∈ R^{O×I}`` in ``nn.Linear`` layout):

* eq. 5, union SVD: ``[W_1 … W_n] = U Σ [V_1; …; V_n]ᵀ`` (concatenation along the *input* axis, so U is shared);
* eqs. 6–7: ``V = Σ_i α_i V_i`` with ``α_i = f_i / Σ_j f_j`` (frequency with the model's real top-k);
* eq. 8: ``W = U Σ Vᵀ``.

Because ``U Σ V_iᵀ = W_i`` exactly, the full-rank result is ``Σ_i α_i W_i``: frequency-weighted averaging. Keeping
only the top ``r`` singular directions gives ``W = U_r U_rᵀ Σ_i α_i W_i``, the weighted average projected on the
top-r left singular subspace of the union. With whitening (Sub-MoE†, eq. 10) the union is ``[W_1 S_1 … W_n S_n]``
with ``S_i S_iᵀ`` the input covariance of expert i; de-whitening the V blocks (eq. 11) leaves the same formula,
``W = U'_r U'_rᵀ Σ_i α_i W_i``, with ``U'_r`` the top-r eigenvectors of ``Σ_i W_i S_i S_iᵀ W_iᵀ``.

So the default path (:func:`subspace_merge_matrix`) never forms the wide ``O × nI`` SVD: full rank is the average
itself, and a truncated rank needs one symmetric ``O × O`` eigendecomposition. :func:`union_svd_merge_matrix`
follows eqs. 5–8/10–12 literally; tests and ``benchmarks/bench_subspace.py`` check that both agree.
"""

from __future__ import annotations

import torch

from ..errors import MoemergeError
from . import MERGE, GroupInputs, MergedExpert, MergeMethod, frequency_weights

Factors = tuple[torch.Tensor, torch.Tensor]


# ---- rank and whitening ------------------------------------------------------------------------------------------
def truncation_rank(rank_ratio: float | None, out_features: int, in_features: int) -> int | None:
    """``r = round(rank_ratio · min(O, I))`` (at least 1); ``None`` (no truncation) when ``rank_ratio`` is None."""
    if rank_ratio is None:
        return None
    if not 0 < rank_ratio <= 1:
        raise MoemergeError(f"rank_ratio must be in (0, 1], got {rank_ratio}")
    return max(1, int(round(rank_ratio * min(out_features, in_features))))


def clamp_psd(cov: torch.Tensor, rel_eps: float = 1e-6) -> torch.Tensor:
    """Symmetrise ``[..., d, d]`` covariances and raise eigenvalues below ``rel_eps · mean eigenvalue`` to that floor,
    so that every matrix has a Cholesky factor (D²-MoE / SVD-LLM clamp non-positive eigenvalues the same way).
    An all-zero covariance (an expert never routed) becomes a tiny multiple of the identity."""
    c = cov.to(torch.float64)
    c = (c + c.transpose(-1, -2)) / 2
    evals, evecs = torch.linalg.eigh(c)
    d = c.shape[-1]
    scale = (evals.clamp_min(0).sum(-1, keepdim=True) / d).clamp_min(1e-30)
    floor = rel_eps * scale
    evals = torch.maximum(evals, floor)
    return (evecs * evals.unsqueeze(-2)) @ evecs.transpose(-1, -2)


def whitening_factors(cov: torch.Tensor) -> torch.Tensor:
    """``S_i`` with ``S_i S_iᵀ = cov_i`` (lower Cholesky, fp64) after :func:`clamp_psd` (Sub-MoE† eq. 10)."""
    return torch.linalg.cholesky(clamp_psd(cov))


# ---- one matrix type, two equivalent implementations ----------------------------------------------------------
def _top_subspace(weights: torch.Tensor, rank: int, cov: torch.Tensor | None) -> torch.Tensor:
    """``U_r [O, r]``: top-r eigenvectors of ``Σ_i W_i C_i W_iᵀ`` (``C_i = I`` without whitening), i.e. the top-r
    left singular vectors of the (whitened) union ``[W_1 S_1 … W_n S_n]``, computed in fp64."""
    w = weights.to(torch.float64)
    if cov is None:
        gram = torch.einsum("noi,npi->op", w, w)
    else:
        gram = torch.einsum("noi,nij,npj->op", w, clamp_psd(cov), w)
    gram = (gram + gram.T) / 2
    _, evecs = torch.linalg.eigh(gram)  # ascending
    return evecs[:, -rank:].flip(-1)


def subspace_merge_matrix(weights: torch.Tensor, alpha: torch.Tensor, rank: int | None = None,
                          cov: torch.Tensor | None = None) -> tuple[torch.Tensor, Factors | None]:
    """Sub-MoE merge of one matrix type without the wide SVD.

    Args:
        weights: ``[n, O, I]`` the members' matrices (fp32).
        alpha: ``[n]`` merge weights (eq. 7), summing to one.
        rank: truncation rank ``r`` (Sub-MoE†); ``None`` or ``r ≥ O`` keeps everything.
        cov: optional ``[n, I, I]`` input covariances ``S_i S_iᵀ`` for whitening (eq. 10).

    Returns:
        ``(W [O, I], factors)`` with ``factors = (A [O, r], B [r, I])``, ``A @ B = W``, when truncated, else None.
        Full rank: ``W = Σ α_i W_i`` (eq. 8 at full rank). Truncated: ``W = U_r U_rᵀ Σ α_i W_i``.
    """
    average = torch.einsum("n,noi->oi", alpha.to(weights), weights)
    out_features = weights.shape[1]
    if rank is None or rank >= out_features:
        return average, None  # U_r U_rᵀ = identity: whitening cannot change anything either
    basis = _top_subspace(weights, rank, cov)
    a = basis.to(weights.dtype)
    b = (basis.T @ average.to(torch.float64)).to(weights.dtype)
    return a @ b, (a, b)


def union_svd_merge_matrix(weights: torch.Tensor, alpha: torch.Tensor, rank: int | None = None,
                           cov: torch.Tensor | None = None,
                           compute_dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, Factors]:
    """Sub-MoE eqs. 5–8 (and 10–12 with ``cov``) literally: union SVD, shared ``U Σ``, frequency-weighted V blocks.

    Slow (an ``O × nI`` SVD); kept as the reference for tests and the benchmark. Returns ``(W, (UΣ [O, r],
    V_mergedᵀ [r, I]))``; at full rank ``r`` is the rank of the union. ``compute_dtype`` is the SVD's precision.
    """
    n, _, in_features = weights.shape
    w = weights.to(compute_dtype)
    if cov is not None:
        s = whitening_factors(cov).to(compute_dtype)  # [n, I, I]
        w = w @ s  # W_i' = W_i S_i (eq. 10)
    union = torch.cat(list(w), dim=1)  # [O, nI]: concatenation along the input axis (eq. 5)
    u, sigma, vh = torch.linalg.svd(union, full_matrices=False)
    blocks = vh.reshape(vh.shape[0], n, in_features).permute(1, 0, 2)  # [n, r, I]: column block i is V_iᵀ
    if cov is not None:
        # De-whiten each block, V_iᵀ S_i⁻¹ (eq. 11), by a triangular solve instead of an explicit inverse.
        blocks = torch.linalg.solve_triangular(s, blocks, upper=False, left=False)  # X S_i = block
    merged_v = torch.einsum("n,nri->ri", alpha.to(compute_dtype), blocks)  # eq. 7
    r = sigma.shape[0] if rank is None else min(rank, sigma.shape[0])
    a = u[:, :r] * sigma[:r]  # Σ folded into U (the paper's footnote 2)
    b = merged_v[:r]
    return (a @ b).to(weights.dtype), (a.to(weights.dtype), b.to(weights.dtype))


# ---- the registered method -------------------------------------------------------------------------------------
def _covariances(inputs: GroupInputs, name: str) -> torch.Tensor:
    if inputs.stats is None or inputs.layer is None:
        raise MoemergeError("whiten needs calibration statistics (input_cov, intermediate_cov)")
    return inputs.stats.get(inputs.layer.index, name)["sum"][inputs.members]


def submoe_merge(inputs: GroupInputs, rank_ratio: float | None = None, whiten: bool = False,
                 matrix_fn=subspace_merge_matrix) -> MergedExpert:
    """Merge one group with Sub-MoE: gate, up and down each get their own shared subspace (eqs. 5–8); with
    ``rank_ratio`` the subspace is truncated to ``r = round(rank_ratio · min(O, I))`` and the merged expert carries
    low-rank factors (Sub-MoE†, eqs. 10–12), optionally whitened by each member's routed-input covariance
    (``input_cov`` for gate/up, ``intermediate_cov`` for down).

    ``rank_ratio``/``whiten`` default to the recipe's when the pipeline passes one in ``inputs.recipe``.
    """
    recipe = getattr(inputs, "recipe", None)
    if recipe is not None:
        rank_ratio = recipe.rank_ratio if rank_ratio is None else rank_ratio
        whiten = whiten or recipe.whiten
    alpha = frequency_weights(inputs.frequency)
    inter = inputs.gate_up.shape[1] // 2
    gate, up, down = inputs.gate_up[:, :inter], inputs.gate_up[:, inter:], inputs.down
    cov_in = _covariances(inputs, "input_cov") if whiten and rank_ratio is not None else None
    cov_mid = _covariances(inputs, "intermediate_cov") if whiten and rank_ratio is not None else None
    results = {}
    for name, w, cov in (("gate", gate, cov_in), ("up", up, cov_in), ("down", down, cov_mid)):
        results[name] = matrix_fn(w, alpha, truncation_rank(rank_ratio, w.shape[1], w.shape[2]), cov)
    gate_up = torch.cat([results["gate"][0], results["up"][0]], dim=0)
    factors = {k: v[1] for k, v in results.items()} if rank_ratio is not None else None
    if factors is not None and any(f is None for f in factors.values()):
        # A matrix whose rank cap is its full output size is stored exactly: factor it as (I, W) for uniformity.
        factors = {k: (f if f is not None else (torch.eye(results[k][0].shape[0]), results[k][0]))
                   for k, f in factors.items()}
    return MergedExpert(gate_up, results["down"][0], factors)


def _statistics(recipe) -> tuple[str, ...]:
    return ("input_cov", "intermediate_cov") if recipe.whiten and recipe.rank_ratio is not None else ()


MERGE.add("sub-moe", MergeMethod(
    submoe_merge, description="Sub-MoE subspace merge (frequency-weighted V over a shared union basis); with "
                              "rank_ratio: Sub-MoE† low-rank factors, whiten: activation-aware basis",
    handles_singletons=True, needs_for=_statistics))
