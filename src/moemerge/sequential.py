"""``sequential: true``: calibrate and merge one MoE layer at a time, on the model whose earlier layers are already
merged (the layer-sequential pipeline of llm-compressor, ``docs/quality.md``).

For layer ``i``: hook only layer ``i``, run the calibration windows through the model (each forward is cut right
after block ``i``: later layers cannot change what ``i`` sees), group ``i``'s experts, run the merge method's
plan-aware pass if it has one (``fit``: again only up to block ``i``), merge and write layer ``i`` into the model,
free its statistics, go on. So layer ``i`` is merged for the hidden states it will really receive after the earlier
merges, and only one layer's statistics are in memory at a time (besides each layer's frequencies, kept for
``merge_info.json``).

Cost: the forward passes reach layer ``i`` for every ``i``, about ``L/2`` full passes for ``L`` layers (twice that
with ``merge: fit``), and the statistics cannot be cached (they depend on the earlier merges). Per-layer grouping
strategies only: options that allocate experts across layers (``multi_layer``, ``dynamic_group``,
``hierarchical_stopping_metric``) need every layer's statistics at once and are refused.
"""

from __future__ import annotations

import logging
import time

import torch

from .calibrate import Stats, calibration_windows
from .calibrate.observer import run_observed
from .errors import MoemergeError
from .families import family_of, moe_layers
from .group import merged_layers, needed_statistics, plan_groups
from .group.plan import LayerPlan, MergePlan
from .loading import LoadedModel
from .merge import MERGE, merge_layer
from .recipe import Recipe
from .save import FORMATS, apply_plan, check_plan, count_parameters, router_adapt_for, router_statistics

LOG = logging.getLogger(__name__)


def _check_per_layer(recipe: Recipe) -> None:
    if getattr(FORMATS.get(recipe.router), "padded", False):
        raise MoemergeError(f"sequential=true writes one layer at a time; router={recipe.router} pads layers to the "
                            f"largest count of all layers (use keep or collapse)")
    for name, default in (("multi_layer", 1), ("dynamic_group", False), ("hierarchical_stopping_metric", None)):
        if getattr(recipe, name, default) != default:
            raise MoemergeError(f"sequential=true merges one layer at a time; {name} allocates experts across "
                                f"layers and needs them all at once (drop one of the two)")


def _set_expert_count(model, plan: MergePlan, router: str) -> None:
    """What :func:`moemerge.save.apply_plan` does to the config once every layer is written."""
    fmt = FORMATS.get(router)
    if not fmt.changes_count:
        return
    counts = plan.counts().values()
    count = max(counts) if getattr(fmt, "padded", False) else next(iter(counts))
    for key in family_of(model.config).num_experts_keys:
        if hasattr(model.config, key):
            setattr(model.config, key, count)


def merge_sequential(loaded: LoadedModel, recipe: Recipe, progress: bool = True):
    """Layer-by-layer :func:`moemerge.pipeline.merge_model` (same result type, model merged in place)."""
    from .pipeline import MergeResult, calibration_settings, validate_for_model

    model = loaded.model
    validate_for_model(recipe, model)
    _check_per_layer(recipe)
    spec = family_of(model.config)
    top_k = spec.top_k(model.config)
    result = MergeResult(recipe, None, None, count_parameters(model), count_parameters(model))
    if recipe.merge == "no" or recipe.num_average_groups is None:
        return result
    settings = calibration_settings(recipe, model)
    wins, description = calibration_windows(loaded, settings)
    method = MERGE.get(recipe.merge)
    names = list(dict.fromkeys(needed_statistics(recipe) + list(method.statistics(recipe))
                               + router_statistics(recipe.router, router_adapt_for(recipe, spec))))
    layers = moe_layers(model)
    plans = {layer.index: LayerPlan.identity(layer.index, layer.num_experts) for layer in layers}
    frequencies: dict[int, dict] = {}
    meta = {"model": loaded.source, "model_fingerprint": loaded.fingerprint, "calibration": description,
            "windows": list(wins.shape), "sequential": True, "from_cache": [], "model_runs": 0}
    timings = {"calibrate": 0.0, "group": 0.0, "merge": 0.0}
    for layer in merged_layers(layers, recipe.start_layer):
        t0 = time.perf_counter()
        observer = run_observed(model, wins, None, [layer], settings.train_batch_size, progress, stop_after=layer,
                                desc=f"layer {layer.index}", names=names)
        stats = Stats(observer.results(), meta)
        meta["model_runs"] += 1
        t1 = time.perf_counter()
        layer_plan = plan_groups(recipe, stats, [layer], top_k).layers[layer.index]
        full = MergePlan({**plans, layer.index: layer_plan})
        check_plan(MergePlan({layer.index: layer_plan}), recipe.router, top_k)
        if method.prepare is not None and not layer_plan.is_identity:  # this layer only, cut after it
            stats = method.prepare(loaded, recipe, full, stats, settings, progress, layers=[layer.index],
                                   stop_after=layer)
            meta["model_runs"] += 1
        t2 = time.perf_counter()
        sample = None
        if recipe.router_fit and not layer_plan.is_identity:
            from .save.router_refit import capture

            sample = capture(model, [layer], wins, settings.train_batch_size, progress, stop_after=layer)
            meta["model_runs"] += 1
        with torch.no_grad():
            if not layer_plan.is_identity:
                merged = merge_layer(layer, layer_plan, recipe.merge, stats, recipe.mode, recipe=recipe)
                # Every other layer is identity in this plan, so only layer i is written (earlier ones stay).
                apply_plan(model, MergePlan({**{li: LayerPlan.identity(li, p.num_experts) for li, p in plans.items()},
                                             layer.index: layer_plan}),
                           {layer.index: merged}, {layer.index: stats.frequency(layer.index)}, recipe.router,
                           router_adapt_for(recipe, spec), stats=stats)
                if sample and layer.index in sample:
                    from .save.router_refit import refit_layer

                    refit_layer(layer, sample[layer.index], top_k, spec.renormalizes(model.config))
        plans[layer.index] = layer_plan
        frequencies[layer.index] = stats.layers[layer.index]["frequency"]
        del stats, observer  # one layer's statistics at a time
        timings["calibrate"] += t1 - t0
        timings["group"] += t2 - t1
        timings["merge"] += time.perf_counter() - t2
        LOG.info("layer %d: %d groups", layer.index, layer_plan.num_groups)
    plan = MergePlan(plans)
    _set_expert_count(model, plan, recipe.router)
    result.plan = plan
    result.stats = Stats({li: {"frequency": f} for li, f in frequencies.items()}, meta)
    result.parameters_after = count_parameters(model)
    result.timings.update(timings)
    return result
