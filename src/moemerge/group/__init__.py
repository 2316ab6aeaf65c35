"""Stage 2, group: decide which experts of each layer merge together.

``dominant`` picks the grouping strategy (registry :data:`GROUPING`): ``no`` clusters the experts' features
(``similarity_base`` × ``cluster`` × ``linkage``); other strategies register here the same way. Each returns one
:class:`LayerPlan` per merged layer; layers before ``start_layer`` stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..calibrate import Stats
from ..errors import MoemergeError
from ..families import MoeLayer
from ..recipe import Recipe
from ..registry import Registry
from .cluster import CLUSTER, LINKAGE, closest_to_centre
from .plan import LayerPlan, MergePlan
from .similarity import SIMILARITY

__all__ = ["GROUPING", "GroupingContext", "LayerPlan", "MergePlan", "plan_groups", "CLUSTER", "LINKAGE",
           "SIMILARITY", "uniform_targets", "needs_all_layers", "needed_statistics", "merged_layers"]


@dataclass
class GroupingContext:
    """What a grouping strategy may look at."""

    recipe: Recipe
    stats: Stats
    layers: list[MoeLayer]  # the MoE layers to merge (start_layer applied)
    top_k: int
    targets: dict[int, int]  # groups wanted per layer index
    routing_groups: int = 1  # > 1: plan inside the router's groups of contiguous experts (.routing_groups)

    def features(self, layer: MoeLayer) -> np.ndarray:
        return SIMILARITY.get(self.recipe.similarity_base).features(self.stats, layer)

    def cluster(self, layer: MoeLayer, k: int, features: np.ndarray | None = None) -> np.ndarray:
        feats = self.features(layer) if features is None else features
        return CLUSTER.get(self.recipe.cluster)(
            feats, k, linkage_method=self.recipe.linkage, seed=self.recipe.seed,
            random_start_center=self.recipe.random_start_center)


@dataclass(frozen=True)
class GroupingStrategy:
    run: Callable[[GroupingContext], dict[int, LayerPlan]]
    uses_similarity: bool
    description: str


GROUPING: Registry[GroupingStrategy] = Registry("dominant")


def _cluster_layers(ctx: GroupingContext) -> dict[int, LayerPlan]:
    plans = {}
    for layer in ctx.layers:
        feats = ctx.features(layer)
        labels = ctx.cluster(layer, ctx.targets[layer.index], feats)
        plans[layer.index] = LayerPlan.from_labels(layer.index, labels, lambda g, f=feats: closest_to_centre(f, g))
    return plans


GROUPING.add("no", GroupingStrategy(_cluster_layers, True,
                                    "cluster experts; the member closest to each centre is the dominant one"))


def uniform_targets(layers: list[MoeLayer], groups: int, top_k: int) -> dict[int, int]:
    """``num_average_groups`` in every merged layer, checked against top-k and the expert count."""
    for layer in layers:
        if groups > layer.num_experts:
            raise MoemergeError(f"num_average_groups={groups} exceeds the {layer.num_experts} experts of layer "
                                f"{layer.index}")
    if groups < top_k:
        raise MoemergeError(f"num_average_groups={groups} is below the model's top-k ({top_k}): every token "
                            f"needs {top_k} distinct experts")
    return {layer.index: groups for layer in layers}


def merged_layers(all_layers: list[MoeLayer], start_layer: int) -> list[MoeLayer]:
    return [layer for layer in all_layers if layer.index >= start_layer]


def plan_groups(recipe: Recipe, stats: Stats, all_layers: list[MoeLayer], top_k: int,
                routing_groups: int = 1) -> MergePlan:
    """The plan for every MoE layer: strategy ``recipe.dominant`` on layers from ``start_layer``, identity before.
    ``routing_groups > 1`` (group-limited routing saved with fewer experts): every routing group of contiguous
    experts is planned on its own to the same count (:mod:`.routing_groups`)."""
    layers = merged_layers(all_layers, recipe.start_layer)
    plans = {layer.index: LayerPlan.identity(layer.index, layer.num_experts) for layer in all_layers}
    if recipe.num_average_groups is None or not layers:
        return MergePlan(plans)
    targets = uniform_targets(layers, recipe.num_average_groups, top_k)
    ctx = GroupingContext(recipe, stats, layers, top_k, targets, routing_groups)
    if recipe.multi_layer > 1:  # Sub-MoE adaptive allocation: same total, counts chosen per block of layers
        if not GROUPING.get(recipe.dominant).uses_similarity:
            raise MoemergeError(f"multi_layer={recipe.multi_layer} prices clusterings, so it needs a clustering "
                                f"grouping (dominant=no), not dominant={recipe.dominant}")
        from .allocation import adaptive_targets

        ctx.targets = adaptive_targets(ctx)
    plans.update(run_grouping(ctx))  # dominant strategy, or prune / dynamic / global threshold (.options)
    return MergePlan(plans)


def needs_all_layers(recipe: Recipe) -> bool:
    """Whether the plan compares layers, so every layer's statistics must be in before any layer is grouped: Sub-MoE's
    multi-layer allocation, the global distance threshold, the global frequency dominants and the frequency budgets
    of ``dynamic_group``. Every other strategy plans each layer from its own statistics alone."""
    return recipe.num_average_groups is not None and recipe.prune == "no" and (
        recipe.multi_layer > 1 or recipe.hierarchical_stopping_metric is not None or recipe.dynamic_group
        or recipe.dominant == "frequency")


def needed_statistics(recipe: Recipe) -> list[str]:
    names = ["frequency"]
    if recipe.num_average_groups is not None and GROUPING.get(recipe.dominant).uses_similarity:
        names += SIMILARITY.get(recipe.similarity_base).needs
    if recipe.num_average_groups is not None:
        names += extra_statistics(recipe)
    return names


from . import dominant, overlap, prune  # noqa: E402,F401  (register strategies and statistics)
from .options import extra_statistics, run_grouping  # noqa: E402
