"""Registers moemerge's own ``mapped`` / ``lowrank`` model types with transformers' Auto classes.

This is how moemerge loads the checkpoints it wrote in those formats: through the classes installed with the package,
never by running a modeling file found in a model folder. There is one ``<model_type>_mapped`` type per model type
of every registered family (the family registry is the list; the classes come from one implementation).

Registration is on demand, one model type at a time (:func:`register_folder` reads a folder's ``config.json``):
building a family's classes imports its transformers modeling module, and importing all of them up front would add
seconds to every command.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...families import FAMILIES
from .modeling_moemerge import MAPPED_SUFFIX, mapped_classes


def mapped_model_types() -> list[str]:
    """The stock model types that get a ``_mapped`` twin: every model type of every registered family."""
    return [t for name in FAMILIES.names() for t in FAMILIES.get(name).model_types]


def register(model_type: str | None) -> bool:
    """Register ``model_type`` with transformers if it is one of moemerge's ``<base>_mapped`` types; True if so."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not model_type or not model_type.endswith(MAPPED_SUFFIX):
        return False
    base = model_type[: -len(MAPPED_SUFFIX)]
    if base not in mapped_model_types():
        return False
    config_cls, model_cls = mapped_classes(base)
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    return True


def register_folder(folder: str | Path) -> bool:
    """Register the model type of the checkpoint in ``folder`` (its ``config.json``), if it is a mapped one."""
    try:
        model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return False
    return register(model_type)
