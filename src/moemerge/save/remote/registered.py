"""Registers moemerge's own ``mapped`` / ``lowrank`` model types with transformers' Auto classes.

Importing this module is how moemerge loads the checkpoints it wrote in those formats: through the classes installed
with the package, never by running a modeling file found in a model folder. One ``<model_type>_mapped`` type per
model type of every registered family (the family registry is the list; the classes come from one implementation).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from ...families import FAMILIES
from .modeling_moemerge import mapped_classes


def mapped_model_types() -> list[str]:
    """The stock model types that get a ``_mapped`` twin: every model type of every registered family."""
    return [t for name in FAMILIES.names() for t in FAMILIES.get(name).model_types]


for _base_type in mapped_model_types():
    _config_cls, _model_cls = mapped_classes(_base_type)
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)
