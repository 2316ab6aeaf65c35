"""Peak memory of ``moemerge merge`` against model depth: does it stay flat when the model gets deeper?

    python benchmarks/bench_stream_memory.py                          # depths 8, 16, 32 of the deep-small preset
    python benchmarks/bench_stream_memory.py --depths 4,8 --dry-run   # commands and bounds only
    python benchmarks/bench_stream_memory.py --merge-args "--num-average-groups 4 --router keep --n-sentences 16 \
--seq-len 128 --dtype float32 --ppl none -q"

For each depth, a random-weight ``deep-small`` checkpoint (same width, ``depth`` decoder layers; written one layer at
a time by ``make_checkpoint.py``) is merged by ``python -m moemerge.cli merge CKPT -o OUT MERGE_ARGS`` in a child
process of its own, whose peak resident memory is read from ``os.wait4`` (the child and anything it waited for).

The table compares each peak with the bound of a layer-by-layer executor::

    2 x (largest decoder layer + embeddings + LM head, in the compute dtype)
      + calibration hidden states (n_sentences x seq_len x hidden x 4 bytes)

(the compute dtype is ``--dtype`` of the merge arguments, or the checkpoint's for ``auto``), and gives the ratio of the
peak at the largest depth to the one at the smallest: about 1.0 when memory does not grow with depth. The resident
memory of a bare ``python -c "import moemerge.pipeline"`` (torch, transformers, moemerge) is measured the same way
and printed beside; ``(peak - base) / bound`` is the ratio net of it.

The checkpoints, outputs and the calibration cache ($MOEMERGE_CACHE) live in a temporary folder removed at the end
(``--workdir`` and ``--keep`` to keep them). Exits 1 if a merge fails, after printing its stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moemerge.recipe import default_window_count

from make_checkpoint import DTYPES, CheckpointPlan, plan_checkpoint, preset_config, write_checkpoint

PRESET = "deep-small"
DEFAULT_MERGE_ARGS = ("--num-average-groups 8 --router collapse --calibration bundled --n-sentences 8 --seq-len 128 "
                      "--train-batch-size 4 --dtype float32 --ppl none -q")
BASELINE_CODE = "import moemerge.pipeline"
GB = 1e9
GIB = 2**30
ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class Measured:
    """One child process: exit code, wall time, peak resident memory and its output."""

    returncode: int
    seconds: float
    peak_rss_bytes: int
    stdout: str
    stderr: str
    timed_out: bool = False


@dataclass
class MergeSettings:
    """What the memory bound needs from the merge arguments."""

    n_sentences: int
    seq_len: int
    dtype: str  # compute dtype name (float32, bfloat16, float16)


@dataclass
class Row:
    """One depth of the table."""

    depth: int
    parameters: int
    checkpoint_bytes: int
    bound_bytes: int
    peak_rss_bytes: int | None = None
    seconds: float | None = None
    write_seconds: float | None = None


def run_measured(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float | None = None,
                 cwd: str | Path | None = None) -> Measured:
    """Run ``cmd`` to completion and return its exit code, wall time and peak RSS.

    The child is reaped with ``os.wait4``, whose ``ru_maxrss`` is that child's own peak (and that of any process it
    waited for), unaffected by other children of this process. Output goes to temporary files, so a chatty child
    cannot block on a full pipe. On timeout the child's process group is killed.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True)
        expired = threading.Event()

        def kill() -> None:
            expired.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if timer:
                timer.cancel()
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        out.seek(0)
        err.seek(0)
        return Measured(returncode=proc.returncode, seconds=seconds, peak_rss_bytes=usage.ru_maxrss * 1024,
                        stdout=out.read().decode(errors="replace"), stderr=err.read().decode(errors="replace"),
                        timed_out=expired.is_set())


def merge_settings(merge_args: list[str], max_positions: int, checkpoint_dtype: str) -> MergeSettings:
    """n_sentences, seq_len and compute dtype as the merge will use them: from the arguments where given, else the
    recipe's defaults (seq_len: min(2048, the model's max positions); dtype auto: the checkpoint's)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--n-sentences", "--n_sentences", dest="n_sentences", type=int, default=None)
    parser.add_argument("--seq-len", "--seq_len", dest="seq_len", type=int, default=None)
    parser.add_argument("--dtype", default="auto")
    known, _ = parser.parse_known_args(merge_args)
    seq_len = known.seq_len if known.seq_len is not None else min(2048, max_positions)
    n_sentences = known.n_sentences if known.n_sentences is not None else default_window_count(seq_len)
    dtype = checkpoint_dtype if known.dtype == "auto" else known.dtype
    if dtype not in ELEMENT_BYTES:
        raise ValueError(f"unknown --dtype {dtype!r} in the merge arguments")
    return MergeSettings(n_sentences=int(n_sentences), seq_len=int(seq_len), dtype=dtype)


def memory_bound(plan: CheckpointPlan, settings: MergeSettings) -> int:
    """Bytes a layer-by-layer executor may need: twice (largest decoder layer + embeddings/norm/LM head) in the
    compute dtype, plus the calibration hidden states in float32."""
    weights = (plan.max_layer_parameters + plan.non_layer_parameters) * ELEMENT_BYTES[settings.dtype]
    hidden = settings.n_sentences * settings.seq_len * int(plan.config["hidden_size"]) * 4
    return 2 * weights + hidden


def merge_command(checkpoint: Path, output: Path, merge_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "moemerge.cli", "merge", str(checkpoint), "-o", str(output), *merge_args]


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(rows: list[Row], baseline: int | None, settings: MergeSettings) -> None:
    """The per-depth table, the growth ratio and the baseline."""
    print(f"\nmemory vs depth ({PRESET}; compute dtype {settings.dtype}, calibration {settings.n_sentences} x "
          f"{settings.seq_len} tokens; GB = 1e9 bytes)")
    header = (f"{'depth':>5} {'params':>12} {'ckpt GB':>8} {'peak RSS GB':>11} {'seconds':>8} {'bound GB':>9} "
              f"{'peak/bound':>10} {'(peak-base)/bound':>17}")
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = r.peak_rss_bytes / r.bound_bytes if r.peak_rss_bytes else None
        net = (r.peak_rss_bytes - baseline) / r.bound_bytes if r.peak_rss_bytes and baseline else None
        print(f"{r.depth:>5} {r.parameters:>12,} {r.checkpoint_bytes / GB:>8.3f} "
              f"{_fmt(r.peak_rss_bytes / GB if r.peak_rss_bytes else None, '.3f'):>11} {_fmt(r.seconds, '.1f'):>8} "
              f"{r.bound_bytes / GB:>9.3f} {_fmt(ratio, '.2f'):>10} {_fmt(net, '.2f'):>17}")
    print(f"baseline RSS of python -c {BASELINE_CODE!r}: {_fmt(baseline / GB if baseline else None, '.3f')} GB")
    measured = [r for r in rows if r.peak_rss_bytes]
    if len(measured) >= 2:
        small, large = measured[0], measured[-1]
        print(f"peak RSS at depth {large.depth} / depth {small.depth}: "
              f"{large.peak_rss_bytes / small.peak_rss_bytes:.3f} (1.0 = flat in depth; parameters grew "
              f"x{large.parameters / small.parameters:.2f})")


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="8,16,32", help="Comma-separated decoder-layer counts.")
    parser.add_argument("--merge-args", default=DEFAULT_MERGE_ARGS,
                        help=f"Arguments after 'merge CKPT -o OUT' (default: {DEFAULT_MERGE_ARGS!r}).")
    parser.add_argument("--checkpoint-dtype", choices=list(DTYPES), default="bfloat16",
                        help="dtype of the generated checkpoints.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="Seconds allowed per merge.")
    parser.add_argument("--workdir", default=None, help="Folder for checkpoints and outputs (default: a temp folder).")
    parser.add_argument("--keep", action="store_true", help="Keep checkpoints and outputs.")
    parser.add_argument("--json", dest="json_path", default=None, help="Also write the results as JSON.")
    parser.add_argument("--dry-run", action="store_true", help="Print the commands and bounds; write and run nothing.")
    args = parser.parse_args(argv)

    try:
        depths = [int(d) for d in args.depths.split(",") if d.strip()]
    except ValueError:
        parser.error(f"--depths must be comma-separated integers, got {args.depths!r}")
    if not depths or min(depths) < 1:
        parser.error("--depths needs at least one positive depth")
    merge_args = shlex.split(args.merge_args)
    if any(a in ("-o", "--output", "--output-path", "--output_path") for a in merge_args):
        parser.error("--merge-args must not set the output; the benchmark gives each depth its own")

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_stream_memory."))
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MOEMERGE_CACHE=str(workdir / "cache"))  # no calibration statistics from earlier runs
    rows: list[Row] = []
    settings: MergeSettings | None = None
    baseline: int | None = None
    failed = False
    try:
        if not args.dry_run:
            base = run_measured([sys.executable, "-c", BASELINE_CODE], env=env, timeout=600)
            if base.returncode == 0:
                baseline = base.peak_rss_bytes
            else:
                print(f"warning: baseline {BASELINE_CODE!r} failed (exit {base.returncode}):\n{_tail(base.stderr)}",
                      file=sys.stderr)
        for depth in depths:
            config = preset_config(PRESET, depth, args.checkpoint_dtype)
            plan = plan_checkpoint(config)
            settings = merge_settings(merge_args, int(config["max_position_embeddings"]), args.checkpoint_dtype)
            row = Row(depth=depth, parameters=plan.num_parameters,
                      checkpoint_bytes=plan.num_parameters * ELEMENT_BYTES[args.checkpoint_dtype],
                      bound_bytes=memory_bound(plan, settings))
            rows.append(row)
            checkpoint, output = workdir / f"{PRESET}-{depth}", workdir / f"{PRESET}-{depth}-merged"
            cmd = merge_command(checkpoint, output, merge_args)
            print(f"depth {depth}: {plan.num_parameters:,} parameters, bound {row.bound_bytes / GB:.3f} GB")
            print(f"  $ {shlex.join(cmd)}")
            if args.dry_run:
                continue
            stats = write_checkpoint(checkpoint, config, seed=args.seed, overwrite=True, plan=plan, log=None)
            row.checkpoint_bytes, row.write_seconds = stats.total_bytes, stats.seconds
            if output.exists():
                shutil.rmtree(output)
            result = run_measured(cmd, env=env, timeout=args.timeout)
            if result.returncode != 0:
                reason = "timed out" if result.timed_out else f"exit {result.returncode}"
                print(f"error: merge at depth {depth} failed ({reason}, {result.seconds:.1f} s, peak RSS "
                      f"{result.peak_rss_bytes / GB:.3f} GB); stderr:\n{_tail(result.stderr)}", file=sys.stderr)
                failed = True
                break
            row.peak_rss_bytes, row.seconds = result.peak_rss_bytes, result.seconds
            print(f"  merged in {result.seconds:.1f} s, peak RSS {result.peak_rss_bytes / GB:.3f} GB "
                  f"(checkpoint written in {stats.seconds:.1f} s)")
            if not args.keep:
                shutil.rmtree(checkpoint, ignore_errors=True)
                shutil.rmtree(output, ignore_errors=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if settings is not None:
        print_table(rows, baseline, settings)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(
            {"preset": PRESET, "merge_args": merge_args, "settings": asdict(settings) if settings else None,
             "baseline_rss_bytes": baseline, "rows": [asdict(r) for r in rows], "failed": failed,
             "dry_run": args.dry_run}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
