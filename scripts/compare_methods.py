"""Compare every merging and pruning method on the bundled tiny models at 25 % and 50 % fewer experts.

All methods share ONE calibration per model (the statistics cache: the first method computes what it needs, later
ones reuse it; zipit / fix-dom-same add their plan-aware pass). Each row: held-out perplexity on
``bundled:validation`` windows, its ratio to the original model, experts left, unique parameters (what a collapsed
checkpoint holds: shared router slots counted once), and merge time (calibration + grouping + merging).

    python scripts/compare_methods.py                       # writes docs/comparison.md
    python scripts/compare_methods.py --models /path/to/moe --ratios 0.5 --n-sentences 8
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from moemerge import Recipe
from moemerge.evaluate import eval_texts, perplexities
from moemerge.families import family_of, moe_layers
from moemerge.loading import load_model
from moemerge.pipeline import merge_model

# name -> recipe options (on top of the Recipe defaults); presets by name where one exists.
METHODS: dict[str, dict | str] = {
    "hc-smoe": "hc-smoe",
    "hc-smoe (single linkage)": {"linkage": "single"},
    "hc-smoe (kmeans)": {"cluster": "kmeans"},
    "m-smoe": "m-smoe",
    "zipit": {"merge": "zipit"},
    "fix-dom-same": {"merge": "fix-dom-same"},
    "weighted 2,1": {"merge": "weighted", "mode": "2,1"},
    "random + freq": {"dominant": "random"},
    "frequency + freq": {"dominant": "frequency"},
    "dynamic_group": {"dynamic_group": True},
    "global threshold": {"hierarchical_stopping_metric": "distance"},
    "frequency-prune": "frequency-prune",
    "output-prune": "output-prune",
    "reap": "reap",
}


def expert_parameters(model) -> int:
    gu, dn = moe_layers(model)[0].expert_weights()
    return gu[0].numel() + dn[0].numel()


def main() -> None:
    from moemerge.zoo import MODELS, model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help="model folders (default: the bundled tiny models)")
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.25, 0.5], help="share of experts removed")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help="subset of: " + ", ".join(METHODS))
    ap.add_argument("--n-sentences", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ppl-windows", type=int, default=32)
    ap.add_argument("--ppl", default="bundled:validation")
    ap.add_argument("--out", default="docs/comparison.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    models = args.models or [str(model_path(n)) for n in MODELS if model_path(n).exists()]
    if not models:
        raise SystemExit("no bundled models found (src/moemerge/zoo/models); pass --models")
    lines = ["# Method comparison", "",
             f"Calibration: bundled corpus, {args.n_sentences} windows × {args.seq_len} tokens (one cached pass per "
             f"model). Perplexity: {args.ppl}, first {args.ppl_windows} windows of {args.seq_len} tokens. "
             "Parameters: unique parameters (a collapsed checkpoint's size; router=keep stores shared slots once "
             "per slot). Time: calibration (or cache read) + grouping + merging, CPU.", ""]
    for path in models:
        loaded = load_model(path, "float32", "cpu")
        spec = family_of(loaded.model.config)
        num_experts = spec.num_experts(loaded.model.config)
        n_layers = len(moe_layers(loaded.model))
        per_expert = expert_parameters(loaded.model)
        total_before = sum(p.numel() for p in loaded.model.parameters())
        texts = eval_texts(loaded.tokenizer, [args.ppl], args.seq_len, args.ppl_windows)
        base = perplexities(loaded.model, texts, 8, progress=False)[args.ppl]
        lines += [f"## {Path(path).name} ({spec.name}, {n_layers} MoE layers × {num_experts} experts, "
                  f"top-{spec.top_k(loaded.model.config)})", "",
                  f"Original: perplexity {base:.3f}, {total_before / 1e6:.2f} M parameters.", "",
                  "| removed | method | experts left | perplexity | ratio | parameters (M) | time (s) |",
                  "|---|---|---|---|---|---|---|"]
        for ratio in args.ratios:
            groups = num_experts - round(num_experts * ratio)
            for name in args.methods:
                options = METHODS[name]
                common = dict(calibration="bundled", n_sentences=args.n_sentences, seq_len=args.seq_len,
                              num_average_groups=groups, dtype="float32", device="cpu")
                try:
                    recipe = (Recipe.load(options, **common) if isinstance(options, str)
                              else Recipe.build(options, **common))
                    fresh = load_model(path, "float32", "cpu")
                    t0 = time.perf_counter()
                    result = merge_model(fresh, recipe, progress=False)
                    elapsed = time.perf_counter() - t0
                    ppl = perplexities(fresh.model, texts, 8, progress=False)[args.ppl]
                    kept = sum(result.plan.counts().values())
                    params = total_before - (num_experts * n_layers - kept) * per_expert
                    lines.append(f"| {ratio:.0%} | {name} | {kept} | {ppl:.3f} | {ppl / base:.3f} | "
                                 f"{params / 1e6:.2f} | {elapsed:.1f} |")
                except Exception as exc:  # one failing method must not hide the others' numbers
                    lines.append(f"| {ratio:.0%} | {name} | – | failed: {str(exc).splitlines()[0][:80]} | | | |")
                print(lines[-1], flush=True)
        lines.append("")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
