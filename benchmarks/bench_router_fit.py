"""Time and peak memory of ``router_fit`` at a real model's shapes, against the same merge without it.

    python benchmarks/bench_router_fit.py                                  # Qwen1.5-MoE-A2.7B shapes, 2 layers
    python benchmarks/bench_router_fit.py --preset mixtral-8x7b --layers 1 --groups 4

A random-weight checkpoint with the preset's shapes and ``--layers`` decoder layers is written by
``make_checkpoint.py`` (bf16), then merged three times by ``python -m moemerge.cli merge``, each in a child process of
its own whose peak resident memory is read from ``os.wait4``: compact without refit, ``--router-fit
--router-fit-rounds 0`` (the router only), ``--router-fit`` (router and experts, default rounds) and
``--router-fit --block-fit-steps S`` (then ``S`` Adam steps on the whole block; a few are enough to time one). The
merge is ``--merge freq`` so that the rows differ only by the refit. Printed: wall time, peak RSS, and each row's ratio
to the first; then the block fit's measured seconds per step and layer (its row minus the one before it) beside
:func:`~moemerge.save.router_refit.block_fit_seconds`' estimate, which ``recommend`` uses to leave slow block fits
out. Random weights say nothing about quality; this measures cost only.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_stream_memory import run_measured  # noqa: E402

ROWS = {
    "compact, no refit": [],
    "router refit only (rounds 0)": ["--router-fit", "--router-fit-rounds", "0"],
    "router + expert refit (default rounds)": ["--router-fit"],
}


def estimate_step(ckpt: Path, args) -> float:
    """``block_fit_seconds`` for one step of one layer of ``ckpt`` with this run's calibration tokens."""
    from moemerge.execute.source import ShardSource
    from moemerge.loading import open_checkpoint
    from moemerge.save.router_refit import MAX_TOKENS, block_fit_seconds

    opened = open_checkpoint(str(ckpt))
    source = ShardSource(opened.folder, dtype=None, device="cpu", config=opened.config)
    try:
        views = source.moe_views()[:1]
        tokens = min(MAX_TOKENS, args.n_sentences * args.seq_len)
        return block_fit_seconds(1, views, source.family.top_k(source.config), "cpu", tokens=tokens)
    finally:
        source.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen1.5-moe-a2.7b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--groups", type=int, default=30, help="experts left per layer (--num-average-groups)")
    ap.add_argument("--n-sentences", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--block-steps", type=int, default=3, help="Adam steps of the block-fit row (0: no such row)")
    ap.add_argument("--workdir", default=None, help="keep the checkpoint and outputs here (default: a temp folder)")
    args = ap.parse_args()
    rows = dict(ROWS)
    if args.block_steps:
        rows[f"+ block fit ({args.block_steps} steps)"] = ["--router-fit", "--block-fit-steps", str(args.block_steps)]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="moemerge-bench-rfit-"))
    ckpt = work / "ckpt"
    if not ckpt.exists():
        subprocess.run([sys.executable, str(HERE / "make_checkpoint.py"), str(ckpt), "--preset", args.preset,
                        "--layers", str(args.layers)], check=True)
    common = ["--num-average-groups", str(args.groups), "--format", "compact", "--merge", "freq", "--calibration",
              "bundled", "--n-sentences", str(args.n_sentences), "--seq-len", str(args.seq_len), "--ppl", "none",
              "--dtype", "bfloat16", "--no-report", "-q", "--overwrite"]
    print(f"{args.preset}, {args.layers} layers, {args.groups} experts left, {args.n_sentences} x {args.seq_len} "
          "calibration tokens")
    print("| row | seconds | peak RSS (GiB) | time × | memory × |")
    print("|---|---|---|---|---|")
    base = None
    seconds = {}
    for name, extra in rows.items():
        out = work / "out"
        m = run_measured([sys.executable, "-m", "moemerge.cli", "merge", str(ckpt), "-o", str(out), *common, *extra])
        if m.returncode != 0:
            print(f"| {name} | failed: {m.stderr.strip().splitlines()[-1] if m.stderr.strip() else m.returncode} "
                  "| | | |")
            continue
        base = base or m
        seconds[name] = m.seconds
        print(f"| {name} | {m.seconds:.1f} | {m.peak_rss_bytes / 2**30:.2f} | {m.seconds / base.seconds:.2f} | "
              f"{m.peak_rss_bytes / base.peak_rss_bytes:.2f} |", flush=True)
    block = [n for n in seconds if n.startswith("+ block fit")]
    if block and "router + expert refit (default rounds)" in seconds:
        per_step = (seconds[block[0]] - seconds["router + expert refit (default rounds)"]) / args.block_steps
        print(f"block fit: {per_step / args.layers:.1f} s per step and layer measured, "
              f"{estimate_step(ckpt, args):.1f} s estimated (block_fit_seconds)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
