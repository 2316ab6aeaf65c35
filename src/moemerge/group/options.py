"""How the grouping options combine: which strategy runs (:func:`run_grouping`), what statistics it needs
(:func:`extra_statistics`), and which option combinations make sense (:func:`check_combinations`, called by the
recipe's validator so every entry point — CLI, YAML, Python — gets the same one-line error).

* ``prune`` (not ``no``): score experts and drop all but ``num_average_groups`` per layer (:mod:`.prune`).
* ``hierarchical_stopping_metric=distance``: non-uniform hierarchical clustering of all merged layers cut at one
  global distance threshold that meets the budget exactly (:func:`global_threshold_grouping`).
* ``dynamic_group``: the per-layer counts of ``dominant=frequency``, then the usual clustering per layer.
* otherwise the ``dominant`` strategy with ``num_average_groups`` groups in every layer.
"""

from __future__ import annotations

import numpy as np

from . import GROUPING, GroupingContext
from .budget import frequency_budget, threshold_counts
from .cluster import LINKAGE, closest_to_centre
from .overlap import OVERLAP_STATISTIC
from .plan import LayerPlan
from .prune import PRUNE, prune_plan

STOPPING_METRICS = ("distance",)


def frequency_counts(ctx: GroupingContext) -> dict[int, int]:
    """Per-layer group counts of ``dominant=frequency`` (used by ``dynamic_group``)."""
    freqs = {layer.index: ctx.stats.frequency(layer.index).numpy() for layer in ctx.layers}
    kept = frequency_budget(freqs, ctx.recipe.num_average_groups * len(ctx.layers), max(1, ctx.top_k))
    return {li: len(v) for li, v in kept.items()}


def global_threshold_grouping(ctx: GroupingContext) -> dict[int, LayerPlan]:
    """One dendrogram per layer, all cut at one global height (:func:`.budget.threshold_counts`).

    Heights are compared across layers in the similarity base's own units, on purpose: with ``expert-output``
    features a merge height is an output difference, so a layer whose experts differ little in what they add to the
    residual stream gives up experts first. Rescaling each layer to unit mean distance (tried first) makes heights
    scale-free and measured worse on both bundled models: tiny-mixtral 8 → 4 on average, ×8.5 perplexity normalised
    against ×1.36 in output units; tiny-qwen-moe 16 → 8, ×1.136 against ×1.121.
    """
    from scipy.cluster.hierarchy import cut_tree, linkage

    feats, trees, heights = {}, {}, {}
    for layer in ctx.layers:
        feats[layer.index] = np.asarray(ctx.features(layer), dtype=np.float64)
        trees[layer.index] = linkage(feats[layer.index], method=LINKAGE.get(ctx.recipe.linkage), metric="euclidean")
        heights[layer.index] = np.maximum.accumulate(trees[layer.index][:, 2])  # guard against round-off dips
    sizes = {layer.index: layer.num_experts for layer in ctx.layers}
    counts = threshold_counts(heights, sizes, ctx.recipe.num_average_groups * len(ctx.layers), max(1, ctx.top_k))
    plans = {}
    for layer in ctx.layers:
        li, k = layer.index, counts[layer.index]
        labels = np.arange(sizes[li]) if k == sizes[li] else cut_tree(trees[li], n_clusters=k).reshape(-1)
        plans[li] = LayerPlan.from_labels(li, labels, lambda g, f=feats[li]: closest_to_centre(f, g))
    return plans


def prune_layers(ctx: GroupingContext) -> dict[int, LayerPlan]:
    criterion = PRUNE.get(ctx.recipe.prune)
    return {layer.index: prune_plan(layer.index, criterion.score(ctx.stats, layer.index), ctx.targets[layer.index])
            for layer in ctx.layers}


def run_grouping(ctx: GroupingContext) -> dict[int, LayerPlan]:
    """The plans of the merged layers for the recipe's grouping options."""
    recipe = ctx.recipe
    if ctx.routing_groups > 1:
        from .routing_groups import blockwise_plans

        return blockwise_plans(ctx, ctx.routing_groups)
    if recipe.prune != "no":
        return prune_layers(ctx)
    if recipe.hierarchical_stopping_metric:
        return global_threshold_grouping(ctx)
    if recipe.dynamic_group:
        ctx.targets = frequency_counts(ctx)
    return GROUPING.get(recipe.dominant).run(ctx)


def extra_statistics(recipe) -> list[str]:
    """Statistics the grouping options need beyond ``frequency`` and the similarity base's own."""
    if recipe.prune != "no":
        return list(PRUNE.get(recipe.prune).needs)
    if recipe.multi_layer > 1:  # the allocation prices counts in output units (group/allocation.py)
        from .allocation import COST_FEATURES
        from .similarity import SIMILARITY

        return list(SIMILARITY.get(COST_FEATURES).needs)
    if recipe.dominant == "frequency" and recipe.similarity_base == "expert-output":
        return [OVERLAP_STATISTIC[recipe.overlap_metric]]
    return []


def check_combinations(recipe) -> None:
    """Raise ``ValueError`` (one line, naming the valid choices) for grouping options that do not apply together
    (the merge methods check their own ``mode``, ``ingredient`` and ``data_limit``: ``merge.check_options``)."""
    given = recipe.explicit()
    merge = recipe.merge
    if recipe.prune != "no":
        if merge not in ("freq", "no"):
            raise ValueError(f"prune={recipe.prune} drops experts and merges nothing; merge must be freq or no "
                             f"(got {merge!r})")
        if recipe.dominant != "no" or recipe.dynamic_group or recipe.hierarchical_stopping_metric:
            raise ValueError("prune keeps the best experts of every layer; dominant, dynamic_group and "
                             "hierarchical_stopping_metric do not apply")
        if recipe.router == "keep":
            raise ValueError("pruning drops experts, which router=keep cannot save; use router=collapse")
    metric = recipe.hierarchical_stopping_metric
    if metric is not None:
        if metric not in STOPPING_METRICS:
            raise ValueError(f"unknown hierarchical_stopping_metric {metric!r}; valid choices: "
                             f"{', '.join(STOPPING_METRICS)}")
        if recipe.dominant != "no" or recipe.cluster != "hierarchical" or recipe.dynamic_group:
            raise ValueError("hierarchical_stopping_metric needs dominant=no, cluster=hierarchical and no "
                             "dynamic_group")
    if recipe.dynamic_group and recipe.dominant != "no":
        raise ValueError(f"dynamic_group clusters with the counts of dominant=frequency; it needs dominant=no "
                         f"(got {recipe.dominant!r})")
    if recipe.group_limit is not None and recipe.dominant not in ("frequency", "random"):
        raise ValueError(f"group_limit applies to single-shot grouping (dominant=frequency or random), not "
                         f"dominant={recipe.dominant!r}")
    if "overlap_metric" in given and (recipe.dominant != "frequency" or recipe.similarity_base != "expert-output"):
        raise ValueError("overlap_metric applies to single-shot grouping on expert outputs: dominant=frequency "
                         "and similarity_base=expert-output")
