"""Observer throughput: tokens/s of a calibration pass (the executor's statistics walk over the model in memory)
against a plain forward pass over the same tokens.

Run: ``python benchmarks/bench_observer.py [--model tiny-mixtral|tiny-qwen-moe|PATH] [--windows 16] [--seq-len 256]``

Prints, per statistic set, tokens/s, seconds, peak RSS growth and the ratio to the plain forward pass measured in
the same run (best of ``--repeat`` runs each, to damp the noise of a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import model_and_windows, peak_rss_bytes

from moemerge.calibrate import CalibrationSettings
from moemerge.families import moe_layers
from moemerge.pipeline import calibrate

STAT_SETS = {
    "frequency": ["frequency"],
    "hc-smoe (frequency + expert outputs)": ["frequency", "expert_output_mean"],
    "all cheap (freq, logits, outputs, cosine, norms)": ["frequency", "router_logits", "expert_output_mean",
                                                         "expert_output_cosine", "routed_output_norm"],
}


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-mixtral")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    loaded, wins = model_and_windows(args.model, args.windows, args.seq_len)
    model = loaded.model
    tokens = wins.numel()
    layers = moe_layers(model)

    @torch.no_grad()
    def plain() -> None:
        for s in range(0, len(wins), args.batch_size):
            model(input_ids=wins[s:s + args.batch_size], use_cache=False)

    plain()  # warm-up
    base = best_of(plain, args.repeat)
    rss0 = peak_rss_bytes()
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{len(layers)} MoE layers, {tokens} tokens ({len(wins)} × {args.seq_len}), batch {args.batch_size}")
    print(f"{'pass':<52} {'seconds':>8} {'tokens/s':>10} {'speed':>7} {'peak RSS +MB':>13}")
    print(f"{'plain forward':<52} {base:8.3f} {tokens / base:10.0f} {1.0:7.2f} {0:13.0f}")
    settings = CalibrationSettings("bundled:validation", args.windows, args.seq_len, args.batch_size, 0,
                                   use_cache=False)
    for label, names in STAT_SETS.items():
        t = best_of(lambda names=names: calibrate(loaded, settings, names, progress=False), args.repeat)
        rss = (peak_rss_bytes() - rss0) / 2**20
        print(f"{label:<52} {t:8.3f} {tokens / t:10.0f} {base / t:7.2f} {rss:13.0f}")


if __name__ == "__main__":
    main()
