"""Plan-aware calibration pass for ``merge: fit``: the sufficient statistics of a least-squares down projection.

The fitted merge (``merge/fit.py``, after MergeMoE, arXiv 2510.14436, "output merging") needs, for each merged
group ``g`` of a layer, over the calibration tokens routed to the group:

* ``A = Σ_x s(x)² h(x) h(x)ᵀ``  ``[I, I]`` with ``h(x)`` the merged expert's intermediate activation
  (``act(x W_gate'ᵀ) ⊙ x W_up'ᵀ`` for the *starting* merged gate/up) and ``s(x) = Σ_{i∈g} w_i(x)`` the group's
  summed routing weight (what the merged expert receives under ``router: keep``);
* ``B = Σ_x s(x) y(x) h(x)ᵀ``  ``[H, I]`` with ``y(x) = Σ_{i∈g} w_i(x) E_i(x)`` the routing-weighted output of the
  original members, i.e. what the block added for that token;
* ``C = Σ_x ‖y(x)‖²`` (scalar), so that the objective ``Σ‖s W h − y‖² = tr(W A Wᵀ) − 2 tr(W Bᵀ) + C`` can be
  evaluated for any ``W`` without the tokens.

They depend on the plan (the merged gate/up), so they cannot come from the plan-independent cached calibration:
this module runs a second pass with the :class:`~moemerge.calibrate.observer.Observer` hooks, keeping only these
sums (fp64, on the model's device); no per-token tensor outlives one chunk of one batch.

Memory: ``G·(I² + H·I)·8`` bytes per merged layer (``G`` = groups with more than one member). For a 14336-wide
expert that is 1.6 GB per group: use ``sequential: true`` on large models, which holds one layer at a time.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..families import MoeLayer, expert_intermediate
from .observer import run_observed
from .stats import LayerBatch, Statistic

# Largest number of routed tokens pushed through one group's members at once (bounds [n, T, 2I] temporaries).
CHUNK_TOKENS = 4096


def group_key(members: Iterable[int]) -> str:
    """Stable field prefix of a group's sums: its sorted members joined by ``-``."""
    return "-".join(str(m) for m in sorted(members))


class GroupFitAccumulator(Statistic):
    """Accumulates ``A``, ``B``, ``C`` and ``tokens`` for each multi-member group of one layer.

    ``starts[g]`` is the starting merged gate/up ``[2I, H]`` of ``groups[g]``; the Observer calls :meth:`update`
    with each batch's :class:`LayerBatch` (its real routing), exactly like a registered statistic.
    """

    def __init__(self, layer: MoeLayer, groups: list[list[int]], starts: list[torch.Tensor]) -> None:
        super().__init__(layer, layer.experts.gate_up_proj.device)
        self.groups = [list(g) for g in groups]
        self.starts = starts

    @torch.no_grad()
    def update(self, batch: LayerBatch) -> None:
        weights = batch.routed_weights()  # [E, T]
        mask = batch.routed_mask()  # [E, T]
        gate_up, down = self.layer.expert_weights()
        act = self.layer.experts.act_fn
        for members, start in zip(self.groups, self.starts):
            key = group_key(members)
            idx = torch.tensor(members, device=weights.device)
            selected = mask[idx].any(0).nonzero().squeeze(1)
            if selected.numel() == 0:
                continue
            gu_m, dn_m, start32 = gate_up[idx].float(), down[idx].float(), start.float()[None]
            for lo in range(0, selected.numel(), CHUNK_TOKENS):
                tok = selected[lo:lo + CHUNK_TOKENS]
                x = batch.hidden[tok]
                w = weights[idx][:, tok]  # [n, t]
                s = w.sum(0).double()  # [t]
                out = torch.einsum("nti,nhi->nth", expert_intermediate(x, gu_m, act), dn_m)
                y = torch.einsum("nt,nth->th", w, out).double()  # Σ_i w_i E_i(x): what the block added
                h = expert_intermediate(x, start32, act)[0].double()  # [t, I]
                self._add(f"{key}.A", (h * (s * s)[:, None]).T @ h)
                self._add(f"{key}.B", (y * s[:, None]).T @ h)
                self._add(f"{key}.C", (y * y).sum())
                self._add(f"{key}.tokens", torch.tensor(float(tok.numel())))

    def result(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.sums.items()}


def fit_statistics(model: nn.Module, layers: list[MoeLayer], groups: dict[int, list[list[int]]],
                   starts: dict[int, list[torch.Tensor]], windows: torch.Tensor, batch_size: int = 1,
                   progress: bool = False, stop_after: MoeLayer | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """One pass over ``windows``: for each layer index, the fit sums of its multi-member ``groups`` (fields
    ``<members>.A|B|C|tokens``, see :func:`group_key`), given their starting gate/up ``starts``."""
    accs = {layer.index: [GroupFitAccumulator(layer, groups[layer.index], starts[layer.index])]
            for layer in layers if groups.get(layer.index)}
    if not accs:
        return {}
    run_observed(model, windows, accs, [layer for layer in layers if layer.index in accs], batch_size, progress,
                 stop_after, desc="fit pass")
    return {li: acc[0].result() for li, acc in accs.items()}
