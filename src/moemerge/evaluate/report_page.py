"""The run report: one Markdown page (``report.md``) written next to every merged checkpoint.

It holds the recipe (YAML), the groups of every layer, two plots (experts per layer; activation frequency per layer
with the groups marked), the before/after tables (perplexity, fidelity, lm-eval, parameters, file sizes) and the
timings. Pictures live in ``report_images/`` beside it and are linked relatively, so the folder can be moved or
uploaded as it is.
"""

from __future__ import annotations

from pathlib import Path

from . import plots

IMAGES = "report_images"


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MB"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a in (None, 0) or b is None else f"{b / a:.3f}"


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def _fit_section(layer_info: dict | None) -> list[str]:
    """``merge: fit``'s per-layer objectives: unexplained share of the groups' routed output on the fitted and the
    held-out calibration windows, for the start and the chosen fit, and what each group got."""
    if not layer_info or not all("relative_error" in v for v in layer_info.values()):
        return []

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f} %"

    rows = []
    for li, v in sorted(layer_info.items(), key=lambda kv: int(kv[0])):
        rel = v["relative_error"]
        chosen = ", ".join(f"{k} {n}" for k, n in v["chosen"].items() if n)
        rows.append((li, pct(rel["start"]["train"]), pct(rel["start"]["held_out"]), pct(rel["chosen"]["train"]),
                     pct(rel["chosen"]["held_out"]), pct(v.get("gap")), chosen))
    return ["## Output fit", "",
            "Share of the groups' routed output the merged experts miss (eq. 1 of `merge/fit.py`), on the windows "
            "fitted and on those held out to choose damping and the fit.", "",
            *_table(("layer", "start, fitted", "start, held out", "fit, fitted", "fit, held out", "gap", "groups"),
                    rows), ""]


def _router_fit_section(router_fit: dict | None) -> list[str]:
    """``router_fit``'s per-layer sample objective (eq. 1 of ``save/router_refit.py``) before and after, on all the
    sample's tokens and on its held-out windows, and the rounds kept."""
    if not router_fit:
        return []

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.4g}"

    block = any("block_kept" in v for v in router_fit.values())  # block_fit_steps: one more column
    rows = [(li, num(v["before"]), num(v["after"]), num(v.get("held_out_before")), num(v.get("held_out_after")),
             f"{v.get('rounds_kept', 0)} of {v.get('rounds', 0)}",
             *([f"{v.get('block_steps', 0)} steps, " + ("kept" if v.get("block_kept") else "not kept")]
               if block else []))
            for li, v in sorted(router_fit.items(), key=lambda kv: int(kv[0]))]
    head = ("layer", "before", "after", "held out, before", "held out, after", "rounds kept",
            *(["block fit"] if block else []))
    return ["## Router and expert refit", "",
            "Mean squared error of the written block's routed output against the original's on the refit sample "
            "(all tokens, and the held-out windows that chose damping and when to stop)"
            + ("; the block fit's Adam steps and whether the held-out windows kept it." if block else "."), "",
            *_table(head, rows), ""]


def write_report(result, out_dir: str | Path, title: str | None = None) -> Path:
    """Write ``report.md`` (+ ``report_images/*.png``) for a :class:`moemerge.pipeline.MergeResult`."""
    out = Path(out_dir)
    images = out / IMAGES
    recipe = result.recipe
    lines = [f"# {title or 'moemerge merge report'}", "",
             f"- source model: `{recipe.model_path}`",
             f"- output: `{result.saved.path if result.saved else out}`"]
    if result.stats is not None:
        meta = result.stats.meta
        runs = "statistics from the cache, no calibration pass" if meta.get("model_runs") == 0 else "one forward pass"
        lines.append(f"- calibration: {meta.get('calibration')}, windows {meta.get('windows')} ({runs})")
    lines += ["", "## Recipe", "", "```yaml", recipe.to_yaml().rstrip() or "{}", "```", ""]

    plan = result.plan
    if plan is not None:
        before = {li: p.num_experts for li, p in plan.layers.items()}
        after = plan.counts()
        pic = plots.experts_per_layer(before, after, images / "experts_per_layer.png")
        lines += ["## Experts per layer", "", f"![experts per layer]({IMAGES}/{pic.name})", ""]
        if result.stats is not None:
            freq = {li: result.stats.frequency(li).tolist() for li in plan.layers if li in result.stats.layers}
            if freq:
                pic = plots.bars_per_layer(freq, images / "frequency_groups.png",
                                           "activation frequency per expert (colour / number = group)",
                                           "frequency", groups={li: plan.layers[li].groups for li in freq})
                lines += ["## Activation frequency with groups", "", f"![frequency with groups]({IMAGES}/{pic.name})",
                          ""]
        rows = []
        for li, p in sorted(plan.layers.items()):
            groups = " ".join("{" + ",".join(map(str, g)) + "}" for g in p.groups)
            rows.append((li, f"{p.num_experts} → {p.num_groups}", groups, ",".join(map(str, p.dominant)),
                         ",".join(map(str, p.dropped)) or "-"))
        lines += ["## Groups per layer", "", *_table(("layer", "experts", "groups", "dominant", "dropped"), rows), ""]

    rows = [(f"perplexity {name}", f"{b:.4f}", f"{result.ppl_after[name]:.4f}" if name in result.ppl_after else "-",
             _ratio(b, result.ppl_after.get(name))) for name, b in result.ppl_before.items()]
    rows.append(("parameters", f"{result.parameters_before:,}", f"{result.parameters_after:,}",
                 _ratio(result.parameters_before, result.parameters_after)))
    if result.saved is not None:
        rows.append(("weights on disk", _mb(result.file_bytes_before), _mb(result.saved.file_bytes),
                     _ratio(result.file_bytes_before, result.saved.file_bytes)))
    lines += ["## Before / after", "", *_table(("", "original", "merged", "ratio"), rows), ""]

    fid = getattr(result, "fidelity", None)
    if fid:
        lines += ["## Fidelity", "",
                  f"KL(original ‖ merged) = **{fid['kl']:.4g}** nats/token, top-1 agreement = **{fid['top1']:.3f}** "
                  f"over {fid['tokens']} held-out tokens.", ""]
        if fid.get("generations"):
            def cell(s: str) -> str:
                return s.replace("|", "\\|").replace("\n", " ⏎ ")

            lines += _table(("prompt", "original", "merged"),
                            [(cell(g["prompt"]), cell(g["original"]), cell(g["merged"])) for g in fid["generations"]])
            lines.append("")

    lines += _fit_section(getattr(result, "layer_info", None))
    lines += _router_fit_section(getattr(result, "router_fit", None))

    lm_before, lm_after = getattr(result, "lm_eval_before", None), getattr(result, "lm_eval_after", None)
    if lm_before or lm_after:
        from .lm_eval import format_rows

        lines += ["## lm-eval", "", f"{(lm_after or lm_before).num_fewshot}-shot; value ± standard error.", "",
                  *_table(("task", "metric", "original", "merged"), format_rows(lm_before, lm_after)), ""]

    if result.timings:
        lines += ["## Timings", "", *_table(("stage", "seconds"),
                                            [(k, f"{v:.2f}") for k, v in result.timings.items()]), ""]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
