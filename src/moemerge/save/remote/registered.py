"""Registers moemerge's own ``mapped`` / ``lowrank`` model types with transformers' Auto classes.

Importing this module is how moemerge loads the checkpoints it wrote in those formats: through the classes installed
with the package, never by running a modeling file found in a model folder.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .modeling_moemerge import MAPPED_CLASSES

for _config_cls, _model_cls in MAPPED_CLASSES:
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)
