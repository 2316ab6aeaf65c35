"""``moemerge recommend``: try candidate recipes on held-out calibration text and write the best as a recipe file.

From one calibration (the candidates share its cached statistics), each candidate recipe is one walk of the layer
executor over the checkpoint, streamed one decoder layer at a time like ``moemerge merge`` (nothing is written, and no
copy of the model is made: memory is one layer, whatever the model's size), scored on a held-out slice of the
calibration text: the windows the calibration sampler would draw after the calibration ones (same text, same seed,
never used to calibrate). With ``n_sentences = N`` the candidates calibrate on the first ``N − ⌈N/4⌉`` windows and
are scored on the other ``⌈N/4⌉`` (75 % / 25 %). The held-out windows go through the original and the merged layer
side by side, which gives the candidate's perplexity and its KL to the original in the same walk.

The winner (lowest held-out perplexity) is written with :meth:`Recipe.to_yaml` — the candidate's options on top of
the given model and calibration options, with the full ``n_sentences`` — so ``moemerge merge --recipe FILE`` runs it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MoemergeError
from .recipe import Recipe

#: candidate name -> options on top of the base recipe; entries whose methods are not registered are skipped.
CANDIDATES: dict[str, dict] = {
    "hc-smoe": {"preset": "hc-smoe"},
    "m-smoe": {"preset": "m-smoe"},
    "sub-moe": {"preset": "sub-moe"},
    "frequency-prune": {"preset": "frequency-prune"},
    "reap": {"preset": "reap"},
    "hc-smoe+fit": {"preset": "hc-smoe", "merge": "fit"},
    "hc-smoe+fit+sequential": {"preset": "hc-smoe", "merge": "fit", "sequential": True},
    "m-smoe+fit": {"preset": "m-smoe", "merge": "fit"},
    "sub-moe+fit": {"preset": "sub-moe", "merge": "fit"},
    "global-threshold+fit": {"preset": "hc-smoe", "hierarchical_stopping_metric": "distance", "merge": "fit"},
    "hc-smoe+fit+collapse+router-fit": {"preset": "hc-smoe", "merge": "fit", "router": "collapse",
                                        "router_fit": True},
}


@dataclass
class Trial:
    name: str
    recipe: Recipe | None
    ppl: float = math.nan
    ppl_ratio: float = math.nan
    kl: float = math.nan
    top1: float = math.nan
    parameters: int = 0
    seconds: float = 0.0
    error: str | None = None


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

    out = {}
    for name, opts in CANDIDATES.items():
        if names and name not in names:
            continue
        if opts.get("preset") and opts["preset"] not in PRESETS:
            continue
        if opts.get("merge") and opts["merge"] not in REGISTRIES["merge"]:
            continue
        if opts.get("router_fit") and "router_fit" not in Recipe.model_fields:
            continue
        out[name] = opts
    unknown = set(names or []) - set(CANDIDATES)
    if unknown:
        raise MoemergeError(f"unknown candidate(s) {', '.join(sorted(unknown))}; valid: {', '.join(CANDIDATES)}")
    return out


def held_out_windows(tokenizer, config, base: Recipe) -> tuple[int, torch.Tensor]:
    """``(calibration windows, held-out windows [M, S])``: the sampler's first ``N − ⌈N/4⌉`` windows calibrate,
    the next ``⌈N/4⌉`` (disjoint, same text and seed) are held out. Needs ``N ≥ 2``."""
    from .calibrate import calibration_windows
    from .pipeline import calibration_settings

    n = base.n_sentences
    held = math.ceil(n / 4)
    if n < 2:
        raise MoemergeError("recommend needs n_sentences >= 2 (a quarter of them is held out)")
    settings = calibration_settings(base, config)
    every, _ = calibration_windows(tokenizer, settings)  # the sampler's windows for N, a superset of those for N - held
    settings.n_sentences = n - held
    calib, _ = calibration_windows(tokenizer, settings)
    rows = {tuple(w.tolist()) for w in calib}
    out = torch.stack([w for w in every if tuple(w.tolist()) not in rows][:held]) if len(every) > len(calib) \
        else every[-held:]
    return n - held, out


def recommend(model_path: str, base: Recipe, names: list[str] | None = None, progress: bool = False
              ) -> tuple[list[Trial], Trial]:
    """Score every available candidate on the held-out windows; returns the trials and the winner."""
    from .execute.executor import execute
    from .execute.source import ShardSource
    from .loading import open_checkpoint, resolve_device, resolve_dtype
    from .pipeline import job_for, validate_for_model

    if base.num_average_groups is None:
        raise MoemergeError("recommend needs --num-average-groups")
    ckpt = open_checkpoint(model_path)
    n_cal, held = held_out_windows(ckpt.tokenizer, ckpt.config, base)
    dtype = resolve_dtype(base.dtype)
    trials = []
    for name, opts in available_candidates(names).items():
        try:
            recipe = candidate_recipe(base, opts)
            trial_recipe = recipe.model_copy(update={"n_sentences": n_cal})
        except MoemergeError as exc:
            trials.append(Trial(name, None, error=str(exc)))
            continue
        t0 = time.perf_counter()
        source = ShardSource(ckpt.folder, dtype=None if dtype == "auto" else dtype,
                             device=resolve_device(base.device), config=ckpt.config)
        try:
            validate_for_model(trial_recipe, source)
            job = job_for(trial_recipe, ckpt.tokenizer, ckpt.config, ckpt.fingerprint, progress)
            job.eval_windows, job.fidelity = {"held-out": held}, True
            outcome = execute(source, trial_recipe, job)
            ppl0, ppl = outcome.ppl_before["held-out"], outcome.ppl_after["held-out"]
            fid = outcome.fidelity or {}
            trials.append(Trial(name, recipe, ppl, ppl / ppl0, fid.get("kl", math.nan), fid.get("top1", math.nan),
                                outcome.parameters_after, time.perf_counter() - t0))
        except MoemergeError as exc:
            trials.append(Trial(name, recipe, error=str(exc), seconds=time.perf_counter() - t0))
        finally:
            source.close()
    ok = [t for t in trials if t.error is None and math.isfinite(t.ppl)]
    if not ok:
        raise MoemergeError("no candidate recipe could be merged: " + "; ".join(f"{t.name}: {t.error}"
                                                                                 for t in trials))
    return trials, min(ok, key=lambda t: t.ppl)


def print_trials(trials: list[Trial], winner: Trial, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="held-out comparison (one pass per recipe)")
    for col in ("recipe", "ppl ratio", "KL (nats)", "top-1", "parameters", "merge s", "note"):
        table.add_column(col, justify="left" if col in ("recipe", "note") else "right")
    for t in sorted(trials, key=lambda t: (t.error is not None, t.ppl if math.isfinite(t.ppl) else math.inf)):
        if t.error:
            table.add_row(t.name, "-", "-", "-", "-", f"{t.seconds:.1f}", t.error[:60])
            continue
        table.add_row(t.name, f"{t.ppl_ratio:.4f}", f"{t.kl:.4f}", f"{t.top1:.3f}", f"{t.parameters:,}",
                      f"{t.seconds:.1f}", "winner" if t is winner else "")
    console.print(table)
    console.print(f"winner: [bold]{winner.name}[/bold] (perplexity ratio {winner.ppl_ratio:.4f}, KL {winner.kl:.4f})")


def write_recipe(winner: Trial, path: Path) -> Recipe:
    """The winner as a runnable recipe file; its output folder defaults to ``<file stem>-merged`` beside it."""
    recipe = winner.recipe
    if recipe.output_path is None:
        recipe = recipe.model_copy(update={"output_path": str(path.with_name(path.stem + "-merged"))})
    path.write_text(f"# moemerge recommend: best of the candidates on held-out text ({winner.name})\n"
                    + recipe.to_yaml())
    return recipe
