"""Self-calibration cost: seconds to sample calibration windows from the model (``self_calibration``) against one
plain forward pass over the same number of tokens (what a calibration pass costs), and against the estimate that
``moemerge merge`` warns with.

Run: ``python benchmarks/bench_self_calibration.py [--model tiny-mixtral|tiny-qwen-moe|PATH] [--windows 16]
[--seq-len 256] [--batch-size 8] [--chains 16]``

Prints tokens/s, seconds and peak RSS growth of each, their ratio, and ``sampling_seconds``' estimate. Sampling is
autoregressive: one decoding step of the whole model per token position (with the KV cache), so it costs far more
than a forward pass over the same tokens, and more still where the weights do not fit in cache.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from common import model_and_windows, peak_rss_bytes

from moemerge import Recipe
from moemerge.calibrate.self_text import CHAINS, sample_windows, start_token
from moemerge.execute.source import ModelSource
from moemerge.pipeline import self_calibration_time


def rss_gib() -> float:
    return peak_rss_bytes() / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-mixtral")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8, help="batch of the plain forward pass")
    ap.add_argument("--chains", type=int, default=CHAINS, help="chains sampled in parallel (one generate batch)")
    args = ap.parse_args()
    loaded, wins = model_and_windows(args.model, args.windows, args.seq_len)
    model = loaded.model
    tokens = wins.numel()

    rss0 = rss_gib()
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(wins), args.batch_size):
            model(input_ids=wins[s:s + args.batch_size])
    plain = time.perf_counter() - t0
    rss_plain = rss_gib() - rss0

    t0 = time.perf_counter()
    sampled = sample_windows(model, start_token(loaded.tokenizer), args.windows, args.seq_len, seed=0,
                             chains=args.chains)
    sample = time.perf_counter() - t0
    rss_sample = rss_gib() - rss0

    # the estimate `moemerge merge` warns with, for these windows (all sampled) on this model
    recipe = Recipe(n_sentences=args.windows, self_calibration=1.0, seq_len=args.seq_len, device="cpu")
    estimate = self_calibration_time(recipe, ModelSource(model)) if args.chains == CHAINS else math.nan

    print(f"{args.model}: {args.windows} windows x {args.seq_len} tokens ({tokens} tokens), "
          f"batch {args.batch_size}, {args.chains} chains")
    print(f"{'':28s} {'tokens/s':>10s} {'seconds':>9s} {'peak RSS +GiB':>14s} {'x forward':>10s}")
    print(f"{'plain forward pass':28s} {tokens / plain:10.0f} {plain:9.2f} {rss_plain:14.3f} {1.0:10.2f}")
    print(f"{'sampling (temperature 1)':28s} {tokens / sample:10.0f} {sample:9.2f} {rss_sample:14.3f} "
          f"{sample / plain:10.2f}")
    print(f"estimate (sampling_seconds): {estimate:.2f} s ({estimate / sample:.2f} x measured); "
          f"windows {tuple(sampled.shape)}")


if __name__ == "__main__":
    main()
