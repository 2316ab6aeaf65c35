"""Index of every registry, keyed by the recipe option that selects from it, and the named recipes (presets).

Importing this module imports every method module, so all registries are complete.
"""

from __future__ import annotations

from .group import CLUSTER, GROUPING, LINKAGE, SIMILARITY
from .group.prune import PRUNE
from .merge import MERGE
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

# Named recipes: option values on top of the Recipe defaults. ``--recipe NAME`` loads one.
PRESETS: Registry[dict] = Registry("recipe")
PRESETS.add("hc-smoe", {"dominant": "no", "similarity_base": "expert-output", "cluster": "hierarchical",
                        "linkage": "average", "merge": "freq"})
