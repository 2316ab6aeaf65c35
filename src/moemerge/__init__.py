"""moemerge: make Mixture-of-Experts language models smaller by merging and pruning experts, without retraining.

The pipeline, one subpackage per stage, walked one decoder layer at a time by the executor (``execute``)::

    calibrate  ->  group  ->  merge  ->  save  ->  evaluate

>>> import moemerge
>>> result = moemerge.run(moemerge.Recipe(model_path="path/to/model", output_path="out", num_average_groups=4))

Names are imported on first use, so ``import moemerge`` (and the ``moemerge`` command's ``--help``) does not load
torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "MoemergeError": ".errors", "Recipe": ".recipe", "LoadedModel": ".loading", "load_model": ".loading",
    "CalibrationSettings": ".calibrate", "Stats": ".calibrate", "LayerPlan": ".group", "MergePlan": ".group",
    "plan_groups": ".group", "MergeResult": ".pipeline", "calibrate": ".pipeline", "merge_model": ".pipeline",
    "run": ".pipeline", "save_checkpoint": ".pipeline", "perplexity": ".evaluate",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moemerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
