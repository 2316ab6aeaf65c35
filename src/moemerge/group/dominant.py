"""Single-shot grouping strategies (``dominant``): pick dominant experts first, then give every other expert to one
of them (HC-SMoE option document; MC-SMoE, Li et al. 2024, §3.1).

* ``random``: experts shuffled with the recipe's seed (per layer) and cut into groups of near-equal size; the first
  expert of each shuffled group is its dominant one. A baseline.
* ``frequency``: the globally most frequently routed experts become dominant (:func:`.budget.frequency_budget`), so
  per-layer counts differ but total ``num_average_groups × layers`` exactly, with at least ``max(1, top-k)`` per layer;
  every other expert joins its most similar dominant expert (``similarity_base``; with ``expert-output``, the
  ``overlap_metric`` of :mod:`.overlap`).

``group_limit`` caps group sizes for both: an expert whose most similar dominant is full goes to the next most
similar one with room; experts are placed most-confident first. ``groups × limit < experts`` is refused up front.
"""

from __future__ import annotations

import numpy as np

from ..errors import MoemergeError
from ..families import MoeLayer
from . import GROUPING, GroupingContext, GroupingStrategy
from .budget import frequency_budget
from .overlap import overlap_similarity
from .plan import LayerPlan


def check_group_limit(num_experts: int, groups: int, limit: int | None, layer: int) -> None:
    if limit is not None and groups * limit < num_experts:
        raise MoemergeError(f"group_limit={limit} is infeasible in layer {layer}: {groups} groups of at most {limit} "
                            f"cannot hold {num_experts} experts (need group_limit >= {-(-num_experts // groups)})")


def similarity_matrix(ctx: GroupingContext, layer: MoeLayer) -> np.ndarray:
    """``[E, E]`` similarity between experts (higher = more alike) for single-shot grouping."""
    if ctx.recipe.similarity_base == "expert-output":
        return overlap_similarity(ctx.stats, layer.index, ctx.recipe.overlap_metric)
    f = np.asarray(ctx.features(layer), dtype=np.float64)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    f = f / np.where(norms > 0, norms, 1.0)
    return f @ f.T  # cosine similarity of the features (MC-SMoE compares router-logit columns by cosine)


def assign_to_dominants(layer: int, similarity: np.ndarray, dominants: list[int], limit: int | None = None
                        ) -> LayerPlan:
    """Every non-dominant expert joins its most similar dominant expert that still has room."""
    num_experts = similarity.shape[0]
    check_group_limit(num_experts, len(dominants), limit, layer)
    sim = np.nan_to_num(np.asarray(similarity, dtype=np.float64), nan=-np.inf)
    groups = {d: [d] for d in dominants}
    others = [e for e in range(num_experts) if e not in groups]
    cols = np.array(dominants)
    # Most confident first: experts with a clear favourite are placed before the limit starts to bite.
    others.sort(key=lambda e: (-sim[e, cols].max(), e))
    for e in others:
        for j in np.argsort(-sim[e, cols], kind="stable"):
            d = dominants[int(j)]
            if limit is None or len(groups[d]) < limit:
                groups[d].append(e)
                break
    ordered = sorted((sorted(g), d) for d, g in groups.items())
    return LayerPlan(layer, num_experts, [g for g, _ in ordered], [d for _, d in ordered])


def random_plan(layer: int, num_experts: int, groups: int, seed: int, limit: int | None = None,
                block: int | None = None) -> LayerPlan:
    """Random groups of near-equal size; ``block`` (a routing group planned on its own) gets its own stream."""
    check_group_limit(num_experts, groups, limit, layer)
    rng = np.random.default_rng([seed, layer] if block is None else [seed, layer, block])
    parts = np.array_split(rng.permutation(num_experts), groups)
    ordered = sorted((sorted(int(e) for e in p), int(p[0])) for p in parts)
    return LayerPlan(layer, num_experts, [g for g, _ in ordered], [d for _, d in ordered])


def _random(ctx: GroupingContext) -> dict[int, LayerPlan]:
    return {layer.index: random_plan(layer.index, layer.num_experts, ctx.targets[layer.index], ctx.recipe.seed,
                                     ctx.recipe.group_limit) for layer in ctx.layers}


def frequency_dominants(ctx: GroupingContext) -> dict[int, list[int]]:
    """The dominant experts of every merged layer under the global frequency budget."""
    freqs = {layer.index: ctx.stats.frequency(layer.index).numpy() for layer in ctx.layers}
    total = ctx.recipe.num_average_groups * len(ctx.layers)
    floor = max(1, ctx.top_k)
    if ctx.recipe.group_limit is not None:  # every layer needs enough dominants to hold its experts
        floor = max([floor] + [-(-layer.num_experts // ctx.recipe.group_limit) for layer in ctx.layers])
    return frequency_budget(freqs, total, floor)


def _frequency(ctx: GroupingContext) -> dict[int, LayerPlan]:
    dominants = frequency_dominants(ctx)
    return {layer.index: assign_to_dominants(layer.index, similarity_matrix(ctx, layer), dominants[layer.index],
                                             ctx.recipe.group_limit) for layer in ctx.layers}


GROUPING.add("random", GroupingStrategy(_random, False, "random groups of near-equal size (seeded)"))
GROUPING.add("frequency", GroupingStrategy(_frequency, True, "globally most frequent experts are dominant (non-uniform "
                                                             "counts); others join the most similar one"))
