"""moemerge: make Mixture-of-Experts language models smaller by merging and pruning experts, without retraining.

The pipeline, one subpackage per stage::

    calibrate  ->  group  ->  merge  ->  save  ->  evaluate

>>> import moemerge
>>> result = moemerge.run(moemerge.Recipe(model_path="path/to/model", output_path="out", num_average_groups=4))
"""

__version__ = "0.1.0"

from .calibrate import CalibrationSettings, Stats  # noqa: E402
from .errors import MoemergeError  # noqa: E402
from .evaluate import perplexity  # noqa: E402
from .group import LayerPlan, MergePlan, plan_groups  # noqa: E402
from .loading import LoadedModel, load_model  # noqa: E402
from .pipeline import MergeResult, calibrate, merge_model, run, save_checkpoint  # noqa: E402
from .recipe import Recipe  # noqa: E402

__all__ = ["__version__", "MoemergeError", "Recipe", "LoadedModel", "load_model", "CalibrationSettings", "Stats",
           "calibrate", "LayerPlan", "MergePlan", "plan_groups", "MergeResult", "merge_model", "run", "save_checkpoint",
           "perplexity"]
