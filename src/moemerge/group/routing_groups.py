"""Grouping that respects group-limited routing (``n_group > 1``: DeepSeek-V3, Kimi-K2, GLM-4.5, DeepSeek-V2's
``group_limited_greedy``).

Those routers view the experts as ``n_group`` contiguous blocks of ``E / n_group`` ids, keep the ``topk_group`` best
blocks per token and choose the top-k inside them (:class:`~moemerge.families.Routing`). A checkpoint with fewer
experts is only the same kind of router if every block shrinks alike and no group of merged experts straddles two
blocks. So when the format changes the expert count (``collapse``/``compact``, pruning), each layer is planned block
by block: block ``b`` of ``E / n_group`` experts becomes ``target / n_group`` groups (or kept experts), made by the
recipe's own clustering, random split or pruning criterion on that block's experts only. Merged expert ``g`` then
lies in routing block ``g // (target / n_group)``, so the router's rows and its score-correction bias are cut in
lockstep and the config's ``n_group`` and ``topk_group`` stay valid unchanged.

:func:`check_routing_groups` refuses, from the config alone (before any weight is read), budgets that cannot be met
that way and grouping options that choose per-layer counts (they cannot keep the blocks equal).
"""

from __future__ import annotations

import numpy as np

from ..errors import MoemergeError
from .cluster import closest_to_centre
from .plan import LayerPlan


def valid_budgets(num_experts: int, groups: int, topk_group: int, top_k: int, min_per_group: int) -> list[int]:
    """Expert counts a layer of ``num_experts`` may keep under group-limited routing: a multiple of ``groups``, each
    block keeping at least ``min_per_group`` experts (DeepSeek-V3 scores a block by its best two) and the chosen blocks
    holding at least ``top_k`` experts together."""
    size = num_experts // groups
    return [groups * m for m in range(1, size + 1) if m >= min_per_group and m * topk_group >= top_k]


def check_routing_groups(recipe, spec, config, num_experts: int, top_k: int) -> int:
    """The number of routing blocks the plan must respect (1 when none), or a one-line error for a budget or option
    that cannot keep every routing group the same size. Called only for formats that change the expert count."""
    groups = spec.expert_groups(config)
    if groups <= 1:
        return 1
    head = f"{spec.name} routes within n_group={groups} groups of contiguous experts"
    if num_experts % groups:
        raise MoemergeError(f"{head}, but {num_experts} experts do not split into {groups} groups")
    options = (("multi_layer", recipe.multi_layer > 1), ("dynamic_group", recipe.dynamic_group),
               ("hierarchical_stopping_metric", recipe.hierarchical_stopping_metric),
               ("dominant=frequency", recipe.prune == "no" and recipe.dominant == "frequency"))
    nonuniform = [name for name, on in options if on]
    if nonuniform:
        raise MoemergeError(f"{head}; {nonuniform[0]} chooses per-layer counts, which cannot keep every routing group "
                            f"the same size (use dominant=no or random, or prune, or --format keep)")
    target = recipe.num_average_groups
    topk_group = int(getattr(config, spec.topk_group_key, 1) or 1)
    valid = valid_budgets(num_experts, groups, topk_group, top_k, spec.min_per_group(config))
    if target not in valid:
        near = [v for v in (max((v for v in valid if v < target), default=None),
                            min((v for v in valid if v > target), default=None)) if v is not None]
        raise MoemergeError(
            f"{head}: every group must keep the same number of experts (at least {spec.min_per_group(config)}, with "
            f"topk_group={topk_group} groups holding top-k={top_k}), so {num_experts} → {target} is impossible; "
            f"nearest valid: {', '.join(map(str, near))} (all valid: {', '.join(map(str, valid))})")
    return groups


def _combine(layer: int, num_experts: int, parts: list[tuple[int, LayerPlan]]) -> LayerPlan:
    """One layer's plan from per-block plans ``(offset of the block, plan over its local ids)``."""
    groups, dominant, dropped = [], [], []
    for offset, part in parts:
        groups += [[offset + e for e in g] for g in part.groups]
        dominant += [offset + d for d in part.dominant]
        dropped += [offset + e for e in part.dropped]
    # blocks are contiguous and in order, and each block's groups are sorted by first member: so are these
    return LayerPlan(layer, num_experts, groups, dominant, sorted(dropped))


def blockwise_plans(ctx, groups: int) -> dict[int, LayerPlan]:
    """Each merged layer planned routing block by routing block (module docstring), with the recipe's pruning
    criterion, ``dominant=random`` or its clustering (``dominant=no``) on each block's experts."""
    from .dominant import random_plan
    from .prune import PRUNE, prune_plan

    recipe = ctx.recipe
    plans = {}
    for layer in ctx.layers:
        li, num_experts = layer.index, layer.num_experts
        size, per = num_experts // groups, ctx.targets[li] // groups
        if ctx.targets[li] % groups or num_experts % groups:
            raise MoemergeError(f"layer {li}: {num_experts} → {ctx.targets[li]} experts does not split into "
                                f"{groups} equal routing groups")
        blocks = [np.arange(b * size, (b + 1) * size) for b in range(groups)]
        parts: list[tuple[int, LayerPlan]] = []
        if recipe.prune != "no":
            scores = PRUNE.get(recipe.prune).score(ctx.stats, li)
            parts = [(int(blk[0]), prune_plan(li, scores[blk], per)) for blk in blocks]
        elif recipe.dominant == "random":
            parts = [(int(blk[0]), random_plan(li, size, per, recipe.seed, recipe.group_limit, block=b))
                     for b, blk in enumerate(blocks)]
        elif recipe.dominant == "no":
            feats = np.asarray(ctx.features(layer))
            for blk in blocks:
                f = feats[blk]
                labels = ctx.cluster(layer, per, f)
                parts.append((int(blk[0]), LayerPlan.from_labels(li, labels, lambda g, f=f: closest_to_centre(f, g))))
        else:
            raise MoemergeError(f"dominant={recipe.dominant} cannot plan within routing groups (use dominant=no or "
                                f"random, or prune)")
        plans[li] = _combine(li, num_experts, parts)
    return plans
