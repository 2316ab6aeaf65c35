"""The executor: one walk over the decoder layers that calibrates, groups, merges, writes and evaluates.

For every decoder layer ``i`` in order, with only that layer built (:mod:`.source`):

1. **statistics**: the calibration hidden states go through the layer with the observer hooks on its MoE block
   (the routing the model really used); each layer's statistics are cached as soon as they are in, so an
   interrupted run resumes from the layers it finished;
2. **plan**: per-layer recipes group the layer right away; recipes that compare layers (global threshold, Sub-MoE's
   multi-layer allocation, ``dominant: frequency``, ``dynamic_group``) first take a statistics-only walk, plan the
   whole model, then walk again;
3. **plan-aware pass**: methods that need group statistics (``fit``, ``zipit``, ``fix-dom-same``) and the router
   refit push the layer's calibration inputs through it once more with their own accumulators;
4. **merge and format**: the merge method's kernel per group, then the format writes the merged experts and the
   router into the layer;
5. **carry on**: the calibration hidden states move on through the original layer (or, with ``sequential``,
   through the merged one), the evaluation windows through both (so perplexity before/after and KL(original ‖ merged)
   need no second model), a short probe through the merged one (for the reload check), and the layer goes to the
   sink and is freed.

Calibration therefore costs one forward pass in total, ``sequential`` included; the plan-aware passes add one pass
of the merged layers only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate import Stats
from ..calibrate.cache import StatsCache
from ..calibrate.observer import Observer
from ..calibrate.ranks import SINGLE, Ranks
from ..errors import MoemergeError
from ..families import MoeLayer
from ..group import merged_layers, needed_statistics, needs_all_layers, plan_groups
from ..group.plan import LayerPlan, MergePlan
from ..merge import MERGE, LayerPass, merge_layer
from ..recipe import Recipe
from ..save import FORMATS, check_plan, router_adapt_for, router_statistics
from ..save.router_refit import RoutedOutputSample, refit_layer
from .source import LayerSource, ModelSource
from .trunk import LayerCall, Trunk, run_layer

LOG = logging.getLogger(__name__)

#: Logits of at most this many values are computed at once by the LM head during evaluation (fp32: 256 MiB).
HEAD_CHUNK_VALUES = 1 << 26


class Stream:
    """Token windows on their way through the decoder layers: one hidden-state tensor per batch, and the arguments
    the model gives each decoder layer (shared by batches of the same shape)."""

    def __init__(self, trunk: Trunk, windows: torch.Tensor, batch_size: int, device: torch.device,
                 first: int = 0) -> None:
        self.ids = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
        self.first = first  # index of the first window among the whole job's (a distributed rank's share)
        self.hidden: list[torch.Tensor] = []
        self._calls: dict[tuple, list[LayerCall]] = {}
        for ids in self.ids:
            h, calls = trunk.layer_inputs(ids.to(device))
            self.hidden.append(h)
            self._calls.setdefault(tuple(ids.shape), calls)

    def calls(self, batch: int) -> list[LayerCall]:
        return self._calls[tuple(self.ids[batch].shape)]

    def window_ids(self, batch: int) -> torch.Tensor:
        """Indices, among the whole job's windows, of the windows of ``batch`` (the same on any number of ranks)."""
        start = self.first + sum(len(i) for i in self.ids[:batch])
        return torch.arange(start, start + len(self.ids[batch]))

    def through(self, layer: nn.Module, index: int, until: Callable[[], bool] | None = None,
                before: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """The layer's outputs for every batch (stops early, returning fewer, once ``until()`` is true);
        ``before(b)`` is called before batch ``b`` goes through."""
        out = []
        for b, h in enumerate(self.hidden):
            if until is not None and until():
                break
            if before is not None:
                before(b)
            out.append(run_layer(layer, h, self.calls(b)[index]))
        return out

    def twin(self) -> Stream:
        """Same windows and hidden states, moving on independently from here."""
        other = object.__new__(Stream)
        other.ids, other._calls, other.hidden, other.first = self.ids, self._calls, list(self.hidden), self.first
        return other

    @property
    def tokens(self) -> int:
        return sum(int(i.numel()) for i in self.ids)


@dataclass
class Outcome:
    """What one walk produced (the pipeline turns it into a :class:`~moemerge.pipeline.MergeResult`)."""

    plan: MergePlan | None
    stats: Stats
    parameters_before: int = 0
    parameters_after: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    nll_before: dict[str, tuple[float, int]] = field(default_factory=dict)  # text -> (summed NLL, tokens)
    nll_after: dict[str, tuple[float, int]] = field(default_factory=dict)
    fidelity: dict | None = None
    router_fit: dict[int, dict] | None = None  # layer -> refit_layer's summary (sample objective before/after)
    mapped: dict[int, dict] = field(default_factory=dict)  # layer -> {"expert_map": [...], "ranks": {...}|None}
    probe: dict | None = None  # reload check: ids, per-layer (input, output) of the merged layers, final logits
    layer_info: dict[int, dict] = field(default_factory=dict)  # layer -> what its plan-aware pass reported

    @property
    def ppl_before(self) -> dict[str, float]:
        return {k: math.exp(s / max(n, 1)) for k, (s, n) in self.nll_before.items()}

    @property
    def ppl_after(self) -> dict[str, float]:
        return {k: math.exp(s / max(n, 1)) for k, (s, n) in self.nll_after.items()}


class _Clock:
    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class Job:
    """Everything one walk is asked to do besides the recipe."""

    windows: torch.Tensor | None = None  # calibration token windows [N, S]
    meta: dict = field(default_factory=dict)  # calibration provenance for Stats.meta
    cache: StatsCache | None = None
    statistics: list[str] | None = None  # calibrate only these (no merge); None: what the recipe needs
    eval_windows: dict[str, torch.Tensor] = field(default_factory=dict)  # text name -> [N, S]
    eval_batch_size: int = 8
    fidelity: bool = True  # KL(original ‖ merged) and top-1 agreement on the first evaluation text
    sink: object | None = None  # a ShardSink, or None (nothing written)
    probe: torch.Tensor | None = None  # [1, P] ids replayed by the reload check
    progress: bool = True
    plan: MergePlan | None = None  # use this plan instead of grouping
    stats: Stats | None = None  # statistics already at hand (not recomputed)
    passes_only: bool = False  # run the merge method's plan-aware passes into the statistics, merge nothing
    ranks: Ranks = SINGLE  # a distributed job: ``windows`` and ``eval_windows`` are this rank's share
    window_offset: int = 0  # index of ``windows[0]`` among the whole job's calibration windows
    num_windows: int | None = None  # the whole job's calibration windows (every rank's); None: len(windows)


def execute(source: LayerSource, recipe: Recipe, job: Job) -> Outcome:
    """Walk ``source``'s decoder layers and do what ``recipe`` and ``job`` ask (see the module docstring)."""
    return _Walk(source, recipe, job).run()


class _Walk:
    def __init__(self, source: LayerSource, recipe: Recipe, job: Job) -> None:
        self.source, self.recipe, self.job = source, recipe, job
        self.spec = source.family
        self.config = source.config
        self.top_k = self.spec.top_k(self.config)
        # A format that changes the expert count must keep group-limited routing's groups equal (group.routing_groups)
        self.routing_groups = self.spec.expert_groups(self.config) \
            if FORMATS.get(recipe.router).changes_count else 1
        self.views = {v.index: v for v in source.moe_views()}
        self.merging = job.statistics is None and (job.plan is not None or (
            recipe.merge != "no" and recipe.num_average_groups is not None))
        self.targets = [v.index for v in merged_layers(list(self.views.values()), recipe.start_layer)] \
            if self.merging else ([] if job.statistics is None else sorted(self.views))
        self.method = MERGE.get(recipe.merge)
        self.adapt = router_adapt_for(recipe, self.spec)
        if job.statistics is not None:
            names = list(job.statistics)
        elif job.plan is not None:
            self.targets = [li for li, p in sorted(job.plan.layers.items()) if not p.is_identity]
            names = ["frequency", *self.method.statistics(recipe), *router_statistics(recipe.router, self.adapt)]
        elif self.merging:
            names = needed_statistics(recipe) + list(self.method.statistics(recipe))
            names += router_statistics(recipe.router, self.adapt)
        else:
            names = []
        self.names = list(dict.fromkeys(names))
        self.stats = Stats({li: dict(per) for li, per in job.stats.layers.items()} if job.stats else {},
                           dict(job.meta, model_runs=0, from_cache=[]))
        self.cache = job.cache if not recipe.sequential else None  # sequential statistics depend on earlier merges
        self.missing: dict[int, list[str]] = self._load_cached()
        self.clock = _Clock()
        self.trunk = Trunk(source.model)
        self.device = source.device
        self.out = Outcome(None, self.stats)
        self.out.parameters_before = sum(p.numel() for p in source.model.parameters())
        self.plan: MergePlan | None = job.plan
        self.frequencies: dict[int, torch.Tensor] = {}
        self.layer_plans: dict[int, LayerPlan] = {}  # per-layer recipes: plans as the walk makes them
        self.router_fit: dict[int, dict] = {}
        self._walked_parameters = 0

    # ---- helpers -----------------------------------------------------------------------------------------------
    def _load_cached(self) -> dict[int, list[str]]:
        """Take every target layer's cached statistics; returns, per layer, the statistic names still missing."""
        missing, cached_layers = {}, []
        for li in self.targets:
            have = self.cache.available(li) if self.cache is not None else set()
            got = self.cache.load(li, [n for n in self.names if n in have]) if have else {}
            got.update(self.stats.layers.get(li, {}))
            self.stats.layers[li] = got
            missing[li] = [n for n in self.names if n not in got]
            if got and not missing[li]:
                cached_layers.append(li)
        if self.job.ranks.distributed:  # rank 0's cache is the truth: every rank must compute the same statistics
            self.stats.layers, missing, cached_layers = self.job.ranks.broadcast(
                (self.stats.layers, missing, cached_layers))
        self.stats.meta["from_cache"] = sorted({n for li in self.targets for n in self.names if n not in missing[li]})
        self.stats.meta["layers_from_cache"] = cached_layers
        self.stats.meta["statistics"] = self.names
        return missing

    def _observe(self, layer: nn.Module, view: MoeLayer, stream: Stream, index: int, names: list[str] = (),
                 accumulators: list | None = None, until: Callable[[], bool] | None = None, reduce: bool = True
                 ) -> tuple[list[torch.Tensor], dict]:
        """Push ``stream`` through ``layer`` with the observer hooks on its MoE block feeding the statistics
        ``names`` (or the given ``accumulators``, combined over the ranks unless ``reduce`` is false); returns the
        layer's outputs and the statistics' results."""
        observer = Observer([view], list(names))
        if accumulators is not None:
            observer.accumulators = {index: accumulators}
        before = None
        if accumulators is not None:
            starts = [acc.start_batch for acc in accumulators if hasattr(acc, "start_batch")]
            if starts:
                def before(b: int) -> None:  # tell window-aware accumulators (held-out splits) the batch's windows
                    ids = stream.window_ids(b)
                    for start in starts:
                        start(ids)
        with observer.attached(), torch.no_grad():
            outputs = stream.through(layer, index, until, before)
        if reduce:
            self._reduce(observer.accumulators.get(index, []))  # the ranks' shares, once the layer is through
        return outputs, (observer.results().get(index, {}) if accumulators is None else {})

    def _reduce(self, accumulators: list) -> None:
        """A distributed job: combine each accumulator's shares over the ranks (nothing on one process)."""
        for acc in accumulators:
            acc.reduce(self.job.ranks)

    def _last_needed(self) -> int:
        """Last decoder layer the walk must build."""
        if self.job.sink is not None or self.job.eval_windows:
            return self.source.num_layers - 1
        return max(self.targets, default=-1)

    # ---- the walk ------------------------------------------------------------------------------------------------
    def run(self) -> Outcome:
        recipe = self.recipe
        if self.merging and self.plan is None and needs_all_layers(recipe):
            if any(self.missing.values()):
                self._walk(plan_only=True)
            with self.clock("group"):
                if self.job.ranks.main:
                    self.plan = plan_groups(recipe, self.stats, list(self.views.values()), self.top_k,
                                            self.routing_groups)
                self.plan = self.job.ranks.broadcast(self.plan)  # one plan for every rank
                check_plan(self.plan, recipe.router, self.top_k)
        self._walk(plan_only=False)
        self.out.timings = dict(self.clock.totals)
        return self.out

    def _walk(self, plan_only: bool) -> None:
        """One walk over the layers. ``plan_only``: statistics of the layers that miss some, nothing else."""
        job, recipe, source = self.job, self.recipe, self.source
        missing_layers = [li for li in self.targets if self.missing.get(li)]
        per_layer_plan = self.merging and self.plan is None
        needs_calib = set(missing_layers)
        if not plan_only and self.merging:
            uses_pass = self.method.layer_pass is not None or recipe.router_fit or recipe.sequential
            if uses_pass:
                needs_calib |= set(self.targets)
        last = max(missing_layers, default=-1) if plan_only else self._last_needed()
        last_calib = max(needs_calib, default=-1)
        with self.clock("calibrate"):
            calib = Stream(self.trunk, job.windows, recipe.train_batch_size, self.device, job.window_offset) \
                if last_calib >= 0 and job.windows is not None else None
        if calib is None and last_calib >= 0:
            raise MoemergeError("calibration windows are needed but none were given")
        evals: dict[str, Stream] = {}
        merged_evals: dict[str, Stream] | None = None
        student: Stream | None = None  # error_feedback: the calibration windows through the merged layers
        probe = None
        if not plan_only:
            with self.clock("eval"):
                evals = {k: Stream(self.trunk, w, job.eval_batch_size, self.device)
                         for k, w in job.eval_windows.items()}
                if job.sink is not None and job.probe is not None:
                    probe = Stream(self.trunk, job.probe, 1, self.device)
                    self.out.probe = {"ids": job.probe, "input": probe.hidden[0].cpu(), "layers": {}}
        if calib is not None:
            self.stats.meta["model_runs"] += 1
        bar = tqdm(range(last + 1), desc="statistics" if plan_only else "layers", unit="layer",
                   disable=not job.progress)
        for i in bar:
            source.prefetch(i + 1)
            with self.clock("load"):
                layer = source.layer(i)
            view = self.spec.moe_layer(i, layer)
            merged_here = False
            with torch.no_grad():
                calib_out = None
                if i in self.targets and self.missing.get(i):
                    with self.clock("calibrate"):
                        calib_out, fresh = self._observe(layer, view, calib, i, self.missing[i])
                    self.stats.layers.setdefault(i, {}).update(fresh)
                    if self.cache is not None and job.ranks.main:
                        self.cache.save(i, fresh, self.stats.meta)
                    self.missing[i] = []
                if not plan_only and self.merging and i in self.targets:
                    if merged_evals is None:  # the merged model's streams part from the original's here
                        merged_evals = {k: s.twin() for k, s in evals.items()}
                        if recipe.error_feedback and calib is not None:
                            student = calib.twin()
                    merged_here, calib_out = self._merge(i, layer, view, calib, calib_out, per_layer_plan, evals,
                                                         student)
                if student is not None and i < last_calib:
                    with self.clock("calibrate"):  # through the layer as written (merged or not)
                        student.hidden = student.through(layer, i)
                if plan_only or not merged_here:
                    if calib is not None and i < last_calib:
                        if calib_out is None:
                            with self.clock("calibrate"):
                                calib_out = calib.through(layer, i)
                        calib.hidden = calib_out
                    with self.clock("eval"):
                        for k, s in evals.items():
                            s.hidden = s.through(layer, i)
                            if merged_evals is not None:
                                merged_evals[k].hidden = merged_evals[k].through(layer, i)
                        if probe is not None:
                            self._probe_step(probe, layer, i)
                else:
                    with self.clock("eval"):
                        for k in evals:
                            merged_evals[k].hidden = merged_evals[k].through(layer, i)
                        if probe is not None:
                            self._probe_step(probe, layer, i)
                    if calib is not None and i < last_calib:
                        if recipe.sequential:
                            with self.clock("calibrate"):
                                calib.hidden = calib.through(layer, i)
                        else:
                            calib.hidden = calib_out
                if calib is not None and i >= last_calib:
                    calib = student = None  # no later layer needs calibration inputs
            if not plan_only:
                if job.sink is not None:
                    with self.clock("save"):
                        job.sink.add_layer(i, layer)
                self._walked_parameters += sum(p.numel() for p in layer.parameters())
                if view is not None and hasattr(view.experts, "expert_map_list"):
                    self.out.mapped[i] = {"expert_map": list(view.experts.expert_map_list),
                                          "ranks": {n: int(getattr(view.experts, f"{n}_a").shape[2])
                                                    for n in ("gate", "up", "down")}
                                          if hasattr(view.experts, "gate_a") else None}
            if self.merging and not plan_only and not recipe.sequential and not job.passes_only \
                    and i in self.stats.layers:
                self._drop_heavy(i)
            source.release(i)
        bar.close()
        if plan_only:
            return
        if self.merging:
            plans = {li: (self.plan.layers[li] if self.plan is not None and li in self.plan.layers
                          else self.layer_plans[li] if li in self.layer_plans
                          else LayerPlan.identity(li, v.num_experts))
                     for li, v in self.views.items()}
            self.plan = MergePlan(plans)
            self.out.plan = self.plan
            self.out.router_fit = self.router_fit or None
        self.out.parameters_after = self._parameters_after()
        self._finish(evals, merged_evals, probe)
        if job.ranks.distributed:
            self.stats.meta["ranks"] = job.ranks.world
            self.stats.meta["all_reduce_bytes_per_layer"] = job.ranks.traffic["bytes"] // max(1, last + 1)

    def _parameters_after(self) -> int:
        if self.source.resident:
            return sum(p.numel() for p in self.source.model.parameters())
        prefix = self.source.layers
        trunk = {id(p): p.numel() for m in self.source.model.children() for p in _outside(m, prefix)}
        return sum(trunk.values()) + self._walked_parameters

    def _drop_heavy(self, index: int) -> None:
        """Keep only the frequencies of a finished layer (its other statistics can be large, and are cached)."""
        keep = {k: v for k, v in self.stats.layers[index].items() if k == "frequency"}
        self.stats.layers[index] = keep

    def _probe_step(self, probe: Stream, layer: nn.Module, index: int) -> None:
        x = probe.hidden[0]
        y = probe.through(layer, index)[0]
        probe.hidden = [y]
        self.out.probe["layers"][index] = (x.cpu(), y.cpu())

    def _merge(self, i: int, layer: nn.Module, view: MoeLayer, calib: Stream | None,
               calib_out: list[torch.Tensor] | None, per_layer_plan: bool, evals: dict[str, Stream],
               student: Stream | None = None) -> tuple[bool, list[torch.Tensor] | None]:
        """Group (per-layer recipes), run the plan-aware passes, merge and format layer ``i`` in place. Returns
        whether the layer changed and the original layer's calibration outputs (``calib_out`` when the statistics
        pass already computed them), and moves the original evaluation streams through the layer before it is
        merged."""
        recipe = self.recipe
        with self.clock("group"):
            if per_layer_plan:
                layer_plan = plan_groups(recipe, self.stats, [view], self.top_k, self.routing_groups).layers[i] \
                    if self.job.ranks.main else None
                layer_plan = self.job.ranks.broadcast(layer_plan)
                check_plan(MergePlan({i: layer_plan}), recipe.router, self.top_k)
            else:
                layer_plan = self.plan.layers[i]
        self.layer_plans[i] = layer_plan
        self.frequencies[i] = self.stats.frequency(i)
        if layer_plan.is_identity:
            return False, calib_out

        def run(accumulators: list, until: Callable[[], bool] | None = None) -> None:
            if calib is None:
                raise MoemergeError(f"merge={recipe.merge} needs calibration windows")
            with self.clock("merge_pass"):
                self._observe(layer, view, calib, i, accumulators=accumulators, until=until)

        if self.method.layer_pass is not None:
            entries = self.method.layer_pass(LayerPass(view, layer_plan, self.stats, recipe, run, self._reduce))
            info = entries.pop("info", None)  # a small JSON-able summary (fit: train / held-out objectives)
            if info is not None:
                self.out.layer_info[i] = info
            self.stats.layers[i].update(entries)
        if self.job.passes_only:
            return False, calib_out
        # What the original layer gives: carried on by the calibration stream (not sequential) and the originals'
        # evaluation streams, computed before the layer is overwritten.
        if calib is not None and not recipe.sequential and calib_out is None:
            with self.clock("calibrate"):
                calib_out = calib.through(layer, i)
        sample = None
        if recipe.router_fit:
            sample = RoutedOutputSample(view, held_out=recipe.fit_held_out, total_tokens=self._calibration_tokens())
            if student is None:
                run([sample], until=sample.full)
            else:
                with self.clock("merge_pass"):
                    self._error_feedback_sample(layer, view, student, calib_out, i, sample)
        with self.clock("eval"):
            for s in evals.values():
                s.hidden = s.through(layer, i)
        with self.clock("merge"):
            merged = merge_layer(view, layer_plan, recipe.merge, self.stats, recipe.mode, recipe=recipe)
            inputs = None
            if "router_inputs" in self.stats.layers.get(i, {}):
                inputs = self.stats.get(i, "router_inputs")["x"]
            fmt = FORMATS.get(recipe.router)
            extra = {"num_slots": self._num_slots()} if fmt.padded else {}
            fmt.apply(view, layer_plan, merged, self.frequencies[i], self.adapt, inputs=inputs, **extra)
            if sample is not None and sample.count:
                self.router_fit[i] = refit_layer(view, sample.result(), self.config,
                                                 rounds=recipe.router_fit_rounds,
                                                 block_steps=recipe.block_fit_steps)
                if self.job.ranks.distributed:
                    self._same_refit_on_every_rank(view, i)
        return True, calib_out

    def _error_feedback_sample(self, layer: nn.Module, view: MoeLayer, student: Stream,
                               teacher_out: list[torch.Tensor], i: int, sample: RoutedOutputSample) -> None:
        """``error_feedback``: the refit sample's inputs are the merged model's (``student``), and its targets what
        the routed experts must add there for the layer to give the original model's hidden state:
        ``y*(x_s) = y(x_s) + (h_teacher − h_student)``, where ``y`` is the original block's routed output and the
        ``h`` are the original layer's outputs on the original and on the merged model's inputs (eq. 3 of
        :mod:`moemerge.save.router_refit`; asymmetric calibration, after GPTAQ)."""
        student_out, _ = self._observe(layer, view, student, i, accumulators=[sample], until=sample.full,
                                       reduce=False)
        width = teacher_out[0].shape[-1]
        gap = torch.cat([(t - s).reshape(-1, width).float().cpu() for t, s in zip(teacher_out, student_out)])
        sample.add_to_target(gap[sample.kept_positions()])
        self._reduce([sample])  # the ranks' shares, each with its own correction

    def _same_refit_on_every_rank(self, view, i: int) -> None:
        """Every rank refitted the same sample, but GPU kernels with atomic adds (index_add's backward) need not
        give the same bits everywhere: rank 0's router and experts are the ones every rank carries on with."""
        gate_up, down = view.expert_weights()
        mine = (view.router_weight.data, gate_up, down)
        theirs, self.router_fit[i] = self.job.ranks.broadcast(([t.cpu() for t in mine], self.router_fit[i]))
        for dst, src in zip(mine, theirs):
            dst.copy_(src)

    def _calibration_tokens(self) -> int | None:
        """Tokens in the whole job's calibration windows (every rank's)."""
        windows = self.job.windows
        if windows is None:
            return None
        count = self.job.num_windows if self.job.num_windows is not None else len(windows)
        return count * int(windows.shape[1])

    def _num_slots(self) -> int:
        if self.plan is not None:
            return max(self.plan.counts().values())
        return int(self.recipe.num_average_groups)

    # ---- evaluation ----------------------------------------------------------------------------------------------
    def _finish(self, evals: dict[str, Stream], merged_evals: dict[str, Stream] | None, probe: Stream | None
                ) -> None:
        with self.clock("eval"), torch.no_grad():
            first = next(iter(evals), None)
            for name, stream in evals.items():
                other = merged_evals[name] if merged_evals is not None else None
                fid = self.job.fidelity and name == first and other is not None
                sums = torch.tensor(_score(self.trunk, stream, other, fid), dtype=torch.float64)
                self.job.ranks.sum_(sums)  # each rank scored its share of the windows
                nll0, nll1, kl_sum, agree, count = sums.tolist()
                self.out.nll_before[name] = (nll0, int(count))
                self.out.nll_after[name] = (nll1, int(count)) if other is not None else (nll0, int(count))
                if fid:
                    self.out.fidelity = {"kl": kl_sum / max(count, 1), "top1": agree / max(count, 1),
                                         "tokens": int(count), "text": name}
            if probe is not None:
                self.out.probe["logits"] = self.trunk.logits(probe.ids[0].to(self.device), probe.hidden[0]).cpu()


def _outside(module: nn.Module, skip: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters of ``module`` that are not inside ``skip``."""
    if module is skip:
        return
    own = list(module._parameters.values())
    yield from (p for p in own if p is not None)
    for child in module.children():
        yield from _outside(child, skip)


def _head_logprobs(trunk: Trunk, ids: torch.Tensor, hidden: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Per chunk of windows and positions: (next-token log-probs [b, p, V] fp32, targets [b, p]); each chunk holds
    at most about ``HEAD_CHUNK_VALUES`` logits."""
    vocab = int(trunk.model.get_output_embeddings().weight.shape[0])
    length = ids.shape[1] - 1  # the last position predicts nothing we can score
    rows = max(1, HEAD_CHUNK_VALUES // max(1, length * vocab))
    span = max(1, HEAD_CHUNK_VALUES // vocab) if rows == 1 else length
    device = hidden.device
    for lo in range(0, ids.shape[0], rows):
        sub, h = ids[lo:lo + rows].to(device), hidden[lo:lo + rows]
        for p in range(0, length, span):
            logits = trunk.logits(sub, h, slice(p, min(p + span, length))).float()
            yield torch.log_softmax(logits, -1), sub[:, p + 1:min(p + span, length) + 1]


def _score(trunk: Trunk, stream: Stream, other: Stream | None, fidelity: bool
           ) -> tuple[float, float, float, float, int]:
    """Sums over the windows' tokens: NLL of the original (``stream``) and merged (``other``) final hidden states,
    KL(original ‖ merged) and top-1 agreements when ``fidelity``, and the token count."""
    nll0 = nll1 = kl_sum = agree = 0.0
    count = 0
    for b, ids in enumerate(stream.ids):
        chunks0 = _head_logprobs(trunk, ids, stream.hidden[b])
        chunks1 = _head_logprobs(trunk, ids, other.hidden[b]) if other is not None else None
        for logp0, target in chunks0:
            nll0 -= float(logp0.gather(-1, target[..., None]).sum())
            n = int(target.numel())
            count += n
            if chunks1 is not None:
                logp1, _ = next(chunks1)
                nll1 -= float(logp1.gather(-1, target[..., None]).sum())
                if fidelity:
                    p0 = logp0.exp()
                    kl = torch.where(p0 > 0, p0 * (logp0 - logp1), torch.zeros_like(p0)).sum(-1)
                    kl_sum += float(kl.double().sum())
                    agree += float((logp0.argmax(-1) == logp1.argmax(-1)).double().sum())
    return nll0, nll1, kl_sum, agree, count


def layer_passes(model: nn.Module, recipe: Recipe, plan: MergePlan, stats: Stats, windows: torch.Tensor,
                 batch_size: int = 1) -> Stats:
    """The merge method's plan-aware passes for a fixed ``plan`` on a model in memory, without merging: ``stats``
    plus the method's entries (``fit``, ``group_assign``) per layer (for tests and experiments)."""
    recipe = recipe.model_copy(update={"train_batch_size": batch_size, "cache": False})
    job = Job(windows=windows, plan=plan, stats=stats, passes_only=True, progress=False)
    return execute(ModelSource(model), recipe, job).stats
