"""The table the merging papers print, from the ``eval.json`` of moemerge runs (one per row).

    python scripts/paper_table.py runs/*/eval.json [--markdown]

Columns: experts per layer, wikitext2 perplexity (when measured), the zero-shot accuracy of each seed task
(``acc``; ``acc_norm`` for hellaswag, arc_challenge, openbookqa, as the papers report them) and their average.
The original model's scores come from the first run's "before" columns.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "mmlu", "openbookqa", "rte", "winogrande")
NORMED = ("hellaswag", "arc_challenge", "openbookqa")


def scores(lm_eval: dict | None) -> dict[str, float]:
    out = {}
    for task, r in ((lm_eval or {}).get("tasks") or {}).items():
        value = r.get("acc_norm") if task in NORMED and r.get("acc_norm") is not None else r.get("acc")
        if value is not None:
            out[task] = 100 * value
    return out


def row(name: str, experts: str, ppl: float | None, acc: dict[str, float]) -> list[str]:
    cells = [name, experts, "-" if ppl is None else f"{ppl:.2f}"]
    cells += [f"{acc[t]:.1f}" if t in acc else "-" for t in TASKS]
    have = [acc[t] for t in TASKS if t in acc]
    cells.append(f"{sum(have) / len(have):.1f}" if have else "-")
    return cells


def table(paths: list[Path]) -> list[list[str]]:
    rows = []
    for i, path in enumerate(paths):
        run = json.loads(path.read_text())
        recipe = run.get("recipe", {})
        ppl = run.get("perplexity", {})
        wiki = next((k for k in ppl.get("after", {}) if k.startswith("wikitext")), None)
        if i == 0:
            rows.append(row("original", "all", ppl.get("before", {}).get(wiki) if wiki else None,
                            scores((run.get("lm_eval") or {}).get("before"))))
        counts = list((run.get("experts_per_layer") or {}).values())
        experts = str(counts[0]) if counts and len(set(counts)) == 1 else (f"{sum(counts) / len(counts):.1f} avg"
                                                                           if counts else "-")
        name = recipe.get("merge", "?") if recipe.get("prune", "no") == "no" else f"prune={recipe['prune']}"
        name = f"{Path(recipe.get('model_path', '')).name}: {name}"
        rows.append(row(name, experts, ppl.get("after", {}).get(wiki) if wiki else None,
                        scores((run.get("lm_eval") or {}).get("after"))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="eval.json files of moemerge runs")
    args = ap.parse_args()
    missing = [p for p in args.runs if not p.is_file()]
    if missing:
        sys.exit(f"error: no such file: {missing[0]}")
    header = ["run", "experts", "wikitext2 ppl", *TASKS, "avg"]
    body = table(args.runs)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cells in body:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
