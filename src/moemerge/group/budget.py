"""Expert budgets over all merged layers: non-uniform per-layer counts that meet ``num_average_groups × layers``
exactly.

* :func:`frequency_budget` (``dominant=frequency``, ``dynamic_group``): the globally most frequently routed experts
  are kept (become dominant). Frequencies are shares of tokens whose top-k holds the expert, so they are on the same
  scale in every layer (each layer's shares sum to top-k). Every layer first keeps its ``floor`` most frequent
  experts; the rest of the budget goes to the highest frequencies left anywhere. This fixes the reference code's
  threshold count (one expert too many or too few, ties swinging it further, and layers left with zero groups,
  which made its clustering loop forever).
* :func:`threshold_counts` (``hierarchical_stopping_metric=distance``): one global distance threshold over the
  merge heights of every layer's dendrogram, placed so the number of merges is exactly what the budget requires.
"""

from __future__ import annotations

import numpy as np

from ..errors import MoemergeError


def check_budget(total: int, sizes: dict[int, int], floor: int) -> None:
    """A total of ``total`` experts over layers of ``sizes`` experts, each keeping between ``floor`` and its size."""
    low, high = floor * len(sizes), sum(sizes.values())
    if not low <= total <= high:
        raise MoemergeError(f"a budget of {total} experts over {len(sizes)} layers must lie between {low} "
                            f"(at least {floor} per layer) and {high} (all experts)")


def frequency_budget(frequencies: dict[int, np.ndarray], total: int, floor: int) -> dict[int, list[int]]:
    """The experts kept in each layer (sorted), ``total`` in all, at least ``min(floor, E)`` per layer, chosen by
    global frequency; ties go to the lower layer, then the lower expert index (deterministic)."""
    sizes = {li: len(f) for li, f in frequencies.items()}
    check_budget(total, sizes, floor)
    kept: dict[int, list[int]] = {}
    rest: list[tuple[float, int, int]] = []
    for li, f in sorted(frequencies.items()):
        order = sorted(range(len(f)), key=lambda e: (-float(f[e]), e))
        kept[li] = order[:floor]
        rest += [(-float(f[e]), li, e) for e in order[floor:]]
    for _, li, e in sorted(rest)[:total - floor * len(sizes)]:
        kept[li].append(e)
    return {li: sorted(v) for li, v in kept.items()}


def threshold_counts(heights: dict[int, np.ndarray], sizes: dict[int, int], total: int, floor: int
                     ) -> dict[int, int]:
    """Clusters per layer when every layer's dendrogram is cut at one global height.

    ``heights[layer]`` are the merge heights of that layer's linkage (non-decreasing, as for single, complete,
    average and ward linkage), in units comparable across layers. Cutting at height ``t`` performs
    the layer's merges with height ≤ t; ``t`` is the height of the last merge needed to reach ``total`` clusters
    overall, taking merges in increasing height (ties: lower layer first). A layer stops merging at ``floor``
    clusters (its later merges are skipped), so the threshold never empties a layer.
    """
    check_budget(total, sizes, floor)
    need = sum(sizes.values()) - total
    events = sorted((float(h), li, step) for li, hs in heights.items() for step, h in enumerate(hs))
    merges = {li: 0 for li in sizes}
    for _, li, step in events:
        if need == 0:
            break
        if step != merges[li] or sizes[li] - merges[li] <= floor:
            continue  # a layer's merges happen in order; a layer at its floor merges no more
        merges[li] += 1
        need -= 1
    return {li: sizes[li] - merges[li] for li in sizes}
