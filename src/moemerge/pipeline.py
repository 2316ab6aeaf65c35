"""The whole job: open the model, check every input, then one walk of the layer executor (:mod:`.execute`) that
calibrates, groups, merges, writes and evaluates.

:func:`run` is what ``moemerge merge`` does on a checkpoint folder or hub id: the model is streamed from its
safetensors shards one decoder layer at a time, so it never needs to fit in memory. :func:`merge_model` merges a
model already in memory in place (the Python API on small models), on the same executor. :func:`calibrate` collects
statistics only.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .calibrate import CalibrationSettings, Sampler, Stats, calibration_windows
from .calibrate.cache import StatsCache, cache_key, versions
from .calibrate.ranks import SINGLE, Ranks, from_environment
from .data import load_text
from .errors import MoemergeError
from .evaluate import default_ppl_sources, eval_texts, window_length
from .execute.executor import Job, execute
from .execute.sink import ShardSink, check_free, verify
from .execute.source import LayerSource, ModelSource, ShardSource, meta_skeleton
from .execute.weights import KeyConverter
from .families import FamilySpec
from .group import merged_layers, uniform_targets
from .group.dominant import check_group_limit
from .group.plan import MergePlan
from .group.routing_groups import check_routing_groups
from .loading import LoadedModel, cache_root, open_checkpoint, resolve_device, resolve_dtype
from .recipe import CALIBRATION_TOKENS, Recipe, default_window_count, parse_size
from .save import FORMATS, SaveReport, edited_config, folder_bytes, original_config, set_expert_count

LOG = logging.getLogger(__name__)

#: Greedy generations side by side need both whole models in memory (one at a time); skipped above this size.
GENERATION_MAX_BYTES = 2 * 2**30


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
    fidelity: dict | None = None  # KL(original ‖ merged), top-1 agreement, generations
    lm_eval_before: object | None = None  # evaluate.lm_eval.LmEvalResult of the original
    lm_eval_after: object | None = None  # ... and of the merged model
    report_path: Path | None = None
    router_fit: dict | None = None  # per layer: router_refit.refit_layer's summary (objective before/after)
    layer_info: dict[int, dict] | None = None  # per-layer summary of the merge's plan-aware pass (fit: objectives)

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
                                                                      "from_cache", "layers_from_cache")}
        if self.fidelity is not None:
            out["fidelity"] = self.fidelity
        if self.lm_eval_before is not None or self.lm_eval_after is not None:
            out["lm_eval"] = {k: None if v is None else v.to_json()
                              for k, v in (("before", self.lm_eval_before), ("after", self.lm_eval_after))}
        if self.report_path is not None:
            out["report"] = str(self.report_path)
        return out


# ---- checks before any expensive step ----------------------------------------------------------------------------
def calibration_settings(recipe: Recipe, config) -> CalibrationSettings:
    seq_len, capped = window_length(config, recipe.seq_len)
    if capped:  # a recipe's window is an input: refused, where `eval` would cap it with a note
        raise MoemergeError(f"seq_len={recipe.seq_len} exceeds the model's max_position_embeddings ({seq_len})")
    windows = recipe.n_sentences or default_window_count(seq_len)
    return CalibrationSettings(recipe.calibration, windows, seq_len, recipe.train_batch_size, recipe.seed,
                               recipe.cache, recipe.self_calibration)


def self_sampler(recipe: Recipe, tokenizer, fp: str, folder: Path | None, dtype: torch.dtype | None = None,
                 model: torch.nn.Module | None = None) -> Sampler | None:
    """What samples ``self_calibration``'s windows: ``model`` when it is in memory already (the Python API), else
    the checkpoint in ``folder`` loaded whole, once, only if its windows are not cached; ``None`` when the recipe
    samples nothing."""
    if not recipe.self_calibration:
        return None
    from .calibrate.self_text import cached_sampler

    device = torch.device(resolve_device(recipe.device))

    def load() -> torch.nn.Module:
        if model is not None:
            return model
        if folder is None:
            raise MoemergeError("self_calibration needs the model's checkpoint folder to sample from")
        check_fits_whole(folder, device, recipe.device_map)
        return _load_whole(folder, dtype, device, recipe.device_map)

    if model is not None:  # the samples are the in-memory model's, whatever dtype and device it is in
        first = next(model.parameters())
        dtype, device = first.dtype, first.device
    tag = f"{str(dtype).removeprefix('torch.') if dtype is not None else 'auto'}-{device.type}"
    return cached_sampler(fp, tokenizer, load, cache_root() / "self-text" if recipe.cache else None, tag)


def check_fits_whole(folder: Path, device: torch.device, device_map: str | None) -> None:
    """Sampling needs every layer for every token: the whole model in memory (or spread by ``device_map``)."""
    import psutil

    if device_map:
        return
    need = folder_bytes(folder)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    if need > 0.9 * free:
        raise MoemergeError(f"self_calibration samples text with the whole model in memory ({need / 2**30:.1f} GiB "
                            f"of weights, {free / 2**30:.1f} GiB free on {device}); give --device-map auto to "
                            f"spread it over the GPUs, or calibrate on text only (self_calibration=0)")


#: ``block_fit_steps`` estimated to take longer than this (seconds, whole model) is announced before it starts
BLOCK_FIT_WARN_S = 600


def block_fit_time(recipe: Recipe, layers, top_k: int, config) -> float:
    """Estimated seconds of the recipe's block fit over the MoE ``layers`` (views) on its device, on the refit sample
    its calibration windows give (at most :data:`~moemerge.save.router_refit.MAX_TOKENS` tokens)."""
    from .save.router_refit import MAX_TOKENS, block_fit_seconds

    settings = calibration_settings(recipe, config)
    tokens = min(MAX_TOKENS, settings.n_sentences * settings.seq_len)
    return block_fit_seconds(recipe.block_fit_steps, layers, top_k, resolve_device(recipe.device), tokens=tokens,
                             held_out=recipe.fit_held_out)


def self_calibration_time(recipe: Recipe, source: LayerSource) -> float:
    """Estimated seconds to sample the recipe's ``self_calibration`` windows (before they are cached)."""
    from .calibrate.self_text import sampling_seconds

    settings = calibration_settings(recipe, source.config)
    params, views = list(source.model.parameters()), source.moe_views()
    total = sum(p.numel() for p in params)
    experts = sum(t.numel() for v in views for t in v.expert_weights())
    num_experts = max((v.num_experts for v in views), default=1)
    active = total - experts + experts * source.family.top_k(source.config) // num_experts
    size = max((p.element_size() for p in params if p.is_floating_point()), default=2)
    return sampling_seconds(settings.self_windows, settings.seq_len, active, total * size,
                            resolve_device(recipe.device))


def human_duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


@functools.cache
def warn_few_tokens(windows: int, seq_len: int) -> None:
    """Once per process and size (``recommend`` validates every candidate)."""
    if windows * seq_len < CALIBRATION_TOKENS:
        LOG.warning("calibration: %d windows × %d tokens = %d tokens; the fitted merges learn from them and do "
                    "better with more (%d, HC-SMoE's 32 × 2048: --n-sentences %d)", windows, seq_len,
                    windows * seq_len, CALIBRATION_TOKENS, default_window_count(seq_len))


def validate_for_model(recipe: Recipe, source: LayerSource, warn_tokens: bool = True) -> None:
    """Checks that need the model's config but no weights: run them before any expensive step. ``warn_tokens``:
    say when a fitted merge calibrates on few tokens (``recommend``'s trials, which calibrate on 3/4 of the windows
    by design, leave it to ``recommend``)."""
    spec, config = source.family, source.config
    top_k = spec.top_k(config)
    views = source.moe_views()
    if not views:
        raise MoemergeError(f"{type(source.model).__name__} has no MoE layers")
    layers = merged_layers(views, recipe.start_layer)
    if recipe.merge == "no" or recipe.num_average_groups is None:
        return
    if not layers:
        raise MoemergeError(f"start_layer={recipe.start_layer} leaves no MoE layer to merge")
    uniform_targets(layers, recipe.num_average_groups, top_k)
    for v in layers:  # single-shot grouping: groups of at most group_limit must hold every expert
        check_group_limit(v.num_experts, recipe.num_average_groups, recipe.group_limit, v.index)
    shrinks = FORMATS.get(recipe.router).changes_count
    if shrinks and spec.expert_groups(config) > 1:
        if FORMATS.get(recipe.router).padded:
            raise MoemergeError(f"{spec.name} routes within n_group={spec.expert_groups(config)} groups of contiguous "
                                f"experts; router={recipe.router} pads layers by splitting router rows, which does "
                                f"not keep the groups equal (use --format compact or keep)")
        check_routing_groups(recipe, spec, config, layers[0].num_experts, top_k)
    if FORMATS.get(recipe.router).remote_code:
        from .save.mapped import check_family

        check_family(spec.name, recipe.router, layers[0].experts)  # the skeleton's module: no weight read
    if recipe.router == "collapse" and recipe.start_layer > min(v.index for v in views):
        raise MoemergeError("router=collapse needs every MoE layer merged to one count; start_layer leaves "
                            "earlier layers with all experts (use --router keep)")
    if recipe.router_fit and recipe.block_fit_steps:
        seconds = block_fit_time(recipe, layers, top_k, config)
        if seconds > BLOCK_FIT_WARN_S:
            LOG.warning("block_fit_steps=%d: about %s of Adam steps on %s for %d MoE layers (a GPU makes it minutes)",
                        recipe.block_fit_steps, human_duration(seconds), resolve_device(recipe.device), len(layers))
    if warn_tokens and (recipe.merge == "fit" or recipe.router_fit):
        settings = calibration_settings(recipe, config)
        warn_few_tokens(settings.n_sentences, settings.seq_len)
    if recipe.self_calibration:
        seconds = self_calibration_time(recipe, source)
        if seconds > BLOCK_FIT_WARN_S:
            LOG.warning("self_calibration=%g: sampling its windows from the whole model takes about %s on %s "
                        "(once: they are cached)", recipe.self_calibration, human_duration(seconds),
                        resolve_device(recipe.device))
    if recipe.sequential:
        if FORMATS.get(recipe.router).padded:
            raise MoemergeError(f"sequential=true writes one layer at a time; router={recipe.router} pads layers "
                                f"to the largest count of all layers (use keep or collapse)")
        for name in ("multi_layer", "dynamic_group", "hierarchical_stopping_metric"):
            if name in recipe.explicit():
                raise MoemergeError(f"sequential=true merges one layer at a time; {name} allocates experts across "
                                    f"layers and needs them all at once (drop one of the two)")
        if recipe.dominant == "frequency":
            raise MoemergeError("sequential=true merges one layer at a time; dominant=frequency picks dominants "
                                "across all layers (drop one of the two)")
        if recipe.router_fit and recipe.error_feedback:
            raise MoemergeError("sequential=true already calibrates every layer on the merged model's inputs; "
                                "error_feedback needs the original model's stream beside it (drop one of the two)")


# ---- the executor's inputs -----------------------------------------------------------------------------------------
def job_for(recipe: Recipe, tokenizer, config, fp: str, progress: bool, ranks: Ranks = SINGLE,
            sample: Sampler | None = None) -> Job:
    """The executor's inputs for ``recipe``: calibration windows (this rank's share of them), their provenance and
    cache. ``sample``: what draws ``self_calibration``'s windows (:func:`self_sampler`)."""
    settings = calibration_settings(recipe, config)
    job = Job(progress=progress and ranks.main, eval_batch_size=recipe.eval_batch_size, fidelity=recipe.fidelity,
              ranks=ranks)
    if recipe.merge != "no" and recipe.num_average_groups is not None:
        if settings.self_windows and ranks.distributed:  # rank 0 samples once; every rank calibrates on its windows
            wins, description = ranks.broadcast(calibration_windows(tokenizer, settings, sample) if ranks.main
                                                else None)
        else:
            wins, description = calibration_windows(tokenizer, settings, sample)
        key = cache_key(fp, wins)  # the whole job's windows, whatever the number of ranks
        job.windows = ranks.share(wins)
        job.window_offset = ranks.offset(len(wins))  # global window indices: held-out splits ignore the ranks
        job.num_windows = len(wins)
        job.meta = {"model": recipe.model_path, "model_fingerprint": fp, "calibration": description,
                    "windows": list(wins.shape), "cache_key": key, "sequential": recipe.sequential}
        job.cache = StatsCache(cache_root(), key) if settings.use_cache else None
    return job


def merge_model(loaded: LoadedModel, recipe: Recipe, progress: bool = True) -> MergeResult:
    """Merge ``loaded.model`` in place according to ``recipe`` and return what happened (no files written)."""
    source = ModelSource(loaded.model)
    validate_for_model(recipe, source)
    sample = self_sampler(recipe, loaded.tokenizer, loaded.fingerprint, loaded.local_dir, model=loaded.model)
    job = job_for(recipe, loaded.tokenizer, loaded.model.config, loaded.fingerprint, progress, sample=sample)
    outcome = execute(source, recipe, job)
    if outcome.plan is not None:
        set_expert_count(loaded.model.config, source.family, outcome.plan, recipe.router)
    return MergeResult(recipe, outcome.plan, outcome.stats if outcome.plan is not None else None,
                       outcome.parameters_before, outcome.parameters_after, outcome.timings,
                       router_fit=outcome.router_fit, layer_info=outcome.layer_info or None)


def calibrate(loaded: LoadedModel, settings: CalibrationSettings, names: list[str], progress: bool = True) -> Stats:
    """Statistics ``names`` of every MoE layer of ``loaded`` (from the cache when possible), without merging."""
    from .calibrate.stats import STATISTICS

    for n in names:
        STATISTICS.get(n)  # unknown names fail before any work
    sample = self_sampler(Recipe(self_calibration=settings.self_calibration, cache=settings.use_cache),
                          loaded.tokenizer, loaded.fingerprint, loaded.local_dir, model=loaded.model)
    wins, description = calibration_windows(loaded.tokenizer, settings, sample)
    key = cache_key(loaded.fingerprint, wins)
    job = Job(windows=wins, statistics=list(names), progress=progress,
              cache=StatsCache(cache_root(), key) if settings.use_cache else None,
              meta={"model": loaded.source, "model_fingerprint": loaded.fingerprint, "calibration": description,
                    "windows": list(wins.shape), "cache_key": key})
    recipe = Recipe(train_batch_size=settings.train_batch_size)
    return execute(ModelSource(loaded.model), recipe, job).stats


# ---- moemerge merge ------------------------------------------------------------------------------------------------
def merge_info(result: MergeResult, source_name: str, fp: str) -> dict:
    """What ``merge_info.json`` records: the fully resolved recipe (``moemerge merge --recipe merge_info.json``
    reruns it), groups and dominant per layer, frequencies, calibration provenance, versions."""
    info = {"moemerge_recipe": result.recipe.model_dump(mode="json"), "source_model": source_name,
            "source_fingerprint": fp, "versions": versions()}
    if result.plan is not None:
        info["experts_per_layer"] = {str(k): v for k, v in result.plan.counts().items()}
        info["plan"] = result.plan.to_json()
    if result.stats is not None:
        info["frequencies"] = {str(li): result.stats.frequency(li).tolist() for li in result.stats.layers
                               if "frequency" in result.stats.layers[li]}
        info["calibration"] = {k: v for k, v in result.stats.meta.items() if k != "versions"}
    if result.layer_info:  # merge: fit: per layer, train / held-out objectives (their gap), damping, choices
        info[result.recipe.merge] = {str(li): v for li, v in sorted(result.layer_info.items())}
    if result.router_fit:  # router_fit: per layer, sample objective before/after on all and held-out tokens, rounds
        info["router_fit"] = {str(li): v for li, v in sorted(result.router_fit.items())}
    info["parameters"] = {"before": result.parameters_before, "after": result.parameters_after}
    return info


def resolved(recipe: Recipe, config) -> Recipe:
    """The recipe with every default that depends on the run filled in (absolute paths, the calibration text and
    window length actually used), so that rerunning it reproduces the checkpoint."""
    from .data import default_calibration

    settings = calibration_settings(recipe, config)
    update: dict = {"seq_len": settings.seq_len, "n_sentences": settings.n_sentences}
    if recipe.calibration is None:
        update["calibration"] = default_calibration()
    elif Path(recipe.calibration).expanduser().exists():
        update["calibration"] = str(Path(recipe.calibration).expanduser().resolve())
    for key in ("model_path", "output_path"):
        value = getattr(recipe, key)
        if value and Path(value).expanduser().exists():
            update[key] = str(Path(value).expanduser().resolve())
        elif value and key == "output_path":
            update[key] = str(Path(value).expanduser().absolute())
    if recipe.ppl is None:
        update["ppl"] = default_ppl_sources()
    if recipe.eval_seq_len is None:
        update["eval_seq_len"] = update["seq_len"]
    return recipe.model_copy(update=update)


def _probe(tokenizer) -> torch.Tensor:
    ids = tokenizer("The merged model must give the same logits after it is saved and loaded again.",
                    add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids[:, :32]


def run(recipe: Recipe, progress: bool = True, loaded: LoadedModel | None = None) -> MergeResult:
    """``moemerge merge``: every input check, then one walk of the executor that streams the model layer by layer,
    writes the checkpoint as layers finish and evaluates before and after; then lm-eval tasks, report."""
    from .save import prepare_output

    if not recipe.model_path and loaded is None:
        raise MoemergeError("no model given (MODEL argument / model_path)")
    ranks = from_environment()  # torchrun / accelerate launch: this process's share of a data-parallel job
    merging = recipe.merge != "no" and recipe.num_average_groups is not None
    out, finishing = None, False
    if recipe.merge != "no" and ranks.main:  # rank 0 writes; the other ranks only compute
        try:
            out = prepare_output(recipe.output_path, recipe.overwrite)
        except MoemergeError:
            out = Path(str(recipe.output_path)).expanduser()
            finishing = unfinished(out)  # its checkpoint was written, its evaluation or report was not
            if not finishing:
                raise
        check_free(out)
    if recipe.calibration and merging:
        load_text(recipe.calibration)  # a missing or unreadable local file fails here, before the model opens
    t0 = time.perf_counter()
    if loaded is not None:
        source: LayerSource = ModelSource(loaded.model)
        tokenizer, name, local_dir, fp = loaded.tokenizer, loaded.source, loaded.local_dir, loaded.fingerprint
        config_dict = original_config(loaded.source, local_dir, loaded.model)
    else:
        ckpt = open_checkpoint(recipe.model_path)
        dtype = resolve_dtype(recipe.dtype)
        device = resolve_device(recipe.device)  # device_map only matters for whole-model loads (lm-eval)
        source = ShardSource(ckpt.folder, dtype=None if dtype == "auto" else dtype, device=device,
                             config=ckpt.config)
        tokenizer, name, local_dir, fp = ckpt.tokenizer, recipe.model_path, ckpt.folder, ckpt.fingerprint
        config_dict = ckpt.config_dict
    try:
        return _run(recipe, source, tokenizer, name, local_dir, fp, config_dict, out, merging, progress, loaded,
                    time.perf_counter() - t0, finishing, ranks)
    finally:
        source.close()


def unfinished(out: Path) -> bool:
    """A checkpoint folder that moemerge wrote whose run was stopped before its evaluation and report were done."""
    if not (out / "merge_info.json").is_file():
        return False
    try:
        return json.loads((out / "eval.json").read_text()).get("complete") is not True
    except (OSError, json.JSONDecodeError):
        return True


def _same_run(out: Path, recipe: Recipe, fp: str) -> bool:
    """Whether ``out`` was written by this very recipe (every option but ``overwrite``) from this very model."""
    try:
        info = json.loads((out / "merge_info.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    mine = recipe.model_dump(mode="json", exclude={"overwrite"})
    theirs = {k: v for k, v in info.get("moemerge_recipe", {}).items() if k != "overwrite"}
    return info.get("source_fingerprint") == fp and theirs == mine


def _written_result(out: Path, recipe: Recipe) -> MergeResult:
    """The result of a finished walk, read back from what it wrote (merge_info.json, the partial eval.json)."""
    info = json.loads((out / "merge_info.json").read_text())
    partial = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else {}
    plan = MergePlan.from_json(info["plan"]) if "plan" in info else None
    stats = Stats({int(li): {"frequency": {"counts": torch.tensor(f, dtype=torch.float64),
                                           "tokens": torch.tensor(1.0)}}
                   for li, f in info.get("frequencies", {}).items()}, info.get("calibration", {}))
    params = info.get("parameters", {})
    result = MergeResult(recipe, plan, stats, params.get("before", 0), params.get("after", 0),
                         dict(partial.get("timings_s", {})), partial.get("perplexity", {}).get("before", {}),
                         partial.get("perplexity", {}).get("after", {}))
    result.fidelity = partial.get("fidelity")
    result.file_bytes_before = partial.get("file_bytes", {}).get("before")
    result.saved = SaveReport(out, params.get("after", 0), folder_bytes(out), 0.0, [], [])
    return result


def _run(recipe: Recipe, source: LayerSource, tokenizer, name: str, local_dir: Path | None, fp: str,
         config_dict: dict, out: Path | None, merging: bool, progress: bool, loaded: LoadedModel | None,
         load_s: float, finishing: bool = False, ranks: Ranks = SINGLE) -> MergeResult:
    from .evaluate import fidelity as fid
    from .evaluate.lm_eval import evaluate_tasks, resolve_tasks

    validate_for_model(recipe, source)
    recipe = resolved(recipe, source.config)
    if finishing and not _same_run(out, recipe, fp):
        raise MoemergeError(f"output folder {str(out)!r} exists (written by another recipe or model); pass "
                            f"--overwrite to replace it")
    settings = calibration_settings(recipe, source.config)
    sources = [] if recipe.ppl in (["none"], []) else recipe.ppl
    texts = eval_texts(tokenizer, sources, recipe.eval_seq_len or settings.seq_len, recipe.ppl_windows)
    tasks = resolve_tasks(recipe.task) if recipe.task else None  # local task files are checked before any work
    pad_id = getattr(tokenizer, "pad_token_id", None)
    dtype = next((p.dtype for p in source.model.parameters() if p.is_floating_point()), torch.float32)
    finishing = ranks.broadcast(finishing)  # rank 0 looked at the output folder
    sample = self_sampler(recipe, tokenizer, fp, local_dir, dtype, loaded.model if loaded is not None else None)
    job = job_for(recipe, tokenizer, source.config, fp, progress, ranks, sample)
    job.eval_windows = {t.name: ranks.share(t.windows) for t in texts}
    small = local_dir is None or folder_bytes(local_dir) <= GENERATION_MAX_BYTES
    timings = {"load": load_s}

    def original_measures() -> tuple:
        """What needs the whole original model (lm-eval, generations), one model in memory at a time."""
        t0 = time.perf_counter()
        lm, ref = None, None
        if ranks.main and (tasks or (recipe.fidelity and texts and merging and small)):
            whole = loaded.model if loaded is not None else _load_whole(local_dir, dtype, source.device,
                                                                        recipe.device_map)
            lm = evaluate_tasks(whole, tokenizer, tasks, recipe.num_fewshot, recipe.eval_batch_size) \
                if tasks else None
            if recipe.fidelity and texts and merging and small:
                ref = fid.reference(whole, texts[0].windows[:3], count=1, pad_token_id=pad_id)
            del whole
        timings["eval_before"] = time.perf_counter() - t0
        return lm, ref

    # A model merged in place must be measured before the walk changes it; a streamed one is still on disk after,
    # and measuring it then keeps the other ranks of a distributed job from waiting on rank 0's lm-eval.
    lm_before, gen_ref = original_measures() if loaded is not None or finishing else (None, None)

    if finishing and not ranks.main:
        return MergeResult(recipe, None, None, 0, 0)
    if finishing:  # the checkpoint is there: only what came after it is redone
        LOG.warning("%s: checkpoint complete, finishing its evaluation and report", out)
        result = _written_result(out, recipe)
        result.timings.update(timings)
        return _after_checkpoint(result, recipe, tokenizer, tasks, gen_ref, lm_before, loaded, dtype, source, out)
    sink = None
    if out is not None:
        sink = ShardSink(out, KeyConverter(meta_skeleton(source.config, dtype)), parse_size(recipe.max_shard_size))
        job.sink, job.probe = sink, _probe(tokenizer)
    try:
        outcome = execute(source, recipe, job)
        result = MergeResult(recipe, outcome.plan, outcome.stats if merging else None, outcome.parameters_before,
                             outcome.parameters_after, {**timings, **outcome.timings}, outcome.ppl_before,
                             outcome.ppl_after if merging else {}, router_fit=outcome.router_fit,
                             layer_info=outcome.layer_info or None)
        result.fidelity = outcome.fidelity if merging else None
        result.file_bytes_before = folder_bytes(local_dir) if local_dir is not None else None
        if sink is not None:
            t0 = time.perf_counter()
            result.saved = _finish_checkpoint(sink, source, outcome, result, tokenizer, name, fp, config_dict, dtype)
            result.timings["save"] = result.timings.get("save", 0.0) + time.perf_counter() - t0
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    if loaded is not None and outcome.plan is not None:
        set_expert_count(loaded.model.config, source.family, outcome.plan, recipe.router)
    if not ranks.main:
        return result
    if loaded is None:
        lm_before, gen_ref = original_measures()
        result.timings.update(timings)
    return _after_checkpoint(result, recipe, tokenizer, tasks, gen_ref, lm_before, loaded, dtype, source, out)


def _after_checkpoint(result: MergeResult, recipe: Recipe, tokenizer, tasks, gen_ref, lm_before,
                      loaded: LoadedModel | None, dtype: torch.dtype, source: LayerSource, out: Path | None
                      ) -> MergeResult:
    """lm-eval and generations on the merged model (in memory, or read back from the checkpoint), plots, eval.json
    (marked complete last, so a run stopped before is finished by the same command) and the report."""
    from .evaluate import fidelity as fid
    from .evaluate.lm_eval import evaluate_tasks

    pad_id = getattr(tokenizer, "pad_token_id", None)
    t0 = time.perf_counter()
    if result.saved is not None and (tasks or gen_ref is not None):
        whole = loaded.model if loaded is not None else _load_whole(result.saved.path, dtype, source.device,
                                                                    recipe.device_map)
        if gen_ref is not None and result.fidelity is not None:
            result.fidelity["generations"] = fid.compare(whole, gen_ref, tokenizer, pad_token_id=pad_id)["generations"]
        if tasks:
            result.lm_eval_after = evaluate_tasks(whole, tokenizer, tasks, recipe.num_fewshot,
                                                  recipe.eval_batch_size)
        del whole
    result.lm_eval_before = lm_before
    result.timings["eval_after"] = time.perf_counter() - t0
    if result.saved is not None and result.plan is not None and not result.plan.uniform:
        from .evaluate.plots import experts_per_layer

        experts_per_layer({li: p.num_experts for li, p in result.plan.layers.items()}, result.plan.counts(),
                          Path(result.saved.path) / "experts_per_layer.png")
    if recipe.report and result.saved is not None:
        from .evaluate.report_page import write_report

        result.report_path = write_report(result, result.saved.path)
    paths = {Path(recipe.result_path)} if recipe.result_path else set()
    if out is not None:
        paths.add(out / "eval.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result.summary(), "complete": True}, indent=2))
    return result


def _finish_checkpoint(sink: ShardSink, source: LayerSource, outcome, result: MergeResult, tokenizer, name: str,
                       fp: str, config_dict: dict, dtype: torch.dtype) -> SaveReport:
    """The merged walk's folder: merge_info.json and the walk's evaluation (``eval.json``, completed after the
    checkpoint is in place) beside the weights."""
    count = _written_count(source.family, result.plan, result.recipe.router, source)
    files = {"merge_info.json": json.dumps(merge_info(result, name, fp), indent=2, default=str),
             "eval.json": json.dumps({**result.summary(), "complete": False}, indent=2)}
    saved = _write_folder(sink, source, outcome, tokenizer, config_dict, count, dtype, files,
                          result.recipe.overwrite)
    saved.parameters = result.parameters_after
    return saved


def _write_folder(sink: ShardSink, source: LayerSource, outcome, tokenizer, config_dict: dict, count: int,
                  dtype: torch.dtype, files: dict[str, str], overwrite: bool) -> SaveReport:
    """After the walk wrote the layers: the trunk, shards and index, config (+ the mapped formats' keys and shipped
    file), tokenizer and ``files`` into the temporary folder; read it all back; rename it into place."""
    from .save.mapped import check_expert_ids, remote_config

    spec: FamilySpec = source.family
    sink.add_trunk(source.model)
    sink.close_shards()
    check_expert_ids(list(sink.weight_map))
    new_config = edited_config(config_dict, spec, count, dtype)
    if outcome.mapped:
        new_config, code = remote_config(spec, new_config, outcome.mapped)
        files = {**code, **files}
    sink.write_text("config.json", json.dumps(new_config, indent=2))
    tokenizer.save_pretrained(sink.tmp)
    for fname, text in files.items():
        sink.write_text(fname, text)
    diff = verify(sink.tmp, outcome.probe, dtype, source.device, config=_output_config(new_config))
    path = sink.commit(overwrite)
    return SaveReport(path, outcome.parameters_before, sink.total_bytes, diff, [], [])


def _written_count(spec: FamilySpec, plan: MergePlan | None, router: str, source: LayerSource) -> int:
    if plan is None or not FORMATS.get(router).changes_count:
        return spec.num_experts(source.config)
    counts = plan.counts().values()
    return max(counts) if FORMATS.get(router).padded else next(iter(counts))


def save_checkpoint(model, tokenizer, out: str | Path, config: dict | None = None, info: dict | None = None,
                    overwrite: bool = False) -> SaveReport:
    """Write a model held in memory (e.g. merged by :func:`merge_model`) as a checkpoint folder, through the same
    sink and reload check as ``moemerge merge``: per-expert hub names, the original ``config`` with only the expert
    count (and the mapped formats' keys) changed, verified by reading it back layer by layer, then renamed."""
    from .save import prepare_output

    out = prepare_output(str(out), overwrite)
    source = ModelSource(model)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    sink = ShardSink(out, KeyConverter(meta_skeleton(model.config, dtype)))
    try:
        outcome = execute(source, Recipe(merge="no"), Job(sink=sink, probe=_probe(tokenizer), progress=False))
        spec = source.family
        saved = _write_folder(sink, source, outcome, tokenizer, config or model.config.to_dict(),
                              spec.num_experts(model.config), dtype,
                              {"merge_info.json": json.dumps(info or {}, indent=2, default=str)}, overwrite)
    except BaseException:
        sink.abort()
        raise
    return saved


def _output_config(config: dict):
    """The written config as a transformers config object, through moemerge's registered classes."""
    from transformers import AutoConfig

    from .save.remote.registered import register

    register(config.get("model_type"))
    return AutoConfig.for_model(**{k: v for k, v in config.items() if k != "auto_map"})


def _load_whole(folder: Path, dtype: torch.dtype, device: torch.device, device_map: str | None = None):
    """A whole checkpoint in memory (lm-eval and generations need one), through moemerge's registered classes;
    spread over the GPUs with ``device_map`` (e.g. ``auto``) when one does not hold it."""
    from transformers import AutoModelForCausalLM

    from .save.remote.registered import register_folder

    register_folder(folder)
    try:
        if device_map:
            return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, device_map=device_map).eval()
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    except (OSError, ValueError) as exc:
        raise MoemergeError(f"cannot load {folder}: {str(exc).splitlines()[0]}") from None
