"""The ``moemerge`` command line: a thin layer that turns options into a :class:`Recipe` and calls the API.

Options of ``merge`` are generated from the recipe's fields, so the CLI, YAML recipes and the Python API can never
disagree: ``--num-average-groups`` and ``--num_average_groups`` both set ``num_average_groups``, and each option's
help is the field's one-line description.
"""

from __future__ import annotations

import json
import logging
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .errors import MoemergeError
from .paths import model_folder
from .recipe import Recipe


def _click_type(name: str, annotation) -> tuple[Any, bool]:
    """(click type, multiple) for a recipe field."""
    base = annotation
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        base = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(base) is list:
        return str, True
    if typing.get_origin(base) is typing.Literal:
        return click.Choice(typing.get_args(base)), False
    return {int: int, float: float, bool: bool}.get(base, str), False


class RecipeOption(click.Option):
    """An option whose help shows registered choices, looked up only when help is shown (the registries import
    torch; ``--help`` of the command group and input errors stay instant). For a recipe field (``field``), the
    choices of method-valued fields and the recipe's default; otherwise the ``choices_from`` callable's names."""

    def __init__(self, *args, field: str | None = None, choices_from: Callable[[], list[str]] | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.field = field
        self.choices_from = choices_from or _METHOD_FIELDS.get(field or "")

    def get_help_record(self, ctx: click.Context):
        record = super().get_help_record(ctx)
        if record is None:
            return None
        extra = []
        if self.choices_from is not None:
            extra.append(f"choices: {', '.join(self.choices_from())}")
        default = Recipe.model_fields[self.field].default if self.field else None
        if default not in (None, [], ()):
            extra.append(f"default: {default}")
        return record[0], record[1] + (f"  [{'; '.join(extra)}]" if extra else "")


def recipe_options(skip: tuple[str, ...] = ()) -> Callable:
    """Decorator adding one option per recipe field (both dash and underscore spellings)."""

    def deco(fn: Callable) -> Callable:
        for name, info in reversed(list(Recipe.model_fields.items())):
            if name in skip:
                continue
            ctype, multiple = _click_type(name, info.annotation)
            dashed, under = "--" + name.replace("_", "-"), "--" + name
            decls = [dashed] if dashed == under else [dashed, under]
            decls += _ALIASES.get(name, [])
            help_text = info.description or ""
            if ctype is bool:
                flags = [f"{dashed}/--no-{name.replace('_', '-')}"]
                fn = click.option(*flags, name, default=None, help=help_text, cls=RecipeOption, field=name)(fn)
            else:
                fn = click.option(*decls, name, type=ctype, multiple=multiple, default=None, help=help_text,
                                  cls=RecipeOption, field=name)(fn)
        return fn

    return deco


_ALIASES = {"router": ["--format"]}


def _method_names(field: str) -> Callable[[], list[str]]:
    def names() -> list[str]:
        from .methods import REGISTRIES

        return REGISTRIES[field].names()

    return names


_METHOD_FIELDS = {f: _method_names(f) for f in ("dominant", "similarity_base", "cluster", "linkage", "merge",
                                                "router", "router_adapt", "prune")}


def _preset_names() -> list[str]:
    from .methods import PRESETS

    return PRESETS.names()


def _given(options: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()
            if v is not None and v != ()}


def _rank() -> int | None:
    """This process's rank under torchrun / accelerate launch, None when started alone."""
    import os

    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def _fail(exc: Exception) -> None:
    rank = _rank()
    click.echo(f"error: {'' if rank is None else f'rank {rank}: '}{exc}", err=True)
    sys.exit(2)


def _candidate_names() -> list[str]:
    from .recommend import CANDIDATES

    return list(CANDIDATES)


def _refuse_existing(path: str | Path | None, overwrite: bool, what: str) -> None:
    """Nothing a user owns is replaced without ``--overwrite`` (checked before any work starts)."""
    if path is None or overwrite:
        return
    p = Path(path).expanduser()
    if p.is_file() or (p.is_dir() and any(p.iterdir())):
        raise MoemergeError(f"{what} {str(path)!r} exists; pass --overwrite to replace it")


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    """Library verbosity through the environment variables transformers / huggingface_hub / tqdm read when they
    are first imported, so that an input error is answered before any of them is (``--help`` stays instant)."""
    import os

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # offline retries would print before our one-line error
    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's bars
    if "transformers" in sys.modules:  # already imported (an embedding program, the tests): set it directly
        import transformers

        if not verbose:
            transformers.logging.set_verbosity_error()
        if quiet:
            transformers.utils.logging.disable_progress_bar()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120, "show_default": True})
@click.version_option(package_name="moemerge")
def main() -> None:
    """moemerge: merge and prune the experts of Mixture-of-Experts language models, without retraining."""
    import signal

    # SIGTERM (a launcher stopping the job, a killed peer rank) unwinds like Ctrl-C: temporary output is removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@main.command(context_settings={"max_content_width": 120})
@click.argument("model", required=False)
@click.option("--output", "-o", "output", help="Output folder (same as --output-path).")
@click.option("--recipe", "recipe_file", cls=RecipeOption, choices_from=_preset_names,
              help="Recipe YAML file or preset name; options given here override it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--verbose", "-v", is_flag=True, help="Log each stage.")
@recipe_options()
def merge(model: str | None, output: str | None, recipe_file: str | None, quiet: bool, verbose: bool,
          **options: Any) -> None:
    """Merge the experts of MODEL (folder or hub id) and write a checkpoint to --output."""
    _setup_logging(verbose, quiet)
    try:
        overrides = _given(options)
        if model:
            model_folder(model)  # a mistyped path is answered before the method registries (torch) load
            overrides["model_path"] = model
        if output:
            overrides["output_path"] = output
        recipe = Recipe.load(recipe_file, **overrides) if recipe_file else Recipe.build(overrides)
        from .pipeline import run

        result = run(recipe, progress=not quiet)
    except MoemergeError as exc:
        _fail(exc)
        return
    except RuntimeError as exc:  # torch.distributed: a collective timed out or a peer went away
        if _rank() is None:
            raise
        _fail(MoemergeError(f"the distributed job failed ({str(exc).splitlines()[0]}); see the first failing "
                            f"rank's error"))
        return
    if (_rank() or 0) != 0:
        return  # rank 0 prints and writes; the other ranks only compute
    from .report import print_summary

    print_summary(result)


@main.command("eval", context_settings={"max_content_width": 120})
@click.argument("model")
@click.option("--ppl", multiple=True, help="Text to measure: file, folder, bundled:test, wikitext2, ptb, c4 "
                                         "(repeatable; needed unless --task is given).")
@click.option("--task", default=None, help="Comma-separated lm-eval tasks: seed names (winogrande, arc_challenge, "
                                           "arc_easy, boolq, hellaswag, mmlu, openbookqa, rte), any lm-eval task, "
                                           "a task YAML or folder of YAMLs, or bundled:tiny_cloze.")
@click.option("--num-fewshot", "--num_fewshot", "num_fewshot", type=int, default=0, show_default=True,
              help="Few-shot examples for lm-eval tasks.")
@click.option("--limit", type=int, default=None, help="lm-eval: only the first N items of each task.")
@click.option("--seq-len", "--seq_len", "seq_len", type=int, default=None,
              help="Tokens per non-overlapping window  [default: the model's max positions, at most 2048].")
@click.option("--ppl-windows", "--ppl_windows", "ppl_windows", type=int, default=None,
              help="Only N windows of each text, evenly spaced over it.")
@click.option("--eval-batch-size", "--eval_batch_size", "batch_size", type=int, default=8, show_default=True,
              help="Windows (or lm-eval requests) per forward pass.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32", "float16"]), default="auto")
@click.option("--device", default="auto", help="cpu, cuda or auto.")
@click.option("--result-path", "--result_path", "result_path", default=None, help="Write the results as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace --result-path if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def eval_cmd(model: str, ppl: tuple[str, ...], task: str | None, num_fewshot: int, limit: int | None,
             seq_len: int | None, ppl_windows: int | None, batch_size: int, dtype: str, device: str,
             result_path: str | None, overwrite: bool, quiet: bool) -> None:
    """Perplexity of MODEL on each --ppl text and/or lm-eval --task accuracy (acc, acc_norm ± stderr)."""
    _setup_logging(False, quiet)
    try:
        if not ppl and not task:
            raise MoemergeError("nothing to evaluate: give --ppl TEXT and/or --task TASK")
        model_folder(model)
        _refuse_existing(result_path, overwrite, "result file")
        from .evaluate import eval_texts, perplexities, window_length
        from .evaluate.lm_eval import evaluate_tasks, resolve_tasks
        from .loading import load_model

        tasks = resolve_tasks(task) if task else None  # bad task paths fail before the model loads
        loaded = load_model(model, dtype, device, require_moe=False)
        length, note = window_length(loaded.model.config, seq_len)
        if ppl:
            click.echo(note or f"perplexity windows: {length} tokens (the model's max positions, at most 2048; "
                               f"--seq-len sets them)", err=True)
        texts = eval_texts(loaded.tokenizer, list(ppl), length, ppl_windows)
        ppls = perplexities(loaded.model, texts, batch_size, progress=not quiet)
        scores = evaluate_tasks(loaded.model, loaded.tokenizer, tasks, num_fewshot, batch_size, limit) \
            if tasks else None
    except MoemergeError as exc:
        _fail(exc)
        return
    from .report import print_ppl_table

    if texts:
        print_ppl_table(model, texts, ppls)
    if scores is not None:
        from .evaluate.lm_eval import print_table

        print_table(f"lm-eval on {model} ({num_fewshot}-shot)", scores)
    if result_path:
        Path(result_path).write_text(json.dumps({"model": model, "perplexity": ppls,
                                                 "windows": {t.name: list(t.windows.shape) for t in texts},
                                                 **({"lm_eval": scores.to_json()} if scores else {})},
                                                indent=2))


@main.command(context_settings={"max_content_width": 120})
@click.argument("model")
@click.option("--output", "-o", "output", default=None, help="Report folder (default: analysis-<model name>).")
@click.option("--compare", default=None, help="A second model (e.g. the merged checkpoint) shown side by side.")
@click.option("--calibration", default=None, help="Calibration text (default: c4 online, bundled offline).")
@click.option("--n-sentences", "--n_sentences", "n_sentences", type=int, default=16, show_default=True,
              help="Calibration windows.")
@click.option("--seq-len", "--seq_len", "seq_len", type=int, default=None,
              help="Tokens per window  [default: the model's max positions, at most 2048].")
@click.option("--batch-size", "--batch_size", "batch_size", type=int, default=4, show_default=True,
              help="Windows per forward pass.")
@click.option("--similarity", multiple=True, help="Similarity bases to plot (repeatable; default router-logits, "
                                                  "weight, expert-output).")
@click.option("--importance/--no-importance", default=True, show_default=True,
              help="Held-out loss increase when each expert alone is masked (one pass per expert).")
@click.option("--text", multiple=True, help="Held-out text for importance / interventions (default: ppl default).")
@click.option("--windows", type=int, default=4, show_default=True, help="Held-out windows for importance.")
@click.option("--mask", multiple=True, help="Mask experts, LAYER:E1,E2 or all:E (repeatable): perplexity with "
                                            "and without.")
@click.option("--force", multiple=True, help="Route only to these experts, LAYER:E1,E2 (repeatable).")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32", "float16"]), default="auto")
@click.option("--device", default="auto", help="cpu, cuda or auto.")
@click.option("--cache/--no-cache", default=True, help="Reuse calibration statistics.")
@click.option("--overwrite", is_flag=True, help="Write into --output even if it holds files.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def analyze(model: str, output: str | None, compare: str | None, calibration: str | None, n_sentences: int,
            seq_len: int | None, batch_size: int, similarity: tuple[str, ...], importance: bool, text: tuple[str, ...],
            windows: int, mask: tuple[str, ...], force: tuple[str, ...], dtype: str, device: str, cache: bool,
            overwrite: bool, quiet: bool) -> None:
    """Routing analysis of MODEL: expert frequency, router entropy, load imbalance, expert similarity, expert
    importance and routing interventions, as analysis.md + PNGs."""
    _setup_logging(False, quiet)
    try:
        for m in (model, compare):
            if m:
                model_folder(m)
        out = output or f"analysis-{Path(model).name or 'model'}"
        _refuse_existing(out, overwrite, "report folder")
        from .evaluate.analyze import DEFAULT_SIMILARITIES, print_analysis, run_analysis

        a, other, page = run_analysis(model, out, compare, calibration, n_sentences, seq_len, batch_size,
                                      list(similarity) or DEFAULT_SIMILARITIES, importance, list(text) or None,
                                      windows, list(mask), list(force), dtype, device, cache, progress=not quiet)
    except MoemergeError as exc:
        _fail(exc)
        return
    print_analysis(a)
    if other is not None:
        print_analysis(other)
    for iv in a.interventions:
        click.echo(f"intervention mask={iv['mask']} force={iv['force']}: perplexity {iv['ppl_before']:.4f} -> "
                   f"{iv['ppl_after']:.4f}")
    click.echo(f"report: {page}")


@main.command()
@click.option("--model", "model_name", default=None, help="Bundled model: tiny-mixtral or tiny-qwen-moe.")
@click.option("--output", "-o", default=None, help="Output folder (default: a temporary folder).")
@click.option("--num-average-groups", "--num_average_groups", "groups", type=int, default=None,
              help="Experts left per layer (default: half).")
@click.option("--router", "--format", "router", default="collapse", show_default=True, cls=RecipeOption,
              choices_from=_METHOD_FIELDS["router"], help="Checkpoint format.")
@click.option("--recipe", "recipe_name", default="hc-smoe", show_default=True, cls=RecipeOption,
              choices_from=_preset_names, help="Preset to run.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists (never done without this flag).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def demo(model_name: str | None, output: str | None, groups: int | None, router: str, recipe_name: str, overwrite: bool,
         quiet: bool) -> None:
    """Merge a bundled tiny MoE model with the bundled text and print the before/after table (offline).

    Default: HC-SMoE on tiny-qwen-moe, 16 -> 8 experts per layer, saved collapsed (smaller, stock transformers)."""
    import tempfile

    from . import zoo

    _setup_logging(False, quiet)
    try:
        path = zoo.model_path(model_name or zoo.DEFAULT_MODEL)
        if not (path / "config.json").exists():
            raise MoemergeError(f"bundled model {path} is missing; run scripts/train_zoo.py")
        out = output or str(Path(tempfile.mkdtemp(prefix="moemerge-demo-")) / "merged")
        config = json.loads((path / "config.json").read_text())
        experts = config.get("num_local_experts") or config.get("num_experts")
        recipe = Recipe.load(recipe_name, model_path=str(path), output_path=out, calibration="bundled",
                             num_average_groups=groups or max(experts // 2, config["num_experts_per_tok"]),
                             seq_len=256, ppl=["bundled:test"], ppl_windows=64, router=router,
                             overwrite=overwrite)
        from .pipeline import run

        result = run(recipe, progress=not quiet)
    except MoemergeError as exc:
        _fail(exc)
        return
    from .report import print_summary

    print_summary(result)


@main.command(context_settings={"max_content_width": 120})
@click.argument("model")
@click.option("--num-average-groups", "--num_average_groups", "groups", required=True,
              help="Experts (groups) left per MoE layer on average; several budgets at once: 12,8,6.")
@click.option("--output", "-o", required=True,
              help="Recipe YAML file to write (the winner); with several budgets, one file per budget "
                   "(NAME-12.yaml, ...). NAME-trials.json and NAME-frontier.png go beside it.")
@click.option("--format", "fmt", type=click.Choice(["mapped", "compact", "padded"]), default="mapped",
              show_default=True, help="Checkpoint format the candidates are written in and compared at: mapped "
                                      "(exact routing, custom code), compact (stock transformers / vLLM, same count "
                                      "per layer), padded (stock, uneven counts padded).")
@click.option("--candidates", default=None, cls=RecipeOption, choices_from=_candidate_names,
              help="Comma-separated candidate names (default: all).")
@click.option("--overwrite", is_flag=True, help="Replace the recipe, trials and frontier files if they exist.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@recipe_options(skip=tuple(f for f in Recipe.model_fields if f not in (
    "calibration", "n_sentences", "seq_len", "train_batch_size", "seed", "cache", "self_calibration", "dtype",
    "device")))
def recommend(model: str, groups: str, output: str, fmt: str, candidates: str | None, overwrite: bool, quiet: bool,
              **options: Any) -> None:
    """Try candidate recipes on held-out calibration text, print the table and write the best as a recipe."""
    _setup_logging(False, quiet)
    try:
        from .recommend import parse_budgets, recipe_paths, side_files

        model_folder(model)
        budgets = parse_budgets(groups)
        out = Path(output)
        for path in [*recipe_paths(out, budgets).values(), *side_files(out)]:
            _refuse_existing(path, overwrite, "file")
        from .recommend import print_trials, write_outputs
        from .recommend import recommend as run_recommend

        base = Recipe.build(_given(options), model_path=model, num_average_groups=budgets[0])
        names = [c.strip() for c in candidates.split(",")] if candidates else None
        trials, winners = run_recommend(model, base, names, progress=not quiet, budgets=budgets, fmt=fmt)
        print_trials(trials, winners)
        written = write_outputs(trials, winners, out)
    except MoemergeError as exc:
        _fail(exc)
        return
    trials_json, plot = side_files(out)
    for path in written:
        click.echo(f"wrote {path}; run it with: moemerge merge --recipe {path}")
    click.echo(f"all trials: {trials_json}; frontier: {plot}")


if __name__ == "__main__":  # pragma: no cover
    main()
