"""Time the Sub-MoE merge: the literal union SVD (eqs. 5–8, ``torch.linalg.svd`` of ``[W_1 … W_n]``) against the
fast path of :mod:`moemerge.merge.subspace` (the weighted average at full rank; one ``O × O`` eigendecomposition when
truncated), on expert-sized random matrices, and report the relative difference between them.

    python benchmarks/bench_subspace.py            # bundled-model shapes + Qwen1.5-MoE shapes
    python benchmarks/bench_subspace.py --quick    # skip the Qwen1.5-MoE shapes

Shapes are ``nn.Linear`` weights ``[O, I]``: gate/up ``[I_ff, H]`` and down ``[H, I_ff]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from moemerge.merge import frequency_weights
from moemerge.merge.subspace import subspace_merge_matrix, truncation_rank, union_svd_merge_matrix

SHAPES = {
    # name: (I_ff, H)
    "tiny-mixtral (I=256, H=128)": (256, 128),
    "tiny-qwen-moe (I=128, H=128)": (128, 128),
    "Qwen1.5-MoE-A2.7B (I=1408, H=2048)": (1408, 2048),
}


def _time(fn, repeat: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()[0]
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench(out_f: int, in_f: int, n: int, rank_ratio: float | None, repeat: int) -> tuple[float, float, float]:
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, out_f, in_f, generator=g) / in_f ** 0.5
    alpha = frequency_weights(torch.rand(n, generator=g) + 0.05).float()
    rank = truncation_rank(rank_ratio, out_f, in_f)
    t_svd, ref = _time(lambda: union_svd_merge_matrix(w, alpha, rank, compute_dtype=torch.float32), repeat)
    t_fast, fast = _time(lambda: subspace_merge_matrix(w, alpha, rank), repeat)
    err = float((fast.double() - ref.double()).norm() / ref.double().norm())
    return t_svd, t_fast, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="bundled-model shapes only")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, fp32 weights "
          f"(union SVD in fp32; fast path: fp32 average, fp64 Gram + eigh when truncated)")
    print(f"{'shapes':38s} {'matrix':6s} {'n':>2s} {'rank':>9s} {'svd s':>8s} {'fast s':>8s} {'speed-up':>8s} "
          f"{'rel err':>9s}")
    for name, (inter, hidden) in SHAPES.items():
        big = inter > 1000
        if big and args.quick:
            continue
        sizes = (2, 4, 8) if big else (2, 4)
        ratios = (0.5,) if big else (None, 0.5, 0.25)
        for n in sizes:
            for matrix, (o, i) in (("gate", (inter, hidden)), ("down", (hidden, inter))):
                if big and matrix == "down" and n == 8:
                    continue  # a 2048 × 11264 SVD: several minutes on 2 cores, adds nothing new
                for ratio in ratios:
                    t_svd, t_fast, err = bench(o, i, n, ratio, 1 if big else 3)
                    r = "full" if ratio is None else f"{truncation_rank(ratio, o, i)}"
                    print(f"{name:38s} {matrix:6s} {n:2d} {r:>9s} {t_svd:8.3f} {t_fast:8.3f} "
                          f"{t_svd / t_fast:7.0f}× {err:9.1e}", flush=True)


if __name__ == "__main__":
    main()
