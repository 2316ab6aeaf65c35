"""Bridge to lm-evaluation-harness: run multiple-choice (or any) lm-eval tasks on a model object in memory.

``--task`` takes a comma-separated list whose items are

* a name of the seed list (:data:`SEED_TASKS`) or any other lm-eval task / group name (needs the dataset: online,
  or in the Hugging Face datasets cache),
* a path to a local task YAML, or a folder of task YAMLs (every task in it runs), or
* ``bundled:tiny_cloze``, the tiny offline task shipped with moemerge (``zoo/data/tasks``).

Local YAMLs work fully offline. lm-eval resolves a relative ``data_files`` against the current directory, not the
YAML's folder, so a YAML without ``!function`` tags is read here and handed to lm-eval as a task dict with
absolute paths; other YAMLs go through ``include_path`` unchanged.

The model is evaluated in memory (``HFLM(pretrained=model, tokenizer=tokenizer)``), so a merged model is measured
right after merging, before or without saving it. Results keep ``acc`` and ``acc_norm`` apart, each with its stderr.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

from ..errors import MoemergeError

LOG = logging.getLogger(__name__)

#: The tasks the merging papers report (HC-SMoE / MC-SMoE / Sub-MoE zero-shot suites).
SEED_TASKS = ("winogrande", "arc_challenge", "arc_easy", "boolq", "hellaswag", "mmlu", "openbookqa", "rte")
#: Metrics reported per task, in this order (others that a task defines are kept in ``extra``).
METRICS = ("acc", "acc_norm")
BUNDLED_TASKS = Path(__file__).resolve().parent.parent / "zoo" / "data" / "tasks"


@dataclass
class TaskSpec:
    """What to hand lm-eval: task names or dicts, and folders for ``include_path``."""

    tasks: list[str | dict] = field(default_factory=list)
    include_paths: list[str] = field(default_factory=list)
    needs_defaults: bool = False  # a built-in task name: the full task index must be built (slow, ~15-30 s)

    @property
    def names(self) -> list[str]:
        return [t["task"] if isinstance(t, dict) else t for t in self.tasks]


class _TolerantLoader(yaml.SafeLoader):
    """Reads lm-eval YAMLs whose custom tags (``!function``) we only need to detect, not run."""


def _unknown_tag(loader: yaml.Loader, suffix: str, node: yaml.Node) -> Any:
    loader.has_custom_tags = True  # type: ignore[attr-defined]
    return f"!{suffix}"


_TolerantLoader.add_multi_constructor("!", _unknown_tag)


def _absolute_files(files: str | list | dict, base: Path) -> str | list | dict:
    """``data_files`` (a path, a list, or split -> path(s)) with relative paths resolved against ``base``."""
    if isinstance(files, dict):
        return {k: _absolute_files(v, base) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute_files(f, base) for f in files]
    p = Path(files).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _flatten(files: str | list | dict) -> list[str]:
    if isinstance(files, dict):
        return [f for v in files.values() for f in _flatten(v)]
    return [f for v in files for f in _flatten(v)] if isinstance(files, list) else [files]


def _read_yaml(path: Path) -> tuple[Any, bool]:
    """The YAML's data and whether it uses custom tags such as ``!function``."""
    loader = _TolerantLoader(path.read_text())
    loader.has_custom_tags = False  # type: ignore[attr-defined]
    try:
        return loader.get_single_data(), loader.has_custom_tags  # type: ignore[attr-defined]
    except yaml.YAMLError as exc:
        raise MoemergeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    finally:
        loader.dispose()


def _task_dict(path: Path, data: dict) -> dict:
    """The task YAML's data with ``data_files`` made absolute and checked."""
    files = (data.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        files = _absolute_files(files, path.parent)
        for f in _flatten(files):
            if not Path(f).exists():
                raise MoemergeError(f"{path}: data file {f} does not exist")
        data = {**data, "dataset_kwargs": {**data["dataset_kwargs"], "data_files": files}}
    return data


def _local_tasks(path: Path, out: TaskSpec) -> None:
    """Add the tasks of a YAML file or folder. In a folder holding group YAMLs only the groups run (their
    subtasks would otherwise run twice); files that are neither tasks nor groups (shared snippets) are skipped."""
    yamls = [path] if path.is_file() else sorted(path.rglob("*.y*ml"))
    if not yamls:
        raise MoemergeError(f"task folder {path} holds no .yaml file")
    parsed = []
    for y in yamls:
        data, tagged = _read_yaml(y)
        if not isinstance(data, dict) or ("task" not in data and "group" not in data):
            if path.is_file():
                raise MoemergeError(f"{y}: not an lm-eval task YAML (no 'task:' key)")
            continue
        parsed.append((y, data, tagged))
    groups = [p for p in parsed if "group" in p[1] and not isinstance(p[1].get("task"), str)]
    for y, data, tagged in groups or parsed:
        if y in [g[0] for g in groups]:
            name = str(data["group"])
        elif tagged or "include" in data:  # lm-eval must resolve these relative to the file itself
            name = str(data["task"])
        else:
            out.tasks.append(_task_dict(y, data))
            continue
        out.tasks.append(name)
        if str(y.parent) not in out.include_paths:
            out.include_paths.append(str(y.parent))
    if not out.tasks:
        raise MoemergeError(f"{path}: no lm-eval task found")


def resolve_tasks(spec: str | list[str]) -> TaskSpec:
    """Turn ``--task`` into a :class:`TaskSpec`; local paths are checked here, before any model runs."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    if not items:
        raise MoemergeError("no lm-eval task given")
    out = TaskSpec()
    for item in items:
        if item.startswith("bundled:"):
            name = item.split(":", 1)[1]
            folder = BUNDLED_TASKS / name
            if not folder.is_dir():
                have = sorted(p.name for p in BUNDLED_TASKS.iterdir()) if BUNDLED_TASKS.is_dir() else []
                raise MoemergeError(f"unknown bundled task {name!r}; valid choices: {', '.join(have)}")
            item = str(folder)
        path = Path(item).expanduser()
        if path.suffix in (".yaml", ".yml") or path.exists():
            if not path.exists():
                raise MoemergeError(f"task file {item} does not exist")
            _local_tasks(path, out)
        else:
            out.tasks.append(item)
            out.needs_defaults = True
    return out


def task_manager(spec: TaskSpec):
    """An lm-eval TaskManager that indexes the built-in tasks only when a built-in name was asked for."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=spec.include_paths or None, include_defaults=spec.needs_defaults)
    known = set(tm.all_tasks)
    for name in spec.tasks:
        if isinstance(name, str) and name not in known:
            hint = f" (seed list: {', '.join(SEED_TASKS)})" if spec.needs_defaults else ""
            raise MoemergeError(f"unknown lm-eval task {name!r}{hint}")
    return tm


@dataclass
class TaskResult:
    """One task's scores: ``acc`` / ``acc_norm`` with their standard errors (None when the task lacks them)."""

    task: str
    n: int | None
    acc: float | None = None
    acc_stderr: float | None = None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"n": self.n, "acc": self.acc, "acc_stderr": self.acc_stderr, "acc_norm": self.acc_norm,
                "acc_norm_stderr": self.acc_norm_stderr, **({"extra": self.extra} if self.extra else {})}


def _number(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" where it has no stderr


def parse_results(results: dict) -> dict[str, TaskResult]:
    """lm-eval's ``results`` block (``{'task': {'acc,none': .., 'acc_stderr,none': ..}}``) as TaskResults."""
    n_samples = results.get("n-samples", {})
    out = {}
    for task, metrics in results["results"].items():
        r = TaskResult(task, (n_samples.get(task) or {}).get("effective"))
        for key, value in metrics.items():
            if "," not in key:
                continue
            metric, _filter = key.split(",", 1)
            if metric in METRICS or metric in tuple(f"{m}_stderr" for m in METRICS):
                setattr(r, metric, _number(value))
            elif not metric.endswith("_stderr") and _number(value) is not None:
                r.extra[metric] = _number(value)
        out[task] = r
    return out


@dataclass
class LmEvalResult:
    tasks: dict[str, TaskResult]
    num_fewshot: int
    samples: dict[str, list[dict]] | None = None  # per-item records when asked for (tests, debugging)

    def to_json(self) -> dict:
        return {"num_fewshot": self.num_fewshot, "tasks": {k: v.to_json() for k, v in self.tasks.items()}}


#: lm-eval warnings that are about how moemerge calls it (an in-memory model, an explicit num_fewshot), not about
#: the user's model or tasks: dropped by a filter on the loggers that emit them, every other warning still shows
_EXPECTED_WARNINGS = ("`pretrained` model kwarg is not of type `str`",
                      "Passed an already-initialized model through `pretrained`",
                      "Overwriting default num_fewshot of")


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_EXPECTED_WARNINGS)


def _silence_lm_eval() -> None:
    for name in ("lm_eval.models.huggingface", "lm_eval.evaluator"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpected) for f in logger.filters):
            logger.addFilter(_DropExpected())


def evaluate_tasks(model, tokenizer, tasks: str | list[str] | TaskSpec, num_fewshot: int = 0, batch_size: int = 8,
                   limit: int | float | None = None, log_samples: bool = False, seed: int = 0) -> LmEvalResult:
    """Run lm-eval tasks on ``model`` as it is in memory and return acc / acc_norm (± stderr) per task."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = tasks if isinstance(tasks, TaskSpec) else resolve_tasks(tasks)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    _silence_lm_eval()
    tm = task_manager(spec)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        # lm-eval records the git commit of the working directory with `git describe`, which prints "fatal: not a
        # git repository" outside one; the user's cwd says nothing about the model, so no commit is recorded
        with mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None):
            res = lm_eval.simple_evaluate(model=lm, tasks=list(spec.tasks), task_manager=tm, num_fewshot=num_fewshot,
                                          limit=limit, log_samples=log_samples, bootstrap_iters=1000,
                                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                          fewshot_random_seed=seed)
    except (FileNotFoundError, ConnectionError) as exc:
        raise MoemergeError(f"lm-eval could not load a task's data ({str(exc).splitlines()[0]}); offline, use a "
                            f"local task YAML") from None
    model.eval()  # HFLM leaves it in eval mode already; keep the promise explicit for callers
    return LmEvalResult(parse_results(res), num_fewshot, res.get("samples") if log_samples else None)


def format_rows(before: LmEvalResult | None, after: LmEvalResult | None = None) -> list[tuple[str, ...]]:
    """Table rows ``(task, metric, before ± se, after ± se)`` for acc and acc_norm, one row per metric present."""
    def cell(r: TaskResult | None, metric: str) -> str:
        if r is None or getattr(r, metric) is None:
            return "-"
        se = getattr(r, f"{metric}_stderr")
        return f"{getattr(r, metric):.4f}" + ("" if se is None else f" ± {se:.4f}")

    names = list(dict.fromkeys([*(before.tasks if before else {}), *(after.tasks if after else {})]))
    rows = []
    for name in names:
        b = before.tasks.get(name) if before else None
        a = after.tasks.get(name) if after else None
        for metric in METRICS:
            if any(r is not None and getattr(r, metric) is not None for r in (b, a)):
                rows.append((name, metric, cell(b, metric), cell(a, metric)))
    return rows


def print_table(title: str, before: LmEvalResult | None, after: LmEvalResult | None = None, console=None) -> None:
    """A rich table of acc / acc_norm (± stderr): one column, or original / merged side by side."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=title)
    for col in ("task", "metric", *(("original", "merged") if after is not None else ("value",))):
        table.add_column(col)
    for row in format_rows(before, after):
        table.add_row(*(row if after is not None else row[:3]))
    console.print(table)
