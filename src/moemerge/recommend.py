"""``moemerge recommend``: try candidate recipes on held-out calibration text, at one or several expert budgets, and
write the best recipe per budget, in the checkpoint format that realises its size.

From one calibration (the candidates share its cached statistics), each candidate recipe is one walk of the layer
executor over the checkpoint, streamed one decoder layer at a time like ``moemerge merge`` (nothing is written, and no
copy of the model is made: memory is one layer, whatever the model's size), scored on a held-out slice of the
calibration text: the windows the calibration sampler would draw after the calibration ones (same text, same seed,
never used to calibrate). With ``n_sentences = N`` the candidates calibrate on the first ``N − ⌈N/4⌉`` windows and
are scored on the other ``⌈N/4⌉`` (75 % / 25 %). The held-out windows go through the original and the merged layer
side by side, which gives the candidate's perplexity and its KL to the original in the same walk.

**Equal size, realised.** A merge saved with ``router: keep`` has the original's size, so candidates are compared
written in the format the user will ship (``--format``): ``mapped`` (the default: exact routing, only the merged
experts stored, any per-layer counts; custom code), ``compact`` (stock transformers and vLLM: one router row per group,
the same count in every layer, so recipes with uneven counts cannot compete) or ``padded`` (stock, uneven counts
padded to the largest). Pruning and recipes that refit a collapsed router are compact by nature and compete as such
under every format. Each row's parameter count is the one of the checkpoint that recipe writes.

The winner of each budget (lowest held-out perplexity) is written with :meth:`Recipe.to_yaml`, its format included,
so ``moemerge merge --recipe FILE`` produces that checkpoint; every trial, with the exact recipe it ran, goes to
``<stem>-trials.json``, and the frontier (parameters against perplexity ratio and KL) to ``<stem>-frontier.png``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import MoemergeError
from .recipe import Recipe

if TYPE_CHECKING:
    import torch

#: candidate name -> options on top of the base recipe: every preset, then the output-fitted merge on the other
#: presets' groupings, calibrated layer by layer on the merged model (``sequential``; the house recipe's global cut
#: needs every layer at once, so it cannot be sequential), and the best stock-router variant. Entries whose methods
#: are not registered are skipped.
CANDIDATES: dict[str, dict] = {
    "hc-smoe": {"preset": "hc-smoe"},
    "m-smoe": {"preset": "m-smoe"},
    "sub-moe": {"preset": "sub-moe"},
    "sub-moe-dagger": {"preset": "sub-moe-dagger"},
    "frequency-prune": {"preset": "frequency-prune"},
    "output-prune": {"preset": "output-prune"},
    "reap": {"preset": "reap"},
    "moemerge": {"preset": "moemerge"},
    "hc-smoe+fit": {"preset": "hc-smoe", "merge": "fit"},
    "m-smoe+fit": {"preset": "m-smoe", "merge": "fit"},
    "sub-moe+fit": {"preset": "sub-moe", "merge": "fit"},
    "hc-smoe+fit+seq": {"preset": "hc-smoe", "merge": "fit", "sequential": True},
    "hc-smoe+fit+rfit": {"preset": "hc-smoe", "merge": "fit", "router_fit": True},
    "moemerge+rfit": {"preset": "moemerge", "router_fit": True},
    "hc-smoe+fit+bfit": {"preset": "hc-smoe", "merge": "fit", "router_fit": True, "block_fit_steps": 600},
    "moemerge+bfit": {"preset": "moemerge", "router_fit": True, "block_fit_steps": 600},
}

#: candidates with ``block_fit_steps`` estimated to take longer than this (seconds) are left out unless named. The
#: estimate counts every step (the held-out checks may stop the fit sooner): on the bundled models, 600 steps on the
#: 32768-token refit sample, 12 min estimated against 7–8 min measured for the fit on 2 cores (9–11 min the walk).
BLOCK_FIT_LIMIT_S = 1800

#: ``--format`` -> the ``router`` a merge candidate is written with
FORMATS = {"mapped": "mapped", "compact": "collapse", "padded": "padded"}


@dataclass
class Trial:
    name: str
    budget: int
    recipe: Recipe | None  # the recipe to run (full n_sentences); ``trial_recipe``: what was scored
    trial_recipe: Recipe | None = None
    ppl: float = math.nan
    ppl_ratio: float = math.nan
    kl: float = math.nan
    top1: float = math.nan
    parameters: int = 0
    parameters_before: int = 0  # the original checkpoint's
    seconds: float = 0.0
    error: str | None = None
    counts: list[int] = field(default_factory=list)  # experts per MoE layer after the merge
    ratios_on: dict[str, float] = field(default_factory=dict)  # ppl ratio on more texts scored in the same walk

    @property
    def format(self) -> str:
        router = (self.recipe.router if self.recipe else "") or ""
        return "compact" if router == "collapse" else router

    def to_json(self) -> dict:
        return {"name": self.name, "budget": self.budget, "format": self.format, "ppl": self.ppl,
                "ppl_ratio": self.ppl_ratio, "kl": self.kl, "top1": self.top1, "parameters": self.parameters,
                "seconds": round(self.seconds, 2), "error": self.error,
                "trial_recipe": self.trial_recipe.model_dump(exclude_defaults=True) if self.trial_recipe else None}


def in_format(options: dict, fmt: str) -> dict | str:
    """A candidate's options written in ``--format fmt``, or why it cannot be.

    Pruning drops experts and their router rows: compact under every format. A router refit is compact or mapped
    (compact under ``padded``). Sub-MoE†'s low-rank factors are a variant of mapped. Everything else takes the asked
    format.
    """
    from .methods import PRESETS

    merged = {**(PRESETS.get(options["preset"]) if options.get("preset") else {}), **options}
    if merged.get("prune", "no") != "no" or (merged.get("router_fit") and fmt == "padded"):
        return {**options, "router": "collapse"}
    if merged.get("router") == "lowrank":
        return options if fmt == "mapped" else "low-rank factors are written by --format mapped only"
    return {**options, "router": FORMATS[fmt]}


def candidate_recipe(base: Recipe, options: dict) -> Recipe:
    """``options`` (a ``preset`` name plus overrides; ``None`` removes an option the preset sets) on top of
    ``base``'s model/calibration/size options."""
    from .methods import PRESETS

    options = dict(options)
    preset = options.pop("preset", None)
    data = base.model_dump(exclude_defaults=True)
    if preset is not None:
        data.update(PRESETS.get(preset))
    data.update(options)
    return Recipe.build({k: v for k, v in data.items() if v is not None})


def available_candidates(names: list[str] | None = None) -> dict[str, dict]:
    """The candidates whose presets and methods are registered (``names`` restricts them)."""
    from .methods import PRESETS, REGISTRIES

    unknown = set(names or []) - set(CANDIDATES)
    if unknown:
        raise MoemergeError(f"unknown candidate(s) {', '.join(sorted(unknown))}; valid: {', '.join(CANDIDATES)}")
    out = {}
    for name, opts in CANDIDATES.items():
        if names and name not in names:
            continue
        if opts.get("preset") and opts["preset"] not in PRESETS:
            continue
        if opts.get("merge") and opts["merge"] not in REGISTRIES["merge"]:
            continue
        out[name] = opts
    return out


def parse_budgets(text: str | int | list[int]) -> list[int]:
    """``"12,8,6"`` -> ``[12, 8, 6]`` (experts left per MoE layer on average), or a one-line error."""
    items = text if isinstance(text, list) else [t for t in str(text).replace(" ", "").split(",") if t]
    try:
        budgets = [int(t) for t in items]
    except ValueError:
        raise MoemergeError(f"--num-average-groups {text!r}: give whole numbers, e.g. 8 or 12,8,6") from None
    if not budgets or any(b < 1 for b in budgets):
        raise MoemergeError(f"--num-average-groups {text!r}: every budget must be at least 1")
    return list(dict.fromkeys(budgets))


def held_out_windows(tokenizer, config, base: Recipe) -> tuple[int, torch.Tensor]:
    """``(calibration windows, held-out windows [M, S])``: the sampler's first ``N − ⌈N/4⌉`` windows calibrate,
    the next ``⌈N/4⌉`` (disjoint, same text and seed) are held out. Needs ``N ≥ 2``."""
    import torch

    from .calibrate import calibration_windows
    from .pipeline import calibration_settings

    settings = calibration_settings(base, config)
    n = settings.n_sentences
    held = math.ceil(n / 4)
    if n < 2:
        raise MoemergeError("recommend needs n_sentences >= 2 (a quarter of them is held out)")
    settings.self_calibration = 0.0  # held out from the user's text: the text the recipe must do well on
    every, _ = calibration_windows(tokenizer, settings)  # the sampler's windows for N, a superset of those for N - held
    settings.n_sentences = n - held
    calib, _ = calibration_windows(tokenizer, settings)
    rows = {tuple(w.tolist()) for w in calib}
    out = torch.stack([w for w in every if tuple(w.tolist()) not in rows][:held]) if len(every) > len(calib) \
        else every[-held:]
    return n - held, out


def recommend(model_path: str, base: Recipe, names: list[str] | None = None, progress: bool = False,
              budgets: list[int] | None = None, fmt: str = "mapped") -> tuple[list[Trial], dict[int, Trial]]:
    """Score every available candidate at every budget on the held-out windows, each written in the format that
    realises its size; returns every trial and the winner per budget."""
    from .loading import open_checkpoint
    from .pipeline import warn_few_tokens

    if fmt not in FORMATS:
        raise MoemergeError(f"--format {fmt!r}: recommend compares mapped, compact or padded checkpoints")
    budgets = budgets or ([base.num_average_groups] if base.num_average_groups else [])
    if not budgets:
        raise MoemergeError("recommend needs --num-average-groups")
    candidates = available_candidates(names)
    base = base.model_copy(update={"model_path": model_path})  # the written recipes name the model they were tried on
    ckpt = open_checkpoint(model_path)
    n_cal, held = held_out_windows(ckpt.tokenizer, ckpt.config, base)
    warn_few_tokens(n_cal + len(held), held.shape[1])  # the winner calibrates on all of them
    trials = []
    for budget in budgets:
        for name, opts in candidates.items():
            trial = Trial(name, budget, None)
            trials.append(trial)
            opts = in_format(opts, fmt)
            if isinstance(opts, str):
                trial.error = opts
                continue
            try:
                trial.recipe = candidate_recipe(base.model_copy(update={"num_average_groups": budget}), opts)
                trial.trial_recipe = trial.recipe.model_copy(update={"n_sentences": n_cal})
            except MoemergeError as exc:
                trial.error = str(exc)
                continue
            # a block fit too slow for this device competes only when named (--candidates)
            limit = None if names and name in names else BLOCK_FIT_LIMIT_S
            score_trial(ckpt, trial, held, progress, block_fit_limit=limit)
    winners = {}
    for budget in budgets:
        ok = [t for t in trials if t.budget == budget and t.error is None and math.isfinite(t.ppl)]
        if ok:
            winners[budget] = min(ok, key=lambda t: t.ppl)
    if not winners:
        raise MoemergeError("no candidate recipe could be merged: " + "; ".join(
            f"{t.name}: {t.error}" for t in trials))
    return trials, winners


def score_trial(ckpt, trial: Trial, held: torch.Tensor, progress: bool = False,
                block_fit_limit: float | None = None, more: dict[str, torch.Tensor] | None = None) -> Trial:
    """One streamed walk of ``trial.trial_recipe`` over checkpoint ``ckpt`` (nothing written), scored on the
    ``held`` windows through the original and the merged layers side by side: fills perplexity, its ratio, KL, top-1
    agreement, the written format's parameter count and the time, or the one-line reason it failed (also when its
    block fit is estimated to take more than ``block_fit_limit`` seconds). ``more`` names other windows to score in
    the same walk (their ratios go to ``trial.ratios_on``)."""
    from .execute.executor import execute
    from .execute.source import ShardSource
    from .group import merged_layers
    from .loading import resolve_device, resolve_dtype
    from .pipeline import block_fit_time, human_duration, job_for, self_sampler, validate_for_model

    recipe = trial.trial_recipe
    dtype = resolve_dtype(recipe.dtype)
    t0 = time.perf_counter()
    source = ShardSource(ckpt.folder, dtype=None if dtype == "auto" else dtype, device=resolve_device(recipe.device),
                         config=ckpt.config)
    try:
        if block_fit_limit is not None and recipe.router_fit and recipe.block_fit_steps:  # before its warning
            seconds = block_fit_time(recipe, merged_layers(source.moe_views(), recipe.start_layer),
                                     source.family.top_k(source.config), source.config)
            if seconds > block_fit_limit:
                raise MoemergeError(f"block fit would take about {human_duration(seconds)} on "
                                    f"{resolve_device(recipe.device)}; name it in --candidates to run it")
        validate_for_model(recipe, source, warn_tokens=False)
        sample = self_sampler(recipe, ckpt.tokenizer, ckpt.fingerprint, ckpt.folder, dtype)
        job = job_for(recipe, ckpt.tokenizer, ckpt.config, ckpt.fingerprint, progress, sample=sample)
        job.eval_windows, job.fidelity = {"held-out": held, **(more or {})}, True
        outcome = execute(source, recipe, job)
        ppl0, ppl = outcome.ppl_before["held-out"], outcome.ppl_after["held-out"]
        trial.ratios_on = {name: outcome.ppl_after[name] / outcome.ppl_before[name] for name in more or {}}
        fid = outcome.fidelity or {}
        trial.ppl, trial.ppl_ratio = ppl, ppl / ppl0
        trial.kl, trial.top1 = fid.get("kl", math.nan), fid.get("top1", math.nan)
        trial.parameters, trial.parameters_before = outcome.parameters_after, outcome.parameters_before
        trial.counts = list(outcome.plan.counts().values()) if outcome.plan is not None else []
    except MoemergeError as exc:
        trial.error = _short_reason(str(exc))
    finally:
        trial.seconds = time.perf_counter() - t0
        source.close()
    return trial


def _short_reason(error: str) -> str:
    """The reason a candidate was not compared, short enough for a line under the table."""
    import re

    uneven = re.search(r"needs the same expert count in every MoE layer.*got (\[[^\]]*\])", error)
    if uneven:
        return f"uneven counts per layer {uneven.group(1)}, not writable compact; try --format mapped or padded"
    return error


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def print_trials(trials: list[Trial], winners: dict[int, Trial], console=None) -> None:
    """One table per budget, at most 80 columns wide; refused candidates are listed under it with their reason."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=80)
    for budget in dict.fromkeys(t.budget for t in trials):
        mine = [t for t in trials if t.budget == budget]
        winner = winners.get(budget)
        table = Table(title=f"{budget} experts per layer on average: held-out scores", box=box.SIMPLE_HEAD,
                      pad_edge=False)
        for col in ("recipe", "format", "ppl ×", "KL", "top-1", "params", "s"):
            table.add_column(col, justify="left" if col in ("recipe", "format") else "right", no_wrap=True)
        for t in sorted((t for t in mine if t.error is None), key=lambda t: t.ppl if math.isfinite(t.ppl)
                        else math.inf):
            name = f"{t.name} *" if t is winner else t.name
            table.add_row(name, t.format, f"{t.ppl_ratio:.3f}", f"{t.kl:.3f}", f"{t.top1:.3f}",
                          _millions(t.parameters), f"{t.seconds:.0f}")
        console.print(table)
        for t in (t for t in mine if t.error is not None):
            console.print(f"  {t.name}: not compared ({t.error})", overflow="fold")
        if winner is not None:
            console.print(f"winner (*): {winner.name}, {winner.format}, perplexity ×{winner.ppl_ratio:.3f}, "
                          f"KL {winner.kl:.3f}\n")


def recipe_paths(output: Path, budgets: list[int]) -> dict[int, Path]:
    """One recipe file per budget: ``output`` itself for one budget, ``<stem>-<budget><suffix>`` for several."""
    if len(budgets) == 1:
        return {budgets[0]: output}
    return {b: output.with_name(f"{output.stem}-{b}{output.suffix or '.yaml'}") for b in budgets}


def side_files(output: Path) -> tuple[Path, Path]:
    """``(<stem>-trials.json, <stem>-frontier.png)`` beside the recipe file."""
    return output.with_name(f"{output.stem}-trials.json"), output.with_name(f"{output.stem}-frontier.png")


def write_recipe(winner: Trial, path: Path) -> Recipe:
    """The winner as a runnable recipe file (its format included); its output folder defaults to
    ``<file stem>-merged`` beside it."""
    recipe = winner.recipe
    if recipe.output_path is None:
        recipe = recipe.model_copy(update={"output_path": str(path.resolve().with_name(path.stem + "-merged"))})
    path.write_text(f"# moemerge recommend: best of the candidates on held-out text at {winner.budget} experts per "
                    f"layer ({winner.name}, {winner.format})\n" + recipe.to_yaml())
    return recipe


def write_outputs(trials: list[Trial], winners: dict[int, Trial], output: Path) -> list[Path]:
    """Every winner's recipe, the trials as JSON and the frontier plot; returns the recipe files written."""
    from .evaluate.plots import frontier

    output.parent.mkdir(parents=True, exist_ok=True)
    paths = recipe_paths(output, list(dict.fromkeys(t.budget for t in trials)))
    for budget, winner in winners.items():
        write_recipe(winner, paths[budget])
    trials_json, plot = side_files(output)
    trials_json.write_text(json.dumps({"trials": [t.to_json() for t in trials],
                                       "winners": {str(b): w.name for b, w in winners.items()}}, indent=2))
    ok = [t.to_json() for t in trials if t.error is None and math.isfinite(t.ppl)]
    frontier(ok, plot, title="held-out perplexity ratio and KL against size, every candidate and budget")
    return [paths[b] for b in winners]
