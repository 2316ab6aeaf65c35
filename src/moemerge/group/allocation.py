"""Sub-MoE's multi-layer adaptive allocation of expert counts (arXiv 2506.23266, §"Adaptive Expert Clustering").

The paper clusters "multi-layer experts under a target overall compression ratio" so that "layers with higher expert
similarity naturally form fewer, more cohesive clusters", but gives no formula. Experts only ever merge inside their
own layer, so the joint step can only decide *how many* groups each layer gets. We follow the reading of REAP's
``multi_layer_kmeans_clustering_on_ca`` (our own code):

1. the budget is ``num_average_groups × number of merged layers``; layers are taken in blocks of ``multi_layer``
   adjacent layers and every block gets ``num_average_groups × its size`` (``multi_layer = 1`` is the uniform split);
2. inside a block, the ``Σ E_l − budget`` merges are handed out one at a time to the layer whose *next* merge costs
   least: the increase of its clustering cost (k-means objective, eq. 3: within-cluster sum of squared distances of
   the expert features) when going from ``c`` to ``c − 1`` groups;
3. no layer goes below the model's top-k (every token needs k distinct experts).

Each count is priced on the clusters the recipe's own clustering makes (so the clusters finally used are the ones
that were priced), but the cost J is measured on the experts' *raw* output collections (eq. 3 as the paper writes
it, statistic ``expert_output_gram``): the mean squared output change per token. Costs are compared *across
layers*, so they must share units. The normalised (cosine) features are scale-free, which is what we want for
clustering inside a layer but wrong between layers: measured on the bundled tiny-mixtral (8 → 6 average, blocks of
2), pricing on cosine features sent merges to layers 0 and 3 (counts 4, 8, 8, 4) and held-out perplexity rose
15×, while pricing in output units gave counts 8, 4, 5, 7 and a rise of a few percent.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np

from ..errors import MoemergeError

# (layer index, number of groups) -> clustering cost; non-increasing in the number of groups
CostFn = Callable[[int, int], float]


def cluster_cost(features: np.ndarray, labels: np.ndarray) -> float:
    """k-means objective J = Σ_clusters Σ_members ‖x − centroid‖² (Sub-MoE eq. 3)."""
    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    cost = 0.0
    for lab in np.unique(labels):
        pts = x[labels == lab]
        cost += float(((pts - pts.mean(0)) ** 2).sum())
    return cost


def block_layers(layers: list[int], multi_layer: int) -> list[list[int]]:
    """Consecutive blocks of ``multi_layer`` layers (the last block may be shorter)."""
    if multi_layer < 1:
        raise MoemergeError(f"multi_layer must be at least 1, got {multi_layer}")
    return [layers[i:i + multi_layer] for i in range(0, len(layers), multi_layer)]


def allocate_block(num_experts: dict[int, int], budget: int, top_k: int, cost: CostFn) -> dict[int, int]:
    """Greedy allocation inside one block: start with every expert, merge one at a time where it is cheapest.

    Args:
        num_experts: experts per layer of the block.
        budget: groups the block must end with (exactly).
        top_k: lower bound per layer.
        cost: ``cost(layer, c)``; made non-increasing in ``c`` here, since a heuristic clustering with fewer
            groups can occasionally come out cheaper, which would make a merge look like a gain.

    Ties go to the earlier layer, so the result is deterministic.
    """
    floor = {li: min(top_k, e) for li, e in num_experts.items()}
    if not sum(floor.values()) <= budget <= sum(num_experts.values()):
        raise MoemergeError(f"cannot give layers {sorted(num_experts)} {budget} groups in all: needs between "
                            f"{sum(floor.values())} (top-k each) and {sum(num_experts.values())}")

    @cache
    def monotone(li: int, c: int) -> float:
        # cost(c) never below the cost with more groups: cummin from the full count downwards.
        value = cost(li, c)
        return value if c >= num_experts[li] else max(value, monotone(li, c + 1))

    counts = dict(num_experts)
    for _ in range(sum(num_experts.values()) - budget):
        best, best_delta = None, np.inf
        for li in sorted(counts):
            c = counts[li]
            if c <= floor[li]:
                continue
            delta = monotone(li, c - 1) - monotone(li, c)
            if delta < best_delta:
                best, best_delta = li, delta
        counts[best] -= 1
    return counts


def allocate(num_experts: dict[int, int], groups_per_layer: int, multi_layer: int, top_k: int,
             cost: CostFn) -> dict[int, int]:
    """Per-layer group counts for the whole model: blocks of ``multi_layer`` adjacent layers, each with budget
    ``groups_per_layer × len(block)``, split by :func:`allocate_block`. The total is exactly
    ``groups_per_layer × len(num_experts)`` and ``multi_layer = 1`` returns ``groups_per_layer`` everywhere."""
    out: dict[int, int] = {}
    for block in block_layers(sorted(num_experts), multi_layer):
        sub = {li: num_experts[li] for li in block}
        out.update(allocate_block(sub, groups_per_layer * len(block), top_k, cost))
    return out


# Statistic whose similarity base measures the allocation cost (see the module docstring).
COST_FEATURES = "expert-output-collection"


def adaptive_targets(ctx) -> dict[int, int]:
    """Targets for :class:`~moemerge.group.GroupingContext` ``ctx`` from its recipe's ``multi_layer``: each count is
    clustered with the recipe's clustering and features, and priced in output units (``COST_FEATURES``)."""
    from .similarity import SIMILARITY

    recipe = ctx.recipe
    by_index = {layer.index: layer for layer in ctx.layers}
    features = {li: ctx.features(layer) for li, layer in by_index.items()}
    priced_on = SIMILARITY.get(COST_FEATURES)
    outputs = {li: priced_on.features(ctx.stats, layer) for li, layer in by_index.items()}

    def cost(li: int, c: int) -> float:
        return cluster_cost(outputs[li], ctx.cluster(by_index[li], c, features[li]))

    return allocate({li: layer.num_experts for li, layer in by_index.items()}, recipe.num_average_groups,
                    recipe.multi_layer, ctx.top_k, cost)
