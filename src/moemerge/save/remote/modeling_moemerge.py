"""Modeling code shipped inside moemerge checkpoints saved with ``--format mapped`` or ``--format lowrank``.

Load such a checkpoint with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.

The model is the stock transformers model (Mixtral or Qwen2-MoE) with, in the merged MoE layers, the experts module
replaced:

* the router keeps all N original rows, so top-k runs over the original N logits exactly as before;
* ``config.expert_map[layer][e]`` is the merged expert that original expert ``e`` became; the top-k weights of slots
  that map to the same merged expert are added (scatter-add), and each merged expert that was hit runs once on its
  tokens. This is exactly the HC-SMoE / MC-SMoE routing rule, with E' < N experts stored per layer (E' may differ
  between layers);
* ``config.expert_ranks[layer]`` (lowrank only): each merged matrix is stored as two factors ``A [O, r] @ B [r, I]``.

Per-expert tensors are saved under the family's hub names (``experts.{i}.w1.weight`` / ``gate_proj.weight``) through
``register_checkpoint_conversion_mapping``; low-rank factors are saved fused (``experts.gate_a`` ...). This file
depends on torch and transformers only.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM
from transformers.activations import ACT2FN
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

_FACTOR_NAMES = ("gate", "up", "down")


def combine_weights(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, expert_map: torch.Tensor,
                    num_merged: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the original experts -> per merged expert: ``(weights [T, E'], hit [T, E'] bool)``.

    Weights of slots that share a merged expert add up, so running merged expert g once with the summed weight gives
    the same output as running it once per slot (what ``--format keep`` does), at lower cost.
    """
    merged_index = expert_map[top_k_index]  # [T, k]
    dense = top_k_weights.new_zeros(top_k_index.shape[0], num_merged)
    dense.scatter_add_(1, merged_index, top_k_weights)
    hit = torch.zeros_like(dense, dtype=torch.bool).scatter_(1, merged_index, True)
    return dense, hit


class _MappedBase(nn.Module):
    """Shared routing part: original top-k -> merged experts hit; subclasses implement ``_expert(x, e)``."""

    def __init__(self, expert_map: list[int], act: str) -> None:
        super().__init__()
        self.num_experts = int(max(expert_map)) + 1
        self.num_slots = len(expert_map)
        # Configuration (config.expert_map), not a weight: kept as a list, so meta-device initialisation in
        # from_pretrained cannot leave it uninitialised (a non-persistent buffer would be), and made a tensor on use.
        self.expert_map_list = [int(e) for e in expert_map]
        self._map_cache: torch.Tensor | None = None
        self.act_fn = ACT2FN[act]

    @property
    def expert_map(self) -> torch.Tensor:
        """``[N]`` long: merged expert of each original expert, on the parameters' device."""
        device = next(self.parameters()).device
        if self._map_cache is None or self._map_cache.device != device:
            self._map_cache = torch.tensor(self.expert_map_list, dtype=torch.long, device=device)
        return self._map_cache

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        weights, hit = combine_weights(top_k_index, top_k_weights, self.expert_map, self.num_experts)
        experts_hit = hit.any(0).nonzero().flatten().tolist()
        for e in experts_hit:  # at most E' iterations; tokens per expert <= tokens routed to its slots
            token_idx = hit[:, e].nonzero().flatten()
            y = self._expert(hidden_states[token_idx], e) * weights[token_idx, e, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


class MappedExperts(_MappedBase):
    """E' merged experts in the stock fused layout (``gate_up_proj [E', 2I, H]``, ``down_proj [E', H, I]``)."""

    def __init__(self, expert_map: list[int], hidden_size: int, intermediate_size: int, act: str) -> None:
        super().__init__(expert_map, act)
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden_size, intermediate_size))

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        gate, up = nn.functional.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])


class LowRankMappedExperts(_MappedBase):
    """E' merged experts whose gate, up and down matrices are products ``a [E', O, r] @ b [E', r, I]``.

    Ranks are per layer and per matrix kind (experts with a smaller rank are zero-padded: exact).
    """

    def __init__(self, expert_map: list[int], hidden_size: int, intermediate_size: int, act: str,
                 ranks: dict[str, int]) -> None:
        super().__init__(expert_map, act)
        n, h, i = self.num_experts, hidden_size, intermediate_size
        shapes = {"gate": (i, h), "up": (i, h), "down": (h, i)}
        for name in _FACTOR_NAMES:
            out_dim, in_dim = shapes[name]
            r = int(ranks[name])
            setattr(self, f"{name}_a", nn.Parameter(torch.empty(n, out_dim, r)))
            setattr(self, f"{name}_b", nn.Parameter(torch.empty(n, r, in_dim)))

    def _lin(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, getattr(self, f"{name}_b")[e]),
                                    getattr(self, f"{name}_a")[e])

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self._lin(self.act_fn(self._lin(x, "gate", e)) * self._lin(x, "up", e), "down", e)


def build_experts(config, layer: int, hidden_size: int, intermediate_size: int) -> nn.Module | None:
    """The experts module of decoder layer ``layer`` described by the config, or None if the layer is stock."""
    key = str(layer)
    expert_map = (getattr(config, "expert_map", None) or {}).get(key)
    if expert_map is None:
        return None
    ranks = (getattr(config, "expert_ranks", None) or {}).get(key)
    if ranks:
        return LowRankMappedExperts(expert_map, hidden_size, intermediate_size, config.hidden_act, ranks)
    return MappedExperts(expert_map, hidden_size, intermediate_size, config.hidden_act)


def _install(model: nn.Module, config, intermediate_size: int) -> None:
    for i, decoder_layer in enumerate(model.model.layers):
        experts = build_experts(config, i, config.hidden_size, intermediate_size)
        if experts is not None:
            decoder_layer.mlp.experts = experts


def _mapped_family(base_config: type, base_model: type, model_type: str, intermediate_key: str):
    """A config class (``model_type``, plus ``expert_map`` / ``expert_ranks``) and a causal-LM class that builds the
    stock model, then swaps in the mapped experts of every layer the config describes."""

    def config_init(self, expert_map: dict | None = None, expert_ranks: dict | None = None, **kwargs) -> None:
        self.expert_map = expert_map
        self.expert_ranks = expert_ranks
        base_config.__init__(self, **kwargs)

    config_cls = type(base_config.__name__.replace("Config", "MappedConfig"), (base_config,),
                      {"model_type": model_type, "__init__": config_init, "__module__": __name__})

    def model_init(self, config) -> None:
        base_model.__init__(self, config)
        _install(self, config, getattr(config, intermediate_key))
        self.post_init()

    model_cls = type(base_model.__name__.replace("ForCausalLM", "MappedForCausalLM"), (base_model,),
                     {"config_class": config_cls, "__init__": model_init, "__module__": __name__})
    return config_cls, model_cls


MixtralMappedConfig, MixtralMappedForCausalLM = _mapped_family(MixtralConfig, MixtralForCausalLM, "mixtral_mapped",
                                                               "intermediate_size")
Qwen2MoeMappedConfig, Qwen2MoeMappedForCausalLM = _mapped_family(Qwen2MoeConfig, Qwen2MoeForCausalLM,
                                                                 "qwen2_moe_mapped", "moe_intermediate_size")


# The custom model types get no checkpoint conversion by default, so they would save fused keys and could not read
# per-expert ones; registering the stock family's mapping gives them the hub names both ways.
register_checkpoint_conversion_mapping("mixtral_mapped", get_checkpoint_conversion_mapping("mixtral"), overwrite=True)
register_checkpoint_conversion_mapping("qwen2_moe_mapped", get_checkpoint_conversion_mapping("qwen2_moe"),
                                       overwrite=True)

MAPPED_CLASSES = [(MixtralMappedConfig, MixtralMappedForCausalLM), (Qwen2MoeMappedConfig, Qwen2MoeMappedForCausalLM)]
