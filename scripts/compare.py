"""Compare merging and pruning recipes on the bundled tiny models: several budgets, written in the format that
realises their size (mapped and compact), and calibrated on one text domain while scored on the others.

Each row is one streamed walk of the layer executor (``recommend.score_trial``; the checkpoint is never copied), from
one cached calibration per model and calibration text, scored on held-out text that was never used to calibrate
(``bundled:validation``): perplexity ratio merged / original, KL(original ‖ merged) per token, top-1 agreement, the
parameters of the checkpoint that format writes, experts per layer and wall time (statistics come from the cache
after the first row). Every method is shown against frequency pruning and REAP on the same tokens.

    python scripts/compare.py                                       # writes docs/comparison.md
    python scripts/compare.py --models tiny-mixtral --ratios 0.5 --rows hc-smoe reap moemerge --no-domains
    python scripts/compare.py --ratios --n-sentences 256                 # the cross-domain block only

A cross-domain row ``NAME+self=1`` samples every calibration window from the model, so it reads no calibration text:
it is run once per model and scored on every domain in the same walk.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from pathlib import Path

from moemerge import Recipe
from moemerge.evaluate import eval_texts
from moemerge.loading import open_checkpoint
from moemerge.recipe import default_window_count
from moemerge.recommend import CANDIDATES, Trial, candidate_recipe, in_format, score_trial

BASELINES = ("frequency-prune", "reap")
#: the rows of the tables: every recommend candidate (the presets, the fit variants, the stock-router refit)
ROWS = list(CANDIDATES)


def domain_files(split: str, folder: Path) -> dict[str, Path]:
    """The bundled ``split`` cut into one ``.jsonl`` per domain (``bible``, ``python-code``, ``python-docs``)."""
    from moemerge.data import bundled_split

    docs: dict[str, list[str]] = {}
    for line in bundled_split(split).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            docs.setdefault(row["domain"], []).append(line)
    out = {}
    for domain, lines in docs.items():
        out[domain] = folder / f"{split}-{domain}.jsonl"
        out[domain].write_text("\n".join(lines) + "\n")
    return out


def run_rows(model: str, ckpt, rows: list[str], groups: int, fmt: str, calibration: str, held, args,
             self_calibration: float = 0.0, more: dict | None = None) -> list[Trial]:
    base = Recipe.build(model_path=model, calibration=calibration, n_sentences=args.n_sentences,
                        seq_len=args.seq_len, num_average_groups=groups, dtype="float32", device="cpu",
                        self_calibration=self_calibration)
    trials = []
    for name in rows:
        trial = Trial(name, groups, None)
        opts = in_format(CANDIDATES[name], fmt)
        if isinstance(opts, str):
            trial.error = opts
        else:
            try:
                trial.recipe = trial.trial_recipe = candidate_recipe(base, opts)
                score_trial(ckpt, trial, held, more=more)
            except Exception as exc:  # one failing row must not hide the others; the table says why
                trial.error = str(exc).splitlines()[0]
        trials.append(trial)
        print(f"  {name:18s} {trial.format:8s} " + (f"×{trial.ppl_ratio:.3f} KL {trial.kl:.3f} {trial.seconds:.0f}s"
                                                     if trial.error is None else f"-- {trial.error}"), flush=True)
    return trials


def table(trials: list[Trial]) -> list[str]:
    lines = ["| recipe | format | ppl ratio | KL | top-1 | experts/layer | parameters | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for t in sorted(trials, key=lambda t: (t.error is not None, t.ppl_ratio if math.isfinite(t.ppl_ratio)
                                           else math.inf)):
        if t.error is not None:
            lines.append(f"| {t.name} | {t.format or '-'} | not compared: {t.error} | | | | | |")
            continue
        counts = t.counts
        per_layer = str(counts[0]) if len(set(counts)) == 1 else "/".join(map(str, counts))
        lines.append(f"| {t.name} | {t.format} | {t.ppl_ratio:.3f} | {t.kl:.3f} | {t.top1:.3f} | {per_layer} | "
                     f"{t.parameters / t.parameters_before:.3f}× | {t.seconds:.0f} |")
    return lines


def summary(trials: list[Trial]) -> str:
    ok = {t.name: t.ppl_ratio for t in trials if t.error is None and math.isfinite(t.ppl_ratio)}
    base = [(ok[b], b) for b in BASELINES if b in ok]
    if not ok or not base:
        return ""
    (b_ratio, b_name), (best, best_name) = min(base), min((v, k) for k, v in ok.items())
    closed = (b_ratio - best) / (b_ratio - 1) if b_ratio > 1 else math.nan
    return (f"best: **{best_name}** ×{best:.3f}; best of frequency pruning / REAP: {b_name} ×{b_ratio:.3f} "
            f"(loss {best - 1:.3f} against {b_ratio - 1:.3f}: {closed:.0%} of the pruning gap closed)")


def main() -> None:
    from moemerge.zoo import MODELS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), help="model folders or bundled names")
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.5, 0.625, 0.75], help="share of experts removed")
    ap.add_argument("--formats", nargs="*", default=["mapped", "compact"])
    ap.add_argument("--rows", nargs="*", default=ROWS, help="subset of: " + ", ".join(ROWS))
    ap.add_argument("--domain-ratio", type=float, default=0.625, help="share removed in the cross-domain block")
    ap.add_argument("--domain-rows", nargs="*", default=["moemerge", "frequency-prune", "reap", "moemerge+self=1",
                                                          "moemerge+bfit+self=1", "frequency-prune+self=1",
                                                          "reap+self=1"],
                    help="rows of the cross-domain block, each written mapped unless NAME@FORMAT says otherwise; "
                         "NAME+self=S calibrates with self_calibration=S")
    ap.add_argument("--json", default=None, help="also write every trial here (model, block, format, figures)")
    ap.add_argument("--no-domains", action="store_true", help="skip the cross-domain block")
    ap.add_argument("--n-sentences", type=int, default=None,
                    help="calibration windows (default: the recipe's, 65,536 tokens)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ppl-windows", type=int, default=48)
    ap.add_argument("--out", default="docs/comparison.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    n_windows = args.n_sentences or default_window_count(args.seq_len)
    lines = ["# Method comparison", "",
             f"Produced by `python scripts/compare.py` ({', '.join(f'{r:.1%}' for r in args.ratios)} of the experts "
             f"removed; formats {', '.join(args.formats)}). Calibration: the bundled train split, {n_windows} "
             f"windows × {args.seq_len} tokens, one cached pass per model and text. Scored on held-out text never "
             f"used to calibrate (`bundled:validation`, {args.ppl_windows} windows evenly spaced over its three "
             "domains): ppl ratio = merged / "
             "original perplexity, KL = KL(original ‖ merged) in nats per token, top-1 = share of tokens with the same "
             "most likely next token. Each recipe is written in the format named (pruning is compact by "
             "nature); parameters are those of the checkpoint that format writes, as a share of the "
             "original's. Time: the streamed walk on 2 shared CPU cores (the first row of a model also calibrates).",
             ""]
    work = Path(tempfile.mkdtemp(prefix="moemerge-compare-"))
    record: list[dict] = []
    for model in args.models:
        ckpt = open_checkpoint(model)
        cfg = ckpt.config
        from moemerge.families import family_of

        spec = family_of(cfg)
        num_experts, top_k = spec.num_experts(cfg), spec.top_k(cfg)
        held = eval_texts(ckpt.tokenizer, ["bundled:validation"], args.seq_len, args.ppl_windows)[0].windows
        lines += [f"## {Path(model).name} ({spec.name}: {num_experts} experts, top-{top_k})", ""]
        for ratio in args.ratios:
            groups = max(top_k, num_experts - round(num_experts * ratio))
            for fmt in args.formats:
                print(f"[{Path(model).name} −{ratio:.1%} {fmt}]", flush=True)
                trials = run_rows(model, ckpt, args.rows, groups, fmt, "bundled", held, args)
                record += [{"model": Path(model).name, "block": f"{ratio}", **t.to_json()} for t in trials]
                lines += [f"### −{ratio:.1%} ({groups} of {num_experts} experts per layer), {fmt}", "",
                          *table(trials), "", summary(trials), ""]
        if args.no_domains:
            continue
        groups = max(top_k, num_experts - round(num_experts * args.domain_ratio))
        train, valid = domain_files("train", work), domain_files("validation", work)
        lines += [f"### Calibrated on one domain, scored on the others (−{args.domain_ratio:.1%}, mapped unless "
                  "the row says @compact; pruning compact)", "",
                  "`+self=S`: a share S of the calibration windows sampled from the model itself (`self_calibration`), "
                  "the rest cut from the calibration domain.", "",
                  "| calibrated on | scored on | " + " | ".join(args.domain_rows) + " |",
                  "|---|---|" + "---|" * len(args.domain_rows)]
        held_by = {d: eval_texts(ckpt.tokenizer, [str(f)], args.seq_len, args.ppl_windows)[0].windows
                   for d, f in valid.items()}
        # a row with every window sampled reads no calibration text: one walk per model, scored on every domain
        text_free: dict[str, Trial] = {}
        for row in args.domain_rows:
            body, _, share = row.partition("+self=")
            if share and float(share) == 1:
                name, _, fmt = body.partition("@")
                print(f"[{Path(model).name} {row}: no calibration text, scored on every domain]", flush=True)
                first = next(iter(held_by))  # scored as the held-out text; the others in the same walk
                t = run_rows(model, ckpt, [name], groups, fmt or "mapped", str(next(iter(train.values()))),
                             held_by[first], args, 1.0, more={d: w for d, w in held_by.items() if d != first})[0]
                if t.error is None:
                    t.ratios_on = {first: t.ppl_ratio, **t.ratios_on}
                text_free[row] = t
                record.append({"model": Path(model).name, "block": "no text", "ratios_on": text_free[row].ratios_on,
                               **text_free[row].to_json()})
        for cal_domain, cal_file in train.items():
            for eval_domain in valid:
                if eval_domain == cal_domain:
                    continue
                print(f"[{Path(model).name} calibrated on {cal_domain}, scored on {eval_domain}]", flush=True)
                cells = []
                for row in args.domain_rows:
                    if row in text_free:
                        t = text_free[row]
                        cells.append(f"×{t.ratios_on[eval_domain]:.3f}" if t.error is None else "failed")
                        continue
                    body, _, share = row.partition("+self=")
                    name, _, fmt = body.partition("@")
                    t = run_rows(model, ckpt, [name], groups, fmt or "mapped", str(cal_file), held_by[eval_domain],
                                 args, float(share or 0))[0]
                    record.append({"model": Path(model).name, "block": f"{cal_domain}->{eval_domain}", **t.to_json()})
                    cells.append(f"×{t.ppl_ratio:.3f}" if t.error is None else "failed")
                lines.append(f"| {cal_domain} | {eval_domain} | " + " | ".join(cells) + " |")
        lines.append("")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
