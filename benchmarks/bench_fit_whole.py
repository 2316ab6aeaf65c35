"""``merge: fit`` variants at deeper cuts: perplexity ratio and KL on held-out text, with wall times (issue 16).

    python benchmarks/bench_fit_whole.py                          # both bundled models, 50 / 62.5 / 75 % removed
    python benchmarks/bench_fit_whole.py --rows "mapped, fit expert" --ratios 0.625 --json out.json

Every row merges a fresh copy of the model in memory (``merge_model``, cache off, so each row pays its own
calibration and plan-aware passes: the wall time is the whole merge) and is scored on ``bundled:validation``
windows never used for calibration. ``mapped`` rows run router ``keep``, the same function as ``--format mapped``
(one expert per group, slots share it); ``compact`` rows collapse the router (``--format compact``, uniform counts).
Only options every version of ``fit`` takes are used in the ``old`` rows, so the script also runs against an older
checkout (``PYTHONPATH=old/src``) for the down-only baseline.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from moemerge import Recipe
from moemerge.evaluate import eval_texts
from moemerge.evaluate.fidelity import kl_and_agreement, log_probs
from moemerge.families import family_of
from moemerge.loading import LoadedModel, load_model
from moemerge.pipeline import merge_model

GLOBAL = {"dominant": "no", "similarity_base": "expert-output", "cluster": "hierarchical", "linkage": "average",
          "hierarchical_stopping_metric": "distance", "merge": "fit"}  # the `moemerge` preset
UNIFORM = {"dominant": "no", "similarity_base": "expert-output", "cluster": "hierarchical", "linkage": "average",
           "merge": "fit", "router": "collapse"}  # hc-smoe + fit, compact
ROWS: dict[str, dict] = {
    "mapped, fit (current tree defaults)": {**GLOBAL},
    "mapped, fit down, fixed damping": {**GLOBAL, "fit_scope": "down", "fit_held_out": 0.0},
    "mapped, fit down, held-out damping": {**GLOBAL, "fit_scope": "down"},
    "mapped, fit expert": {**GLOBAL, "fit_scope": "expert"},
    "compact, fit (current tree defaults)": {**UNIFORM},
    "compact, fit down, fixed damping": {**UNIFORM, "fit_scope": "down", "fit_held_out": 0.0},
    "compact, fit expert": {**UNIFORM, "fit_scope": "expert"},
    "compact, fit (current tree defaults) + router_fit": {**UNIFORM, "router_fit": True},
    "compact, fit expert + router_fit": {**UNIFORM, "fit_scope": "expert", "router_fit": True},
}


def main() -> None:
    from moemerge.zoo import MODELS, model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help="model folders (default: the bundled tiny models)")
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.5, 0.625, 0.75], help="share of experts removed")
    ap.add_argument("--rows", nargs="*", default=list(ROWS), help="subset of: " + "; ".join(ROWS))
    ap.add_argument("--n-sentences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ppl-windows", type=int, default=48)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rows = []
    for path in args.models or [str(model_path(n)) for n in MODELS]:
        loaded = load_model(path, "float32", "cpu")
        spec = family_of(loaded.model.config)
        num_experts, top_k = spec.num_experts(loaded.model.config), spec.top_k(loaded.model.config)
        held = eval_texts(loaded.tokenizer, ["bundled:validation"], args.seq_len, args.ppl_windows)[0].windows
        ref = log_probs(loaded.model, held)
        nll0 = -ref.gather(-1, held[:, 1:, None]).mean().item()
        for ratio in args.ratios:
            groups = max(top_k, num_experts - round(num_experts * ratio))
            for name in args.rows:
                opts = ROWS[name]
                recipe = Recipe.build(opts, model_path=path, calibration="bundled", n_sentences=args.n_sentences,
                                      seq_len=args.seq_len, num_average_groups=groups, dtype="float32",
                                      device="cpu", cache=False)
                model = copy.deepcopy(loaded.model)
                t0 = time.perf_counter()
                out = merge_model(LoadedModel(model, loaded.tokenizer, loaded.source, loaded.local_dir,
                                              loaded.fingerprint), recipe, progress=False)
                elapsed = time.perf_counter() - t0
                lp = log_probs(model, held)
                nll = -lp.gather(-1, held[:, 1:, None]).mean().item()
                kl, top1 = kl_and_agreement(ref, lp)
                counts = list(out.plan.counts().values())
                row = {"model": Path(path).name, "removed": ratio, "row": name, "ppl_ratio": float(torch.tensor(
                       nll - nll0).exp()), "kl": kl, "top1": top1, "counts": counts, "seconds": elapsed,
                       "fit": getattr(out, "layer_info", None)}
                rows.append(row)
                print(f"| {row['model']} | {ratio:.1%} | {name} | {row['ppl_ratio']:.3f} | {kl:.3f} | {top1:.3f} | "
                      f"{'/'.join(map(str, counts))} | {elapsed:.1f} |", flush=True)
                del model
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
