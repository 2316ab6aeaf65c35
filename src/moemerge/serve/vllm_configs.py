"""Config classes of the ``mapped`` model types for vLLM's transformers (no remote code).

A mapped checkpoint's ``config.json`` is the stock family's config with ``model_type`` ``mixtral_mapped`` /
``qwen2_moe_mapped`` and an extra ``expert_map`` (``{"layer": [merged expert of each original expert]}``). The stock
config classes keep unknown keys as attributes, so a subclass that only renames the model type reads it exactly.
Kept apart from :mod:`moemerge.save.remote.modeling_moemerge` because that file follows moemerge's transformers
(5.23) and may use classes vLLM's transformers does not have.
"""

from __future__ import annotations

from transformers import MixtralConfig, Qwen2MoeConfig


class MixtralMappedConfig(MixtralConfig):
    """Mixtral config of a moemerge ``mapped`` checkpoint (``config.expert_map`` per merged layer)."""

    model_type = "mixtral_mapped"


class Qwen2MoeMappedConfig(Qwen2MoeConfig):
    """Qwen2-MoE config of a moemerge ``mapped`` checkpoint (``config.expert_map`` per merged layer)."""

    model_type = "qwen2_moe_mapped"


MAPPED_CONFIGS: list[type] = [MixtralMappedConfig, Qwen2MoeMappedConfig]
