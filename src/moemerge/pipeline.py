"""The whole job, stage by stage: load → calibrate → group → merge → save → evaluate.

:func:`merge_model` works in memory (no files written) so that a merged model can be evaluated or inspected right
away; :func:`run` is what ``moemerge merge`` does: it validates everything it can before the expensive part, measures
the original, merges, writes the checkpoint atomically, and measures again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .calibrate import CalibrationSettings, Stats, calibrate
from .calibrate.cache import versions
from .data import load_text
from .errors import MoemergeError
from .evaluate import default_ppl_sources, eval_texts, perplexities
from .families import family_of, moe_layers
from .group import merged_layers, needed_statistics, plan_groups, uniform_targets
from .group.plan import MergePlan
from .loading import LoadedModel, load_model
from .merge import MERGE, merge_layer
from .recipe import Recipe
from .save import (FORMATS, SaveReport, apply_plan, check_plan, count_parameters, original_config, prepare_output,
                   router_adapt_for, router_statistics, save_checkpoint)

LOG = logging.getLogger(__name__)


@dataclass
class MergeResult:
    recipe: Recipe
    plan: MergePlan | None
    stats: Stats | None
    parameters_before: int
    parameters_after: int
    timings: dict[str, float] = field(default_factory=dict)
    ppl_before: dict[str, float] = field(default_factory=dict)
    ppl_after: dict[str, float] = field(default_factory=dict)
    saved: SaveReport | None = None
    file_bytes_before: int | None = None
    fidelity: dict | None = None  # evaluate.fidelity.compare: KL, top-1 agreement, generations
    lm_eval_before: object | None = None  # evaluate.lm_eval.LmEvalResult of the original
    lm_eval_after: object | None = None  # ... and of the merged model
    report_path: Path | None = None
    router_fit: dict | None = None  # save.router_refit: per-layer error before/after refitting the collapsed router

    def summary(self) -> dict:
        out = {
            "recipe": self.recipe.model_dump(),
            "parameters": {"before": self.parameters_before, "after": self.parameters_after},
            "perplexity": {"before": self.ppl_before, "after": self.ppl_after},
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }
        if self.saved:
            out["file_bytes"] = {"before": self.file_bytes_before, "after": self.saved.file_bytes}
            out["output"] = str(self.saved.path)
        if self.plan:
            out["experts_per_layer"] = self.plan.counts()
        if self.stats:
            out["calibration"] = {k: self.stats.meta.get(k) for k in ("calibration", "windows", "model_runs",
                                                                      "from_cache")}
        if self.fidelity is not None:
            out["fidelity"] = self.fidelity
        if self.lm_eval_before is not None or self.lm_eval_after is not None:
            out["lm_eval"] = {k: None if v is None else v.to_json()
                              for k, v in (("before", self.lm_eval_before), ("after", self.lm_eval_after))}
        if self.report_path is not None:
            out["report"] = str(self.report_path)
        return out


def calibration_settings(recipe: Recipe, model) -> CalibrationSettings:
    max_pos = getattr(model.config, "max_position_embeddings", 2048) or 2048
    seq_len = recipe.seq_len or min(2048, max_pos)
    if seq_len > max_pos:
        raise MoemergeError(f"seq_len={seq_len} exceeds the model's max_position_embeddings ({max_pos})")
    return CalibrationSettings(recipe.calibration, recipe.n_sentences, seq_len, recipe.train_batch_size,
                               recipe.seed, recipe.cache)


def validate_for_model(recipe: Recipe, model) -> None:
    """Checks that need the model's config but no calibration: run them before any expensive step."""
    spec = family_of(model.config)
    top_k = spec.top_k(model.config)
    layers = merged_layers(moe_layers(model), recipe.start_layer)
    if recipe.merge == "no" or recipe.num_average_groups is None:
        return
    if not layers:
        raise MoemergeError(f"start_layer={recipe.start_layer} leaves no MoE layer to merge")
    uniform_targets(layers, recipe.num_average_groups, top_k)
    shrinks = FORMATS.get(recipe.router).changes_count
    if shrinks and spec.expert_groups(model.config) > 1:
        raise MoemergeError(f"{spec.name} routes within {spec.expert_groups(model.config)} groups of contiguous "
                            f"experts (n_group), which a changed expert count would scramble; use --format keep")
    if FORMATS.get(recipe.router).remote_code:
        from .save.mapped import check_family

        check_family(spec.name, recipe.router)
    if recipe.router_fit and not spec.route_exact:
        raise MoemergeError(f"router_fit re-routes tokens with softmax top-k, which is not {spec.name}'s routing")
    if shrinks and spec.scoring != "softmax" and "router_adapt" in recipe.model_fields_set \
            and recipe.router_adapt != "mean":
        raise MoemergeError(f"router_adapt={recipe.router_adapt} fits softmax routing; {spec.name} scores experts "
                            f"with a {spec.scoring}, so only router_adapt=mean applies")
    if recipe.router == "collapse" and recipe.start_layer > min(l.index for l in moe_layers(model)):
        raise MoemergeError("router=collapse needs every MoE layer merged to one count; start_layer leaves "
                            "earlier layers with all experts (use --router keep)")


def merge_model(loaded: LoadedModel, recipe: Recipe, progress: bool = True) -> MergeResult:
    """Merge ``loaded.model`` in place according to ``recipe`` and return what happened (no files written)."""
    model = loaded.model
    validate_for_model(recipe, model)
    if recipe.sequential:  # layer by layer on the already-merged model (sequential.py)
        from .sequential import merge_sequential

        return merge_sequential(loaded, recipe, progress)
    spec = family_of(model.config)
    top_k = spec.top_k(model.config)
    result = MergeResult(recipe, None, None, count_parameters(model), count_parameters(model))
    if recipe.merge == "no" or recipe.num_average_groups is None:
        return result
    t0 = time.perf_counter()
    adapt = router_adapt_for(recipe, spec)
    names = needed_statistics(recipe) + list(MERGE.get(recipe.merge).statistics(recipe))
    names += router_statistics(recipe.router, adapt)
    stats = calibrate(loaded, calibration_settings(recipe, model), names, progress=progress)
    t1 = time.perf_counter()
    layers = moe_layers(model)
    plan = plan_groups(recipe, stats, layers, top_k)
    check_plan(plan, recipe.router, top_k)
    prepare = MERGE.get(recipe.merge).prepare
    if prepare is not None:  # plan-aware second pass on the still-unmerged model (zipit, fix-dom-same)
        stats = prepare(loaded, recipe, plan, stats, calibration_settings(recipe, model), progress)
    t2 = time.perf_counter()
    merged = {}
    with torch.no_grad():
        for layer in tqdm(layers, desc="merging", unit="layer", disable=not progress):
            if not plan.layers[layer.index].is_identity:
                merged[layer.index] = merge_layer(layer, plan.layers[layer.index], recipe.merge, stats, recipe.mode,
                                                     recipe=recipe)
        frequencies = {layer.index: stats.frequency(layer.index) for layer in layers}

        def _apply() -> None:
            apply_plan(model, plan, merged, frequencies, recipe.router, adapt, stats=stats)

        if recipe.router_fit:  # sample the original block outputs, collapse, refit the rows (save/router_refit.py)
            from .save.router_refit import refit_routers

            result.router_fit = refit_routers(loaded, recipe, plan, calibration_settings(recipe, model), _apply,
                                              progress)
        else:
            _apply()
    t3 = time.perf_counter()
    result.plan, result.stats = plan, stats
    result.parameters_after = count_parameters(model)
    result.timings.update(calibrate=t1 - t0, group=t2 - t1, merge=t3 - t2)
    return result


def merge_info(result: MergeResult, loaded: LoadedModel) -> dict:
    """What ``merge_info.json`` records: the recipe, groups and dominants per layer, frequencies, provenance."""
    info = {"moemerge_recipe": result.recipe.model_dump(), "source_model": loaded.source,
            "source_fingerprint": loaded.fingerprint, "versions": versions()}
    if result.plan is not None:
        info["experts_per_layer"] = {str(k): v for k, v in result.plan.counts().items()}
        info["plan"] = result.plan.to_json()
    if result.stats is not None:
        info["frequencies"] = {str(li): result.stats.frequency(li).tolist() for li in result.stats.layers}
        info["calibration"] = {k: v for k, v in result.stats.meta.items() if k != "versions"}
    info["parameters"] = {"before": result.parameters_before, "after": result.parameters_after}
    return info


def _probe(tokenizer) -> torch.Tensor:
    ids = tokenizer("The merged model must give the same logits after it is saved and loaded again.",
                    add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids[:, :32]


def run(recipe: Recipe, progress: bool = True, loaded: LoadedModel | None = None) -> MergeResult:
    """``moemerge merge``: everything, with all input checks before the first expensive step."""
    if not recipe.model_path and loaded is None:
        raise MoemergeError("no model given (MODEL argument / model_path)")
    out = prepare_output(recipe.output_path, recipe.overwrite) if recipe.merge != "no" else None
    if recipe.calibration and recipe.num_average_groups is not None and recipe.merge != "no":
        load_text(recipe.calibration)  # a missing or empty local file fails here, before the model loads
    t0 = time.perf_counter()
    loaded = loaded or load_model(recipe.model_path, recipe.dtype, recipe.device, recipe.device_map)
    load_s = time.perf_counter() - t0
    model = loaded.model
    validate_for_model(recipe, model)
    settings = calibration_settings(recipe, model)
    sources = recipe.ppl if recipe.ppl is not None else default_ppl_sources()
    sources = [] if sources in (["none"], []) else sources
    texts = eval_texts(loaded.tokenizer, sources, recipe.eval_seq_len or settings.seq_len, recipe.ppl_windows)
    from .evaluate import fidelity as fid
    from .evaluate.lm_eval import evaluate_tasks, resolve_tasks

    tasks = resolve_tasks(recipe.task) if recipe.task else None  # local task files are checked before any work
    pad_id = getattr(loaded.tokenizer, "pad_token_id", None)
    config = original_config(loaded.source, loaded.local_dir, model)
    file_bytes_before = None
    if loaded.local_dir is not None:
        from .save import folder_bytes

        file_bytes_before = folder_bytes(loaded.local_dir)

    t0 = time.perf_counter()
    before = perplexities(model, texts, recipe.eval_batch_size, progress)
    # lm-eval and the fidelity reference need the original, which is merged in place next
    lm_before = evaluate_tasks(model, loaded.tokenizer, tasks, recipe.num_fewshot, recipe.eval_batch_size) \
        if tasks else None
    fid_ref = fid.reference(model, texts[0].windows, pad_token_id=pad_id, batch_size=recipe.eval_batch_size) \
        if recipe.fidelity and texts and recipe.merge != "no" else None
    eval_before_s = time.perf_counter() - t0
    result = merge_model(loaded, recipe, progress)
    result.lm_eval_before = lm_before
    result.timings["load"] = load_s
    result.timings["eval_before"] = eval_before_s
    result.ppl_before = before
    result.file_bytes_before = file_bytes_before
    if out is not None:
        t0 = time.perf_counter()
        result.saved = save_checkpoint(model, loaded.tokenizer, out, config, merge_info(result, loaded),
                                       _probe(loaded.tokenizer), recipe.overwrite)
        result.timings["save"] = time.perf_counter() - t0
        if result.plan is not None and not result.plan.uniform:  # non-uniform counts (Sub-MoE allocation, ...)
            from .evaluate.plots import experts_per_layer

            experts_per_layer({li: p.num_experts for li, p in result.plan.layers.items()}, result.plan.counts(),
                              Path(result.saved.path) / "experts_per_layer.png")
    if recipe.merge != "no":
        t0 = time.perf_counter()
        result.ppl_after = perplexities(model, texts, recipe.eval_batch_size, progress)
        if fid_ref is not None:
            result.fidelity = fid.compare(model, fid_ref, loaded.tokenizer, recipe.eval_batch_size, pad_id)
        if tasks:
            result.lm_eval_after = evaluate_tasks(model, loaded.tokenizer, tasks, recipe.num_fewshot,
                                                  recipe.eval_batch_size)
        result.timings["eval_after"] = time.perf_counter() - t0
    result_path = Path(recipe.result_path) if recipe.result_path else (out / "eval.json" if out else None)
    if result_path is not None:
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(result.summary(), indent=2))
    if recipe.report and result.saved is not None:
        from .evaluate.report_page import write_report

        result.report_path = write_report(result, result.saved.path)
    return result
