"""Terminal tables (rich) for merge and eval results."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MB"


def print_summary(result, console: Console | None = None) -> None:
    console = console or Console()
    r = result.recipe
    console.print(f"[bold]moemerge[/bold] {r.model_path} → {result.saved.path if result.saved else '(not saved)'}")
    if result.stats is not None:
        meta = result.stats.meta
        runs = "statistics from the cache, no calibration pass" if meta.get("model_runs") == 0 else "one forward pass"
        console.print(f"calibration: {meta.get('calibration')} — {meta.get('windows')} windows ({runs})")
    if result.ppl_before and r.eval_seq_len:
        first = f"{r.ppl_windows} evenly spaced " if r.ppl_windows else ""
        console.print(f"evaluation: {first}windows of {r.eval_seq_len} tokens of {', '.join(result.ppl_before)}")
    if result.plan is not None:
        console.print(f"experts per MoE layer: {list(result.plan.counts().values())}")
    table = Table(title="before / after")
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("merged", justify="right")
    table.add_column("ratio", justify="right")
    for name, before in result.ppl_before.items():
        after = result.ppl_after.get(name)
        table.add_row(f"perplexity {name}", f"{before:.3f}", "-" if after is None else f"{after:.3f}",
                      "-" if after is None else f"{after / before:.3f}")
    table.add_row("parameters", f"{result.parameters_before:,}", f"{result.parameters_after:,}",
                  f"{result.parameters_after / result.parameters_before:.3f}")
    if result.saved is not None:
        before_b, after_b = result.file_bytes_before, result.saved.file_bytes
        table.add_row("weights on disk", _mb(before_b), _mb(after_b),
                      "-" if not before_b else f"{after_b / before_b:.3f}")
    console.print(table)
    times = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    console.print(f"time: {times}")
    if result.saved is not None:
        console.print(f"reload check: 0 missing / 0 unexpected keys, max logit diff {result.saved.max_logit_diff:.2e}")
    if getattr(result, "fidelity", None):
        from .evaluate.fidelity import print_fidelity

        print_fidelity(result.fidelity, console)
    if getattr(result, "lm_eval_before", None) or getattr(result, "lm_eval_after", None):
        from .evaluate.lm_eval import print_table

        print_table("lm-eval (acc, acc_norm ± stderr)", result.lm_eval_before, result.lm_eval_after, console)
    if getattr(result, "report_path", None):
        console.print(f"report: {result.report_path}")


def print_ppl_table(model: str, texts, ppls: dict[str, float], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"perplexity of {model}")
    for col in ("text", "windows", "perplexity"):
        table.add_column(col)
    for t in texts:
        table.add_row(t.name, f"{t.windows.shape[0]} × {t.windows.shape[1]}", f"{ppls[t.name]:.4f}")
    console.print(table)
