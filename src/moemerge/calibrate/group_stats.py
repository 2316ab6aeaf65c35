"""Plan-aware calibration for ``zipit`` / ``fix-dom-same``: a second pass over the calibration windows that
accumulates, per group of the plan, the first and second moments of the members' intermediate activations.

Which neurons to match depends on the groups, so these statistics cannot be part of the plan-independent first pass.
The pass reuses :class:`~moemerge.calibrate.observer.Observer` (its hooks see the routing the model really used) with
one accumulator per layer that knows that layer's groups. For each group it keeps Σf and Σffᵀ in fp64 over the
tokens routed to any member (``f`` = the members' activations ``act(x W_gate) ⊙ (x W_up)`` side by side, ``[n·I]``),
at most ``data_limit`` tokens per group and no per-token storage. ``partition`` splits the groups of all merged
layers into that many parts, one pass each, so only one part's Gram matrices live at a time; every pass runs on the
original model (nothing is written into the model before all passes are done), so results do not depend on
``partition``. Each part's matrices are reduced at once to the small neuron assignment the merge needs and freed.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..families import MoeLayer, expert_intermediate, moe_layers
from ..group.plan import MergePlan
from .observer import run_observed
from .stats import LayerBatch, Statistic

LOG = logging.getLogger(__name__)


class GroupActivationMoments(Statistic):
    """Σf, Σffᵀ and token count per group (not registered: it needs the plan)."""

    def __init__(self, layer: MoeLayer, device: torch.device, groups: list[list[int]], with_router: bool,
                 data_limit: int | None) -> None:
        super().__init__(layer, device)
        self.groups = groups
        self.with_router = with_router
        self.data_limit = data_limit
        self.counts = {i: 0 for i in range(len(groups))}

    def full(self) -> bool:
        return self.data_limit is not None and all(c >= self.data_limit for c in self.counts.values())

    def update(self, batch: LayerBatch) -> None:
        gate_up, _ = self.layer.expert_weights()
        routed = batch.routed_mask()  # [E, T]
        probs = torch.softmax(batch.router_logits.float(), -1) if self.with_router else None
        for gi, members in enumerate(self.groups):
            room = None if self.data_limit is None else self.data_limit - self.counts[gi]
            if room is not None and room <= 0:
                continue
            tokens = torch.nonzero(routed[members].any(0)).reshape(-1)[:room]
            if tokens.numel() == 0:
                continue
            idx = torch.tensor(members, device=gate_up.device)
            act = expert_intermediate(batch.hidden[tokens], gate_up[idx].float(), self.layer.experts.act_fn)
            if probs is not None:  # activation-with-router-logits: scale by each member's router probability
                act = act * probs[tokens][:, members].T[:, :, None]
            feats = act.permute(1, 0, 2).reshape(tokens.numel(), -1).to(torch.float64)  # [t, nI]
            self._add(f"{gi}.sum", feats.sum(0))
            self._add(f"{gi}.gram", feats.T @ feats)
            self.counts[gi] += int(tokens.numel())


def _parts(jobs: list, partition: int) -> list[list]:
    """``partition`` parts of the job list (clamped to the number of jobs, never zero parts)."""
    n = max(1, min(partition, len(jobs)))
    return [[jobs[i] for i in chunk] for chunk in np.array_split(np.arange(len(jobs)), n) if len(chunk)]


def similarity_for_group(acc: GroupActivationMoments | None, gi: int, gate_up: torch.Tensor, down: torch.Tensor,
                         ingredient: str) -> torch.Tensor:
    """The neuron similarity ``K`` of the ``ingredient`` (see :mod:`moemerge.merge.zipit`)."""
    from ..merge.zipit import correlation, covariance_from_moments, weight_correlation

    k = None
    count = acc.counts[gi] if acc is not None else 0
    if ingredient in ("act", "act+weight"):
        if count >= 2:
            k = correlation(covariance_from_moments(acc.sums[f"{gi}.sum"], acc.sums[f"{gi}.gram"], count)).cpu()
        else:
            LOG.warning("layer %s group %s: %d routed calibration tokens, using the weight ingredient",
                        acc.layer.index if acc else "?", gi, count)
    if ingredient in ("weight", "act+weight") or k is None:
        w = weight_correlation(gate_up, down)
        k = w if k is None or ingredient == "weight" else k + w
    return k


@torch.no_grad()
def neuron_assignments(loaded, recipe, plan: MergePlan, stats, settings, progress: bool = True,
                       only: list[int] | None = None, stop_after=None):
    """Stats with, per layer, entry ``group_assign`` = {"m1,m2,...": neuron cluster ids [n·I]} for every group of
    more than one expert, computed with ``recipe.merge``'s matching from ``recipe.ingredient`` / ``recipe.mode``.
    ``only`` restricts it to those MoE layer indices; ``stop_after`` cuts each forward after that MoE layer."""
    from ..merge.zipit import ASSIGN_STAT, assignment, group_key
    from . import Stats, calibration_windows

    model = loaded.model
    layers = {layer.index: layer for layer in moe_layers(model)}
    jobs = [(li, members, dom) for li, lp in sorted(plan.layers.items()) if only is None or li in only
            for members, dom in zip(lp.groups, lp.dominant) if len(members) > 1]
    new_layers = {li: dict(per) for li, per in stats.layers.items()}
    for li, _, _ in jobs:
        new_layers.setdefault(li, {})[ASSIGN_STAT] = {}
    wins = None
    use_act = recipe.ingredient in ("act", "act+weight")
    with_router = recipe.mode in ("activation-with-router-logits", "all")
    for part in _parts(jobs, recipe.partition):
        by_layer: dict[int, list[tuple[list[int], int]]] = {}
        for li, members, dom in part:
            by_layer.setdefault(li, []).append((members, dom))
        accs: dict[int, GroupActivationMoments] = {}
        if use_act:
            if wins is None:
                wins, _ = calibration_windows(loaded, settings)
            device = next(model.parameters()).device
            for li, groups in by_layer.items():
                accs[li] = GroupActivationMoments(layers[li], device, [g for g, _ in groups], with_router,
                                                  recipe.data_limit)
            # Stop as soon as every group has its data_limit of tokens: the rest of the text adds nothing.
            run_observed(model, wins, {li: [acc] for li, acc in accs.items()}, [layers[li] for li in by_layer],
                         settings.train_batch_size, progress, stop_after, desc="group pass",
                         until=lambda accs=accs: all(a.full() for a in accs.values()))
        for li, groups in by_layer.items():
            gate_up, down = layers[li].expert_weights()
            inter = down.shape[-1]
            for gi, (members, dom) in enumerate(groups):
                idx = torch.tensor(members, device=gate_up.device)
                k = similarity_for_group(accs.get(li), gi, gate_up[idx].float().cpu(), down[idx].float().cpu(),
                                         recipe.ingredient)
                assign = assignment(recipe.merge, k, len(members), inter, members.index(dom))
                new_layers[li][ASSIGN_STAT][group_key(members)] = torch.as_tensor(assign)
        del accs  # free this part's Gram matrices before the next pass
    meta = dict(stats.meta, group_passes=len(_parts(jobs, recipe.partition)) if use_act else 0)
    return Stats(new_layers, meta)
