"""Small PNG plots (matplotlib, Agg backend: no display needed) for ``moemerge analyze`` and merge reports.

Every function takes plain data (numbers per layer) and a path, writes one PNG and returns the path, so the plots can
be drawn from a live analysis, from ``merge_info.json`` or from JSON written earlier.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

#: a 6.4-inch figure at 150 dpi is 960 px wide: the width of a report page's text at print resolution
DPI = 150


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: never open a window, never need a display
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, max(1, n))
    return math.ceil(n / cols), cols


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # "tight": a legend placed outside the axes is kept
    _plt().close(fig)
    return path


def _legend_outside(ax, fontsize: int = 8) -> None:
    """The legend right of the axes, where it never covers a bar or a point."""
    ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)


def _integer_axis(axis) -> None:
    """Counts (experts, groups) and expert indices get whole-number ticks only."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _pick_layers(layers: Sequence[int], max_layers: int) -> list[int]:
    """At most ``max_layers`` layers, evenly spread, first and last included."""
    layers = list(layers)
    if len(layers) <= max_layers:
        return layers
    idx = np.linspace(0, len(layers) - 1, max_layers).round().astype(int)
    return [layers[i] for i in dict.fromkeys(idx.tolist())]


def bars_per_layer(values: Mapping[int, Sequence[float]], path: str | Path, title: str, ylabel: str,
                   groups: Mapping[int, list[list[int]]] | None = None,
                   other: Mapping[int, Sequence[float]] | None = None, labels: tuple[str, str] = ("A", "B"),
                   max_layers: int = 16) -> Path:
    """One bar chart per layer (value per expert). With ``groups``, bars of one group share a colour and the
    group number is written above; with ``other``, a second series is drawn beside the first."""
    plt = _plt()
    layers = _pick_layers(sorted(values), max_layers)
    rows, cols = _grid(len(layers))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.3 * rows), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, li in zip(axes.flat, layers):
        v = np.asarray(values[li], dtype=float)
        x = np.arange(len(v))
        width = 0.8 if other is None else 0.4
        colors = ["tab:blue"] * len(v)
        if groups and li in groups:
            for gi, g in enumerate(groups[li]):
                for e in g:
                    if e < len(v):
                        colors[e] = cmap(gi % 20)
        ax.bar(x - (0 if other is None else width / 2), v, width, color=colors, label=labels[0])
        if other is not None and li in other:
            w = np.asarray(other[li], dtype=float)
            ax.bar(np.arange(len(w)) + width / 2, w, width, color="tab:orange", label=labels[1])
        if groups and li in groups and len(v) <= 32:
            group_of = {e: gi for gi, g in enumerate(groups[li]) for e in g}
            for e in x:
                if e in group_of:
                    ax.text(e, v[e], str(group_of[e]), ha="center", va="bottom", fontsize=6)
        ax.set_title(f"layer {li}", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("expert", fontsize=7)
        _integer_axis(ax.xaxis)
        ax.set_ylabel(ylabel, fontsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    if other is not None:
        _legend_outside(axes.flat[len(layers) - 1], fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def heatmaps(matrices: Mapping[int, np.ndarray], path: str | Path, title: str, max_layers: int = 8,
             vmin: float = -1.0, vmax: float = 1.0) -> Path:
    """One ``[E, E]`` heatmap per layer (e.g. cosine similarity of experts), shared colour scale."""
    plt = _plt()
    layers = _pick_layers(sorted(matrices), max_layers)
    rows, cols = _grid(len(layers))
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.6 * rows), squeeze=False)
    im = None
    for ax, li in zip(axes.flat, layers):
        im = ax.imshow(np.asarray(matrices[li]), vmin=vmin, vmax=vmax, cmap="RdBu_r")
        _integer_axis(ax.xaxis)
        _integer_axis(ax.yaxis)
        ax.set_title(f"layer {li}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=list(axes.flat), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)  # no tight_layout: it fights the shared colour bar
    plt.close(fig)
    return path


def lines_per_layer(series: Mapping[str, Mapping[int, float]], path: str | Path, title: str, ylabel: str,
                    reference: float | None = None, reference_label: str = "") -> Path:
    """One line per named series over layers (router entropy, load imbalance, ...)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, values in series.items():
        xs = sorted(values)
        ax.plot(xs, [values[x] for x in xs], marker="o", label=name)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label=reference_label)
    ax.set_xlabel("layer")
    _integer_axis(ax.xaxis)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    _legend_outside(ax)
    return _save(fig, path)


def experts_per_layer(before: Mapping[int, int], after: Mapping[int, int], path: str | Path,
                      title: str = "experts per MoE layer") -> Path:
    """Bars of the expert count per layer, original beside merged."""
    plt = _plt()
    layers = sorted(before)
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.3 * len(layers) + 2), 3.6))
    ax.bar(x - 0.2, [before[l] for l in layers], 0.4, label="original", color="tab:grey")
    ax.bar(x + 0.2, [after.get(l, before[l]) for l in layers], 0.4, label="merged", color="tab:blue")
    ax.set_xticks(x, [str(l) for l in layers], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("experts")
    _integer_axis(ax.yaxis)
    ax.set_title(title, fontsize=10)
    _legend_outside(ax)
    return _save(fig, path)


def cluster_sizes(groups: Mapping[int, list[list[int]]], path: str | Path, title: str = "group sizes") -> Path:
    """Per layer, a stacked bar of how many groups have each size (1 = kept alone)."""
    plt = _plt()
    layers = sorted(groups)
    sizes = sorted({len(g) for li in layers for g in groups[li]})
    fig, ax = plt.subplots(figsize=(max(6.4, 0.3 * len(layers) + 2), 3.6))
    bottom = np.zeros(len(layers))
    for s in sizes:
        counts = np.array([sum(1 for g in groups[li] if len(g) == s) for li in layers], dtype=float)
        ax.bar(np.arange(len(layers)), counts, bottom=bottom, label=f"size {s}")
        bottom += counts
    ax.set_xticks(np.arange(len(layers)), [str(l) for l in layers], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("groups")
    _integer_axis(ax.yaxis)
    ax.set_title(title, fontsize=10)
    _legend_outside(ax)
    return _save(fig, path)


def importance_vs_frequency(frequency: Mapping[int, Sequence[float]], importance: Mapping[int, Sequence[float]],
                            path: str | Path, max_layers: int = 16) -> Path:
    """Per layer: each expert's loss increase when masked (bars) beside its activation frequency (line)."""
    plt = _plt()
    layers = _pick_layers(sorted(importance), max_layers)
    rows, cols = _grid(len(layers))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.3 * rows), squeeze=False)
    for ax, li in zip(axes.flat, layers):
        imp = np.asarray(importance[li], dtype=float)
        ax.bar(np.arange(len(imp)), imp, color="tab:red", alpha=0.7)
        ax.set_ylabel("Δ loss (nats)", fontsize=7, color="tab:red")
        ax.tick_params(labelsize=6)
        ax2 = ax.twinx()
        freq = np.asarray(frequency.get(li, []), dtype=float)
        ax2.plot(np.arange(len(freq)), freq, color="tab:blue", marker=".")
        ax2.set_ylabel("frequency", fontsize=7, color="tab:blue")
        ax2.tick_params(labelsize=6)
        ax.set_title(f"layer {li}", fontsize=8)
        ax.set_xlabel("expert", fontsize=7)
        _integer_axis(ax.xaxis)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle("expert importance (masked alone) vs activation frequency", fontsize=10)
    return _save(fig, path)


def frontier(points: Sequence[Mapping], path: str | Path, title: str = "size against quality") -> Path:
    """The size-quality frontier of ``moemerge recommend``: for every candidate and budget, parameters against the
    perplexity ratio (left) and the KL to the original (right); one colour per candidate, its budgets joined, and
    the Pareto front (no other point both smaller and better) drawn as a black step line.

    ``points``: mappings with ``name``, ``parameters``, ``ppl_ratio`` and ``kl``.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(dict.fromkeys(p["name"] for p in points))
    cmap = plt.get_cmap("tab20")
    for metric, ax, label in (("ppl_ratio", axes[0], "perplexity ratio (merged / original)"),
                              ("kl", axes[1], "KL(original ‖ merged), nats/token")):
        for i, name in enumerate(names):
            mine = sorted((p for p in points if p["name"] == name and math.isfinite(p[metric])),
                          key=lambda p: p["parameters"])
            ax.plot([p["parameters"] / 1e6 for p in mine], [p[metric] for p in mine], marker="o", markersize=4,
                    linewidth=1, color=cmap(i % 20), label=name)
        front, best = [], math.inf
        for p in sorted((p for p in points if math.isfinite(p[metric])), key=lambda p: (p["parameters"], p[metric])):
            if p[metric] < best:
                front.append(p)
                best = p[metric]
        if front:
            ax.step([p["parameters"] / 1e6 for p in front], [p[metric] for p in front], where="post", color="black",
                    linewidth=1.5, alpha=0.6, label="Pareto front")
        ax.set_xlabel("parameters (millions)")
        ax.set_ylabel(label)
        if metric == "ppl_ratio":
            ax.set_yscale("log")  # one bad candidate (×20) would otherwise flatten the ones worth choosing (×1.1)
    _legend_outside(axes[1], fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
