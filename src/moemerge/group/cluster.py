"""Clustering of one layer's experts into k groups (``cluster``), on the features of :mod:`.similarity`.

scipy does hierarchical clustering (every linkage merges the *closest* pair under its own definition; the reference
HC-SMoE code's ``complete`` merged the farthest pair) and scikit-learn does k-means++.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from ..errors import MoemergeError
from ..registry import Registry

# (features [E, D], k, options) -> labels [E] with values 0..k-1
ClusterFn = Callable[..., np.ndarray]
CLUSTER: Registry[ClusterFn] = Registry("cluster")
LINKAGE: Registry[str] = Registry("linkage")
for _name in ("single", "complete", "average", "ward"):
    LINKAGE.add(_name, _name)


def _check_k(features: np.ndarray, k: int) -> None:
    if not 1 <= k <= len(features):
        raise MoemergeError(f"cannot make {k} groups from {len(features)} experts")


@CLUSTER.register("hierarchical")
def hierarchical(features: np.ndarray, k: int, linkage_method: str = "average", **_) -> np.ndarray:
    """Agglomerative clustering cut at exactly k clusters (Euclidean distance; HC-SMoE §3.2)."""
    _check_k(features, k)
    if k == len(features):
        return np.arange(k)
    from scipy.cluster.hierarchy import cut_tree, linkage  # scipy/sklearn load when used: `--help` stays fast

    z = linkage(np.asarray(features, dtype=np.float64), method=LINKAGE.get(linkage_method), metric="euclidean")
    return cut_tree(z, n_clusters=k).reshape(-1)


@CLUSTER.register("kmeans")
def kmeans(features: np.ndarray, k: int, seed: int = 0, random_start_center: bool = False, **_) -> np.ndarray:
    """k-means with k-means++ seeding (or random initial centres), fixed seed, best of 10 starts."""
    from sklearn.cluster import KMeans

    _check_k(features, k)
    if k == len(features):
        return np.arange(k)
    x = np.asarray(features, dtype=np.float64)
    with warnings.catch_warnings():
        # Identical experts give fewer distinct points than k; sklearn warns and still returns k labels.
        warnings.simplefilter("ignore")
        km = KMeans(n_clusters=k, init="random" if random_start_center else "k-means++", n_init=10,
                    random_state=seed).fit(x)
    labels = km.labels_
    if len(np.unique(labels)) < k:  # degenerate data: split the largest clusters to get exactly k groups
        labels = _fill_empty(labels, k)
    return labels


def _fill_empty(labels: np.ndarray, k: int) -> np.ndarray:
    labels = labels.copy()
    used = set(labels.tolist())
    for missing in (c for c in range(k) if c not in used):
        counts = np.bincount(labels, minlength=k)
        biggest = int(counts.argmax())
        labels[np.flatnonzero(labels == biggest)[-1]] = missing
    return labels


def closest_to_centre(features: np.ndarray, members: list[int]) -> int:
    """The member nearest its group's centroid: the dominant expert when grouping by clustering."""
    x = np.asarray(features, dtype=np.float64)[members]
    d = ((x - x.mean(0)) ** 2).sum(1)
    return members[int(d.argmin())]
