"""Time of ``merge: fit`` and ``sequential: true`` against a plain HC-SMoE merge on the same model (CPU).

    python benchmarks/bench_fit.py                       # bundled tiny-mixtral
    python benchmarks/bench_fit.py --model PATH --n-sentences 16 --seq-len 256

Each variant merges a fresh copy of the model with the statistics cache off, so every row pays its calibration.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from moemerge import Recipe
from moemerge.loading import LoadedModel, load_model
from moemerge.pipeline import merge_model

VARIANTS = {"hc-smoe (freq)": {}, "hc-smoe + fit": {"merge": "fit"}, "hc-smoe + sequential": {"sequential": True},
            "hc-smoe + fit + sequential": {"merge": "fit", "sequential": True}}


def main() -> None:
    from moemerge.zoo import model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--n-sentences", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--groups", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = args.model or (str(model_path()) if (model_path() / "config.json").exists() else None)
    if path is None:
        raise SystemExit("no bundled model yet (src/moemerge/zoo/models); pass --model PATH")
    loaded = load_model(path, "float32", "cpu")
    print(f"model {path}, {args.n_sentences} windows × {args.seq_len} tokens, {args.groups} groups per layer")
    base_time = None
    for name, opts in VARIANTS.items():
        recipe = Recipe.build(dict(calibration="bundled", n_sentences=args.n_sentences, seq_len=args.seq_len,
                                   num_average_groups=args.groups, cache=False), **opts)
        model = copy.deepcopy(loaded.model)
        t0 = time.perf_counter()
        result = merge_model(LoadedModel(model, loaded.tokenizer, loaded.source, loaded.local_dir,
                                         loaded.fingerprint), recipe, progress=False)
        elapsed = time.perf_counter() - t0
        base_time = base_time or elapsed
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
        print(f"{name:28s} {elapsed:7.2f} s  ({elapsed / base_time:.2f}× plain)  [{parts}]")


if __name__ == "__main__":
    main()
