"""``moemerge analyze``: how a (merged or original) MoE model routes, as numbers, PNGs and a Markdown page.

Per MoE layer: each expert's activation frequency (share of tokens whose top-k holds it), the router entropy (mean
over tokens of the entropy of the router softmax, in nats; log E is uniform), the load imbalance (coefficient of
variation of the frequencies: 0 = perfectly balanced), cosine-similarity matrices of the experts under several
similarity bases (router logits, weights, expert outputs: the features the grouping step clusters), and optionally
each expert's importance (held-out loss increase when it alone is masked, :mod:`.interventions`).

Statistics come from :func:`moemerge.calibrate`, so the calibration cache is shared with ``merge``: an
analysis after a merge with the same calibration settings does not run the model again for them. A checkpoint written
by moemerge carries ``merge_info.json``; its groups are marked in the plots.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..calibrate import CalibrationSettings, Stats
from ..errors import MoemergeError
from ..families import family_of, moe_layers
from ..loading import LoadedModel
from ..pipeline import calibrate
from . import plots

DEFAULT_SIMILARITIES = ("router-logits", "weight", "expert-output")


@dataclass
class LayerAnalysis:
    layer: int
    num_experts: int
    frequency: list[float]  # sums to top-k
    entropy: float  # mean router entropy, nats
    imbalance: float  # coefficient of variation of frequency
    similarity: dict[str, list[list[float]]] = field(default_factory=dict)  # base -> [E, E] cosine
    groups: list[list[int]] | None = None  # from merge_info.json (indices of the original experts)
    importance: list[float] | None = None  # loss increase (nats) when each expert alone is masked

    @property
    def max_entropy(self) -> float:
        return math.log(self.num_experts)


@dataclass
class Analysis:
    model: str
    family: str
    top_k: int
    layers: dict[int, LayerAnalysis]
    calibration: dict
    base_loss: float | None = None
    merge_info: dict | None = None
    interventions: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"model": self.model, "family": self.family, "top_k": self.top_k, "calibration": self.calibration,
                "base_loss": self.base_loss, "interventions": self.interventions,
                "layers": {str(k): asdict(v) for k, v in self.layers.items()}}

    @property
    def label(self) -> str:
        return Path(self.model).name or self.model


def imbalance(frequency: np.ndarray) -> float:
    """Coefficient of variation (std / mean) of per-expert frequencies; 0 when every expert is used equally."""
    f = np.asarray(frequency, dtype=float)
    return float(f.std() / f.mean()) if f.mean() > 0 else 0.0


def cosine_matrix(features: np.ndarray) -> np.ndarray:
    """``[E, D] -> [E, E]`` cosine similarity of the rows (a zero row is similar to nothing, 0)."""
    f = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    unit = np.divide(f, norms, out=np.zeros_like(f), where=norms > 0)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def needed_statistics(similarities: tuple[str, ...] | list[str]) -> list[str]:
    from ..group.similarity import SIMILARITY

    names = ["frequency", "router_entropy"]
    for s in similarities:
        names += list(SIMILARITY.get(s).needs)
    return list(dict.fromkeys(names))


def read_merge_info(loaded: LoadedModel) -> dict | None:
    if loaded.local_dir is None or not (loaded.local_dir / "merge_info.json").is_file():
        return None
    return json.loads((loaded.local_dir / "merge_info.json").read_text())


def analyze(loaded: LoadedModel, settings: CalibrationSettings,
            similarities: tuple[str, ...] | list[str] = DEFAULT_SIMILARITIES,
            importance_windows: torch.Tensor | None = None, batch_size: int = 8, progress: bool = False) -> Analysis:
    """Routing statistics, similarity matrices and (with ``importance_windows``) expert importance per layer."""
    from ..group.similarity import SIMILARITY

    model = loaded.model
    spec = family_of(model.config)
    stats: Stats = calibrate(loaded, settings, needed_statistics(similarities), progress=progress)
    info = read_merge_info(loaded)
    plan = (info or {}).get("plan") or {}
    layers = {}
    for layer in moe_layers(model):
        li = layer.index
        freq = stats.frequency(li).numpy()
        ent = stats.get(li, "router_entropy")
        la = LayerAnalysis(li, layer.router_weight.shape[0], freq.tolist(),
                           float(ent["sum"] / ent["tokens"].clamp_min(1)), imbalance(freq))
        for s in similarities:
            la.similarity[s] = cosine_matrix(SIMILARITY.get(s).features(stats, layer)).tolist()
        if str(li) in plan:
            la.groups = plan[str(li)]["groups"]
        layers[li] = la
    analysis = Analysis(loaded.source, spec.name, spec.top_k(model.config), layers,
                        {k: stats.meta.get(k) for k in ("calibration", "windows", "model_runs", "from_cache")},
                        merge_info=info)
    if importance_windows is not None:  # masking re-routes tokens with the family's own routing
        from .interventions import expert_importance

        analysis.base_loss, imp = expert_importance(model, importance_windows, batch_size, progress=progress)
        for li, values in imp.items():
            layers[li].importance = values
    return analysis


# ---- report ----------------------------------------------------------------------------------------------------
def _groups_for_plot(a: Analysis) -> dict[int, list[list[int]]] | None:
    """Groups to colour the frequency bars with, when they index this model's router slots (router=keep)."""
    out = {li: la.groups for li, la in a.layers.items()
           if la.groups is not None and sum(len(g) for g in la.groups) <= la.num_experts}
    return out or None


def write_plots(a: Analysis, out: Path, other: Analysis | None = None, suffix: str = "") -> dict[str, Path]:
    """All PNGs of one analysis (``suffix`` tells two models' similarity files apart)."""
    files: dict[str, Path] = {}
    freq = {li: la.frequency for li, la in a.layers.items()}
    files["frequency"] = plots.bars_per_layer(
        freq, out / "frequency.png", "activation frequency per expert (share of tokens)", "frequency",
        groups=_groups_for_plot(a) if other is None else None,
        other={li: la.frequency for li, la in other.layers.items()} if other else None,
        labels=(a.label, other.label if other else ""))
    series = {a.label: {li: la.entropy for li, la in a.layers.items()}}
    imb = {a.label: {li: la.imbalance for li, la in a.layers.items()}}
    if other is not None:
        series[other.label + " "] = {li: la.entropy for li, la in other.layers.items()}
        imb[other.label + " "] = {li: la.imbalance for li, la in other.layers.items()}
    e_max = max(la.max_entropy for la in a.layers.values())
    files["entropy"] = plots.lines_per_layer(series, out / "entropy.png", "router entropy", "nats / token",
                                             reference=e_max, reference_label="uniform (log E)")
    files["imbalance"] = plots.lines_per_layer(imb, out / "imbalance.png", "load imbalance (CV of frequency)",
                                               "coefficient of variation")
    for model_a, tag in ((a, ""), (other, "_compare")) if other is not None else ((a, suffix),):
        sims = next(iter(model_a.layers.values())).similarity.keys()
        for s in sims:
            files[f"similarity_{s}{tag}"] = plots.heatmaps(
                {li: np.asarray(la.similarity[s]) for li, la in model_a.layers.items()},
                out / f"similarity_{s}{tag}.png", f"{model_a.label}: expert cosine similarity ({s})")
    groups = {li: la.groups for li, la in a.layers.items() if la.groups is not None}
    if groups:
        files["cluster_sizes"] = plots.cluster_sizes(groups, out / "cluster_sizes.png", "group sizes per layer")
    if any(la.importance is not None for la in a.layers.values()):
        files["importance"] = plots.importance_vs_frequency(
            freq, {li: la.importance for li, la in a.layers.items() if la.importance is not None},
            out / "importance.png")
    return files


def _layer_table(a: Analysis, other: Analysis | None) -> list[str]:
    names = [a.label] + ([other.label] if other else [])
    head = "| layer | " + " | ".join(f"experts ({n}) | entropy ({n}) | imbalance ({n})" for n in names)
    has_imp = any(la.importance is not None for la in a.layers.values())
    head += " | most important expert (Δ loss) |" if has_imp else " |"
    rows = [head, "|" + "---|" * (1 + 3 * len(names) + (1 if has_imp else 0))]
    for li, la in a.layers.items():
        cells = [str(li)]
        for m in [a] + ([other] if other else []):
            x = m.layers.get(li)
            cells += ["-"] * 3 if x is None else [str(x.num_experts), f"{x.entropy:.3f} / {x.max_entropy:.3f}",
                                                  f"{x.imbalance:.3f}"]
        if has_imp:
            imp = la.importance or []
            cells.append(f"{int(np.argmax(imp))} ({max(imp):+.4f})" if imp else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def write_report(a: Analysis, out_dir: str | Path, other: Analysis | None = None) -> Path:
    """``analysis.md`` + PNGs + ``analysis.json`` in ``out_dir``; images are linked relatively."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = write_plots(a, out, other)
    (out / "analysis.json").write_text(json.dumps({"model": a.to_json(), **({"compare": other.to_json()}
                                                                             if other else {})}, indent=1))
    title = f"# Routing analysis: {a.label}" + (f" vs {other.label}" if other else "")
    lines = [title, "", f"- model: `{a.model}` ({a.family}, top-{a.top_k})"]
    if other:
        lines.append(f"- compared with: `{other.model}` ({other.family}, top-{other.top_k})")
    lines.append(f"- calibration: {a.calibration.get('calibration')}, windows {a.calibration.get('windows')}"
                 f" ({'from cache' if a.calibration.get('model_runs') == 0 else 'one forward pass'})")
    if a.merge_info:
        recipe = a.merge_info.get("moemerge_recipe", {})
        lines.append(f"- merged by moemerge from `{a.merge_info.get('source_model')}`: merge={recipe.get('merge')}, "
                     f"router={recipe.get('router')}, experts per layer {a.merge_info.get('experts_per_layer')}")
    if a.base_loss is not None:
        lines.append(f"- held-out loss {a.base_loss:.4f} nats/token (perplexity {math.exp(a.base_loss):.3f})")
    lines += ["", "Entropy is the mean entropy of the router softmax over all experts (nats; the second number is "
              "log E, uniform routing). Imbalance is the coefficient of variation of the activation frequencies "
              "(0 = balanced).", "", *_layer_table(a, other), ""]
    captions = {"frequency": "Activation frequency per expert" + (" (colours and numbers: merge groups)"
                                                                  if _groups_for_plot(a) and not other else ""),
                "entropy": "Router entropy per layer", "imbalance": "Load imbalance per layer",
                "cluster_sizes": "Group sizes per layer", "importance": "Expert importance vs frequency"}
    for key, path in files.items():
        caption = captions.get(key) or key.replace("similarity_", "Expert similarity: ").replace("_compare",
                                                                                                  " (compared model)")
        lines += [f"## {caption}", "", f"![{caption}]({path.name})", ""]
    for iv in a.interventions:
        lines += ["## Intervention", "", f"mask {iv.get('mask')}, force {iv.get('force')}: perplexity "
                  f"{iv['ppl_before']:.4f} → {iv['ppl_after']:.4f}", ""]
    path = out / "analysis.md"
    path.write_text("\n".join(lines))
    return path


def print_analysis(a: Analysis, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"routing of {a.label}")
    for col in ("layer", "experts", "entropy (nats)", "log E", "imbalance (CV)", "top frequency"):
        table.add_column(col, justify="right")
    for li, la in a.layers.items():
        table.add_row(str(li), str(la.num_experts), f"{la.entropy:.3f}", f"{la.max_entropy:.3f}",
                      f"{la.imbalance:.3f}", f"{max(la.frequency):.3f}")
    console.print(table)


def run_analysis(model: str, out_dir: str | Path, compare: str | None = None, calibration: str | None = None,
                 n_sentences: int = 16, seq_len: int | None = None, batch_size: int = 4,
                 similarities: tuple[str, ...] | list[str] = DEFAULT_SIMILARITIES, importance: bool = True,
                 text: list[str] | None = None, windows: int = 4, mask: list[str] | None = None,
                 force: list[str] | None = None, dtype: str = "auto", device: str = "auto", cache: bool = True,
                 progress: bool = True) -> tuple[Analysis, Analysis | None, Path]:
    """What ``moemerge analyze`` does: load, analyse (and the ``--compare`` model), intervene, write the report."""
    from ..evaluate import default_ppl_sources, eval_texts, window_length
    from ..group.similarity import SIMILARITY
    from ..loading import load_model
    from .interventions import parse_selection, perplexity_under

    for s in similarities:
        SIMILARITY.get(s)  # unknown names fail before loading anything
    results = []
    for source in [model] + ([compare] if compare else []):
        loaded = load_model(source, dtype, device)
        length, note = window_length(loaded.model.config, seq_len)
        if note:
            print(note, file=sys.stderr)
        settings = CalibrationSettings(calibration, n_sentences, length, batch_size, 0, cache)
        held = None
        if importance or mask or force:
            sources = text or default_ppl_sources()
            held = eval_texts(loaded.tokenizer, sources, length, windows)[0].windows
        a = analyze(loaded, settings, similarities, held if importance else None, batch_size, progress)
        if mask or force:
            layer_ids = [l.index for l in moe_layers(loaded.model)]
            m, f = parse_selection(mask, layer_ids), parse_selection(force, layer_ids)
            before, after = perplexity_under(loaded.model, held, m, f, batch_size)
            a.interventions.append({"mask": {str(k): v for k, v in m.items()},
                                    "force": {str(k): v for k, v in f.items()},
                                    "ppl_before": before, "ppl_after": after})
        results.append(a)
        del loaded
    if compare and results[0].family != results[1].family:
        raise MoemergeError(f"cannot compare a {results[0].family} model with a {results[1].family} model")
    other = results[1] if compare else None
    return results[0], other, write_report(results[0], out_dir, other)
