"""One process against two (``torchrun --nproc-per-node 2``, gloo on CPU) on the same merge job: wall time, the
calibration stage's time, and the bytes each rank all-reduces per decoder layer.

    python benchmarks/bench_distributed.py [--model tiny-qwen-moe] [--n-sentences 32] [--seq-len 256]

On this 2-core machine two ranks share the same two cores (torchrun gives each one thread), so the figure to read
is the overhead of the collectives, not a speed-up; on a machine with a GPU (or a core set) per rank the calibration
stage divides by the number of ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def merge(ranks: int, model: str, out: Path, args: argparse.Namespace) -> tuple[float, dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)] if ranks > 1 \
        else [sys.executable]
    cmd = [*launcher, "-m", "moemerge", "merge", model, "-o", str(out), "--num-average-groups", str(args.groups),
           "--calibration", "bundled", "--n-sentences", str(args.n_sentences), "--seq-len", str(args.seq_len),
           "--ppl", "none", "--no-cache", "-q", "--dtype", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // ranks or 1)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    return seconds, json.loads((out / "eval.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-qwen-moe")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--n-sentences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_distributed."))
    rows = []
    for ranks in (1, 2):
        seconds, result = merge(ranks, args.model, work / f"out-{ranks}", args)
        info = json.loads((work / f"out-{ranks}" / "merge_info.json").read_text())["calibration"]
        rows.append((ranks, seconds, result["timings_s"].get("calibrate", 0.0),
                     info.get("all_reduce_bytes_per_layer", 0)))
    tokens = args.n_sentences * args.seq_len
    print(f"{args.model}: {tokens} calibration tokens ({args.n_sentences} x {args.seq_len}), HC-SMoE statistics")
    print(f"{'ranks':>5} {'wall s':>8} {'calibrate s':>12} {'ratio':>6} {'all-reduce bytes/layer/rank':>28}")
    for ranks, seconds, calib, traffic in rows:
        print(f"{ranks:>5} {seconds:>8.1f} {calib:>12.1f} {calib / rows[0][2]:>6.2f} {traffic:>28,}")


if __name__ == "__main__":
    main()
