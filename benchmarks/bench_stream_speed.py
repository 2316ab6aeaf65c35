"""Time of ``moemerge merge`` (the layer executor streaming from shards) against the whole-model path of an earlier
moemerge (load everything, merge in place, save, reload to check), on models that fit in memory.

Both commands run the same job in their own process (wall time and peak RSS from ``os.wait4``), alternating, twice
each; the baseline is the package source of a git revision checked out in a temporary worktree (default: the last
commit before the executor), run with ``PYTHONPATH``. Models: the bundled tiny-qwen-moe and a ``deep-small``
checkpoint (8 layers, hidden 512, 16 experts) written by ``make_checkpoint.py``.

    python benchmarks/bench_stream_speed.py [--baseline-ref 9826fcd] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_stream_memory import run_measured  # noqa: E402
from make_checkpoint import preset_config, write_checkpoint  # noqa: E402

JOB = ["--num-average-groups", "8", "--router", "collapse", "--calibration", "bundled", "--n-sentences", "16",
       "--seq-len", "128", "--ppl", "bundled:test", "--ppl-windows", "8", "--no-cache", "-q"]


def worktree(ref: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(where), ref], check=True)
    return where / "src"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-ref", default="9826fcd", help="git revision of the whole-model baseline")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_stream_speed."))
    base_src = worktree(args.baseline_ref, work / "baseline")
    deep = work / "deep-small-8"
    write_checkpoint(deep, preset_config("deep-small", layers=8, dtype="float32"))
    models = {"tiny-qwen-moe": str(ROOT / "src/moemerge/zoo/models/tiny-qwen-moe"), "deep-small-8 (fp32)": str(deep)}
    rows = []
    try:
        for label, model in models.items():
            times: dict[str, list[float]] = {"streamed": [], "baseline": []}
            peaks: dict[str, list[int]] = {"streamed": [], "baseline": []}
            for r in range(args.rounds):
                for kind in ("baseline", "streamed"):
                    env = dict(os.environ, MOEMERGE_CACHE=str(work / "cache"))
                    if kind == "baseline":
                        env["PYTHONPATH"] = str(base_src)
                    out = work / f"out-{kind}-{r}"
                    m = run_measured([sys.executable, "-m", "moemerge.cli", "merge", model, "-o", str(out), *JOB],
                                     env=env, cwd=str(work))
                    if m.returncode != 0:
                        print(f"{kind} failed on {label}:\n{m.stderr[-3000:]}")
                        return 1
                    times[kind].append(m.seconds)
                    peaks[kind].append(m.peak_rss_bytes)
                    subprocess.run(["rm", "-rf", str(out)], check=True)
            t_s, t_b = statistics.median(times["streamed"]), statistics.median(times["baseline"])
            rows.append((label, t_b, t_s, t_s / t_b, max(peaks["baseline"]) / 1e9, max(peaks["streamed"]) / 1e9))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "baseline")],
                       check=False)
    print(f"\nmoemerge merge, {' '.join(JOB)}; median of {args.rounds} rounds, 2 CPU threads")
    print(f"{'model':<22}{'whole-model s':>14}{'streamed s':>12}{'ratio':>8}{'whole GB':>10}{'streamed GB':>13}")
    for label, tb, ts, ratio, pb, ps in rows:
        print(f"{label:<22}{tb:>14.1f}{ts:>12.1f}{ratio:>8.2f}{pb:>10.2f}{ps:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
