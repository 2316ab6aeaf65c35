"""Compare every merging and pruning recipe on the bundled tiny models at 25 % and 50 % fewer experts.

One script for the README's comparison table (issues 4, 5 and 8). Per model, the statistics every recipe needs are
calibrated once and cached; each recipe then merges a fresh copy of the model (plan-aware passes such as zipit's or
fit's, and sequential recipes, run their own passes and count them in their time). Each row reports, from one pass
over held-out windows (``bundled:validation``, never used for calibration): perplexity ratio to the original,
KL(original ‖ merged) per token, top-1 agreement, parameters of the saved model in its most compact format (router
``keep`` counted as ``mapped``: one copy per merged expert), and the time of grouping + merging.

    python scripts/compare.py                        # writes docs/comparison.md
    python scripts/compare.py --models PATH --ratios 0.5 --rows hc-smoe reap hc-smoe+fit
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time
from pathlib import Path

import torch

from moemerge import Recipe
from moemerge.evaluate import eval_texts
from moemerge.families import family_of, moe_layers
from moemerge.loading import LoadedModel, load_model
from moemerge.merge import MERGE
from moemerge.pipeline import calibrate, calibration_settings, merge_model
from moemerge.recommend import candidate_recipe, score

# name -> (kind, recipe options: a preset plus overrides)
ROWS: dict[str, tuple[str, dict]] = {
    "hc-smoe": ("paper", {"preset": "hc-smoe"}),
    "hc-smoe, kmeans": ("paper", {"preset": "hc-smoe", "cluster": "kmeans", "linkage": None}),
    "hc-smoe, collapse": ("paper", {"preset": "hc-smoe", "router": "collapse"}),
    "m-smoe": ("paper", {"preset": "m-smoe"}),
    "zipit": ("paper", {"preset": "hc-smoe", "merge": "zipit"}),
    "fix-dom-same": ("paper", {"preset": "hc-smoe", "merge": "fix-dom-same"}),
    "weighted 2,1": ("paper", {"preset": "hc-smoe", "merge": "weighted", "mode": "2,1"}),
    "dominant=frequency": ("paper", {"preset": "hc-smoe", "dominant": "frequency", "linkage": None}),
    "dominant=random": ("paper", {"preset": "hc-smoe", "dominant": "random", "linkage": None}),
    "dynamic_group": ("paper", {"preset": "hc-smoe", "dynamic_group": True}),
    "global threshold": ("paper", {"preset": "hc-smoe", "hierarchical_stopping_metric": "distance"}),
    "sub-moe": ("paper", {"preset": "sub-moe"}),
    "sub-moe, multi_layer 1": ("paper", {"preset": "sub-moe", "multi_layer": 1}),
    "sub-moe† (rank ½, lowrank)": ("paper", {"preset": "sub-moe-dagger"}),
    "frequency-prune": ("prune", {"preset": "frequency-prune"}),
    "output-prune": ("prune", {"preset": "output-prune"}),
    "reap": ("prune", {"preset": "reap"}),
    "hc-smoe + fit": ("new", {"preset": "hc-smoe", "merge": "fit"}),
    "m-smoe + fit": ("new", {"preset": "m-smoe", "merge": "fit"}),
    "sub-moe + fit": ("new", {"preset": "sub-moe", "merge": "fit"}),
    "global threshold + fit": ("new", {"preset": "hc-smoe", "hierarchical_stopping_metric": "distance",
                                       "merge": "fit"}),
    "hc-smoe + fit + sequential": ("new", {"preset": "hc-smoe", "merge": "fit", "sequential": True}),
    "hc-smoe + fit, collapse": ("new", {"preset": "hc-smoe", "merge": "fit", "router": "collapse"}),
    "hc-smoe + fit, collapse + router-fit": ("new", {"preset": "hc-smoe", "merge": "fit", "router": "collapse",
                                                     "router_fit": True}),
    "frequency-prune + router-fit": ("new", {"preset": "frequency-prune", "router_fit": True}),
}
BASELINES = ("hc-smoe", "frequency-prune", "reap")


def saved_parameters(model, recipe: Recipe, plan, total_before: int) -> int:
    """Parameters of the checkpoint in its most compact faithful format: for router ``keep`` (every slot holds a
    copy) count each merged expert once, as ``--format mapped`` stores it; otherwise what the model holds."""
    if recipe.router != "keep":
        return sum(p.numel() for p in model.parameters())
    layer = moe_layers(model)[0]
    gate_up, down = layer.expert_weights()
    per_expert = gate_up[0].numel() + down[0].numel()
    removed = sum(p.num_experts - p.num_groups for p in plan.layers.values())
    return total_before - removed * per_expert


def shared_statistics(recipes: list[Recipe]) -> list[str]:
    """Union of the single-pass statistics the recipes need (so one calibration serves them all)."""
    from moemerge.group import needed_statistics
    from moemerge.save import router_statistics

    names: list[str] = []
    for r in recipes:
        names += needed_statistics(r) + list(MERGE.get(r.merge).statistics(r))
        names += router_statistics(r.router, r.router_adapt)
    return list(dict.fromkeys(names))


def pivot(table_lines: list[str]) -> list[str]:
    """The perplexity ratios of a finished comparison as one compact table: recipes × (model, share removed)."""
    cols: list[str] = []
    cells: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    model = ""
    for line in table_lines:
        if line.startswith("## "):
            model = line[3:].split(" ")[0]
        elif line.startswith("| ") and "%" in line.split("|")[1]:
            parts = [p.strip() for p in line.strip("|").split("|")]
            col = f"{model} −{parts[0]}"
            if col not in cols:
                cols.append(col)
            kinds[parts[1]] = parts[2]
            cells.setdefault(parts[1], {})[col] = parts[3] if not parts[3].startswith("failed") else "failed"
    out = ["| recipe | kind | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, row in cells.items():
        out.append(f"| {name} | {kinds[name]} | " + " | ".join(row.get(c, "") for c in cols) + " |")
    return out


def main() -> None:
    from moemerge.zoo import MODELS, model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help="model folders (default: the bundled tiny models)")
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.25, 0.5], help="share of experts removed")
    ap.add_argument("--rows", nargs="*", default=list(ROWS), help="subset of: " + ", ".join(ROWS))
    ap.add_argument("--n-sentences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ppl-windows", type=int, default=48)
    ap.add_argument("--ppl", default="bundled:validation")
    ap.add_argument("--calibration", default="bundled")
    ap.add_argument("--out", default="docs/comparison.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    torch.set_num_threads(2)

    models = args.models or [str(model_path(n)) for n in MODELS]
    lines = ["# Method comparison", "",
             f"Produced by `python scripts/compare.py`. Calibration: `{args.calibration}`, {args.n_sentences} windows "
             f"× {args.seq_len} tokens, one cached pass per model. Held out: `{args.ppl}`, first {args.ppl_windows} "
             "windows × the same length; ppl ratio = merged / original perplexity, KL = KL(original ‖ merged) in "
             "nats per token, top-1 = share of tokens with the same most likely next token. Parameters: the saved "
             "model in its most compact faithful format (router keep counted as `--format mapped`). Time: grouping "
             "+ merging (plus the recipe's own extra passes), on 2 CPU cores, after the shared calibration.", ""]
    for path in models:
        loaded = load_model(path, "float32", "cpu")
        spec = family_of(loaded.model.config)
        num_experts, top_k = spec.num_experts(loaded.model.config), spec.top_k(loaded.model.config)
        total_before = sum(p.numel() for p in loaded.model.parameters())
        held = eval_texts(loaded.tokenizer, [args.ppl], args.seq_len, args.ppl_windows)[0].windows
        ppl0, _, _, ref = score(loaded.model, held, None)
        lines += [f"## {Path(path).name} ({spec.name}: {len(moe_layers(loaded.model))} MoE layers × {num_experts} "
                  f"experts, top-{top_k}; original perplexity {ppl0:.2f}, {total_before / 1e6:.2f} M parameters)", "",
                  "| removed | recipe | kind | ppl ratio | KL | top-1 | experts/layer | parameters (M) | time (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        summary = []
        for ratio in args.ratios:
            groups = max(top_k, num_experts - round(num_experts * ratio))
            base = Recipe.build(model_path=path, calibration=args.calibration, n_sentences=args.n_sentences,
                                seq_len=args.seq_len, num_average_groups=groups, dtype="float32", device="cpu")
            recipes = {}
            for name in args.rows:
                kind, opts = ROWS[name]
                recipes[name] = (kind, candidate_recipe(base, opts))
            t0 = time.perf_counter()
            calibrate(loaded, calibration_settings(base, loaded.model.config),
                      shared_statistics([r for _, r in recipes.values()]), progress=False)
            print(f"[{Path(path).name} {ratio:.0%}] shared calibration {time.perf_counter() - t0:.1f}s", flush=True)
            results: dict[str, float] = {}
            for name, (kind, recipe) in recipes.items():
                try:
                    model = copy.deepcopy(loaded.model)
                    t0 = time.perf_counter()
                    out = merge_model(LoadedModel(model, loaded.tokenizer, loaded.source, loaded.local_dir,
                                                  loaded.fingerprint), recipe, progress=False)
                    elapsed = time.perf_counter() - t0
                    ppl, kl, top1, _ = score(model, held, ref)
                    results[name] = ppl / ppl0
                    counts = list(out.plan.counts().values())
                    per_layer = str(counts[0]) if len(set(counts)) == 1 else "/".join(map(str, counts))
                    params = saved_parameters(model, recipe, out.plan, total_before)
                    lines.append(f"| {ratio:.0%} | {name} | {kind} | {ppl / ppl0:.3f} | {kl:.3f} | {top1:.3f} | "
                                 f"{per_layer} | {params / 1e6:.2f} | {elapsed:.1f} |")
                    del model
                except Exception as exc:  # one failing row must not hide the others; the table says why
                    lines.append(f"| {ratio:.0%} | {name} | {kind} | failed: {str(exc).splitlines()[0][:80]} "
                                 "| | | | | |")
                print(lines[-1], flush=True)
            baseline = min((results[b], b) for b in BASELINES if b in results)
            best = min((v, k) for k, v in results.items())
            gap = baseline[0] - 1
            closed = (baseline[0] - best[0]) / gap if gap > 0 else math.nan
            summary.append(f"* {ratio:.0%} removed: best of hc-smoe / frequency-prune / reap is **{baseline[1]}** "
                           f"(ratio {baseline[0]:.3f}); best overall **{best[1]}** (ratio {best[0]:.3f}), closing "
                           f"{closed:.0%} of the baseline's gap to the original.")
        lines += [""] + summary + [""]
    lines[2:2] = ["Perplexity ratio (merged / original) at a glance:", ""] + pivot(lines) + [""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
