"""Quality beyond the papers (issue 8): the baselines against ``fit``, ``sequential`` and ``router_fit`` on the
bundled tiny models at 25 % and 50 % fewer experts.

Each row: held-out perplexity ratio (merged / original) and KL(original ‖ merged) from ONE pass over held-out
``bundled:validation`` windows (``moemerge.recommend.score``), unique parameters (a collapsed checkpoint's size,
``compare_methods.expert_parameters``), and merge time (calibration or cache read + grouping + merging, CPU). All
rows of a model share one cached calibration. The last lines give, per model and ratio, how much of the gap the best
of hc-smoe / frequency-prune / reap leaves (ratio − 1) the best recipe closes.

    python scripts/compare_quality.py                    # writes docs/quality_table.md
    python scripts/compare_quality.py --models /path/to/moe --ratios 0.5
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import math
import time
from pathlib import Path

import torch

from moemerge import Recipe
from moemerge.evaluate import eval_texts
from moemerge.families import family_of, moe_layers
from moemerge.loading import LoadedModel, load_model
from moemerge.pipeline import merge_model
from moemerge.recommend import CANDIDATES, available_candidates, candidate_recipe, score

ROWS = {**CANDIDATES,
        "hc-smoe+sequential": {"preset": "hc-smoe", "sequential": True},
        "hc-smoe+collapse": {"preset": "hc-smoe", "router": "collapse"},
        "hc-smoe+fit+collapse": {"preset": "hc-smoe", "merge": "fit", "router": "collapse"},
        "frequency-prune+router-fit": {"preset": "frequency-prune", "router_fit": True}}
BASELINES = ("hc-smoe", "frequency-prune", "reap")


def _compare_methods():
    spec = importlib.util.spec_from_file_location("compare_methods", Path(__file__).with_name("compare_methods.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unique_parameters(model, total_before: int, num_experts: int, plan) -> int:
    per_expert = _compare_methods().expert_parameters(model)
    kept = sum(plan.counts().values())
    return total_before - (num_experts * len(plan.counts()) - kept) * per_expert


def main() -> None:
    from moemerge.zoo import MODELS, model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help="model folders (default: the bundled tiny models)")
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.25, 0.5])
    ap.add_argument("--rows", nargs="*", default=list(ROWS), help="subset of: " + ", ".join(ROWS))
    ap.add_argument("--n-sentences", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ppl-windows", type=int, default=32)
    ap.add_argument("--ppl", default="bundled:validation")
    ap.add_argument("--calibration", default="bundled")
    ap.add_argument("--out", default="docs/quality_table.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    CANDIDATES.update(ROWS)  # so available_candidates checks every row's methods
    rows = available_candidates([r for r in args.rows if r in ROWS])

    models = args.models or [str(model_path(n)) for n in MODELS if model_path(n).exists()]
    if not models:
        raise SystemExit("no bundled models found (src/moemerge/zoo/models); pass --models")
    lines = ["# Quality comparison (issue 8)", "",
             f"Calibration: {args.calibration}, {args.n_sentences} windows × {args.seq_len} tokens (one cached pass "
             f"per model). Held out: {args.ppl}, first {args.ppl_windows} windows; perplexity ratio and KL from one "
             "pass per recipe. Time: calibration (or cache read) + grouping + merging, CPU.", ""]
    for path in models:
        loaded = load_model(path, "float32", "cpu")
        spec = family_of(loaded.model.config)
        num_experts = spec.num_experts(loaded.model.config)
        top_k = spec.top_k(loaded.model.config)
        total_before = sum(p.numel() for p in loaded.model.parameters())
        held = eval_texts(loaded.tokenizer, [args.ppl], args.seq_len, args.ppl_windows)[0].windows
        ppl0, _, _, ref = score(loaded.model, held, None)
        lines += [f"## {Path(path).name} ({spec.name}, {len(moe_layers(loaded.model))} MoE layers × {num_experts} "
                  f"experts, top-{top_k})", "", f"Original: perplexity {ppl0:.3f}, {total_before / 1e6:.3f} M "
                  "parameters.", "", "| removed | recipe | ppl ratio | KL | top-1 | parameters (M) | time (s) |",
                  "|---|---|---|---|---|---|---|"]
        summary = []
        for ratio in args.ratios:
            groups = max(top_k, num_experts - round(num_experts * ratio))
            base = Recipe.build(model_path=path, calibration=args.calibration, n_sentences=args.n_sentences,
                                seq_len=args.seq_len, num_average_groups=groups, dtype="float32", device="cpu")
            results = {}
            for name, opts in rows.items():
                try:
                    recipe = candidate_recipe(base, opts)
                    model = copy.deepcopy(loaded.model)
                    t0 = time.perf_counter()
                    out = merge_model(LoadedModel(model, loaded.tokenizer, loaded.source, loaded.local_dir,
                                                  loaded.fingerprint), recipe, progress=False)
                    elapsed = time.perf_counter() - t0
                    ppl, kl, top1, _ = score(model, held, ref)
                    results[name] = ppl / ppl0
                    params = unique_parameters(model, total_before, num_experts, out.plan)
                    lines.append(f"| {ratio:.0%} | {name} | {ppl / ppl0:.4f} | {kl:.4f} | {top1:.3f} | "
                                 f"{params / 1e6:.3f} | {elapsed:.1f} |")
                    del model
                except Exception as exc:  # one failing row must not hide the others
                    lines.append(f"| {ratio:.0%} | {name} | failed: {str(exc).splitlines()[0][:80]} | | | | |")
                print(lines[-1], flush=True)
            base_best = min((results[b], b) for b in BASELINES if b in results) if results else None
            best = min((v, k) for k, v in results.items()) if results else None
            if base_best and best:
                gap = base_best[0] - 1
                closed = (base_best[0] - best[0]) / gap if gap > 0 else math.nan
                summary.append(f"* {ratio:.0%} removed: best baseline {base_best[1]} {base_best[0]:.4f}; best "
                               f"{best[1]} {best[0]:.4f}; gap closed {closed:.0%}")
        lines += [""] + summary + [""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
