"""Index of every registry, keyed by the recipe option that selects from it, and the named recipes (presets).

Importing this module imports every method module, so all registries are complete.
"""

from __future__ import annotations

from .group import CLUSTER, GROUPING, LINKAGE, SIMILARITY
from .group.options import check_combinations
from .group.prune import PRUNE
from .merge import MERGE, check_options
from .registry import Registry
from .save import FORMATS, ROUTER_ADAPT

REGISTRIES: dict[str, Registry] = {
    "dominant": GROUPING,
    "similarity_base": SIMILARITY,
    "cluster": CLUSTER,
    "linkage": LINKAGE,
    "merge": MERGE,
    "router": FORMATS,
    "router_adapt": ROUTER_ADAPT,
    "prune": PRUNE,
}

def check_recipe(recipe) -> None:
    """Every rule on option combinations, grouping's and merging's (``ValueError``, one line)."""
    check_options(recipe)
    check_combinations(recipe)


# Named recipes: option values on top of the Recipe defaults. ``--recipe NAME`` loads one.
PRESETS: Registry[dict] = Registry("recipe")
PRESETS.add("hc-smoe", {"dominant": "no", "similarity_base": "expert-output", "cluster": "hierarchical",
                        "linkage": "average", "merge": "freq"})
# The house recipe, best in 3 of 4 settings of scripts/compare.py: HC-SMoE's features and linkage, one global cut
# over all layers in output units (non-uniform counts: save with keep, mapped or padded), and output-fitted merging.
PRESETS.add("moemerge", {"dominant": "no", "similarity_base": "expert-output", "cluster": "hierarchical",
                         "linkage": "average", "hierarchical_stopping_metric": "distance", "merge": "fit"})
# Sub-MoE (arXiv 2506.23266): eq. 2 output-cosine features, k-means++ (eq. 3), 2-layer adaptive allocation (the
# paper's default), subspace merge (eqs. 5–8, = frequency averaging at full rank). † adds rank truncation with
# activation whitening (eqs. 10–12), saved as two factors per matrix (--format lowrank; keep/collapse store the
# low-rank product dense).
PRESETS.add("sub-moe", {"dominant": "no", "similarity_base": "expert-output-cosine", "cluster": "kmeans",
                        "multi_layer": 2, "merge": "sub-moe", "router": "keep"})
PRESETS.add("sub-moe-dagger", {"dominant": "no", "similarity_base": "expert-output-cosine", "cluster": "kmeans",
                               "multi_layer": 2, "merge": "sub-moe", "router": "lowrank", "rank_ratio": 0.5,
                               "whiten": True})
# M-SMoE (MC-SMoE, arXiv 2310.01334, without the compression stage): router-logit similarity, globally most frequent
# experts dominant (non-uniform counts, so router keep), neurons aligned to the dominant by weight matching, then a
# frequency-weighted average.
PRESETS.add("m-smoe", {"dominant": "frequency", "similarity_base": "router-logits", "merge": "aligned-freq",
                       "router": "keep"})
# Pruning baselines: keep num_average_groups experts per layer by score, drop the rest with their router rows.
PRESETS.add("frequency-prune", {"prune": "frequency", "router": "collapse"})
PRESETS.add("output-prune", {"prune": "output", "router": "collapse"})
PRESETS.add("reap", {"prune": "reap", "router": "collapse"})  # REAP, arXiv 2510.13999
