"""vLLM implementations of moemerge's ``mapped`` checkpoints: vLLM's own Mixtral / Qwen2-MoE with merged MoE layers.

What differs from the stock vLLM model, in each layer listed in ``config.expert_map`` (other layers are stock):

* the router (``gate``) keeps its N rows and produces N logits;
* the fused MoE holds only E'_l experts (the checkpoint's ``experts.0 .. experts.{E'_l-1}``, loaded by vLLM's own
  per-expert weight loader, which sizes its name mapping from the layer's expert count);
* routing is the family's top-k over the N logits (softmax, then renormalised when the family does), after which
  each selected original expert id is replaced by its merged expert ``expert_map[id]``. Two slots of a token that
  map to the same merged expert stay two entries with the same id: the fused-MoE kernels compute every (token, slot)
  pair and add the weighted results, which equals running the merged expert once with the summed weight (what
  transformers' mapped model and ``--format keep`` compute).

Imported lazily by vLLM (see :mod:`moemerge.serve.vllm_plugin`); depends on vLLM and torch only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import get_ep_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.fused_moe import FusedMoEFactory, GateLinear
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.models import mixtral, qwen2_moe
from vllm.model_executor.models.mixtral import MixtralForCausalLM, MixtralMoE
from vllm.model_executor.models.qwen2_moe import Qwen2MoeForCausalLM, Qwen2MoeMLP, Qwen2MoeSparseMoeBlock
from vllm.model_executor.models.utils import extract_layer_index


def layer_expert_map(config, prefix: str, num_experts: int) -> list[int] | None:
    """``config.expert_map`` of the decoder layer named in ``prefix``, checked; None for a stock layer."""
    layer = extract_layer_index(prefix)
    if (getattr(config, "expert_ranks", None) or {}).get(str(layer)):
        # --format lowrank shares the model types but stores factor pairs (experts.gate_a ...) that vLLM's fused
        # MoE has no layout for; refuse here rather than fail later on unknown weight names.
        raise ValueError("moemerge's vLLM plugin serves --format mapped checkpoints; this one is --format lowrank "
                         "(config.expert_ranks), which vLLM cannot run. Save with --format mapped or compact.")
    expert_map = (getattr(config, "expert_map", None) or {}).get(str(layer))
    if expert_map is None:
        return None
    expert_map = [int(e) for e in expert_map]
    merged = sorted(set(expert_map))
    # The checkpoint stores experts 0..E'-1 of this layer; anything else means a config from another tool or a
    # damaged file, which would otherwise load silently wrong weights or index out of range at the first token.
    if len(expert_map) != num_experts or merged != list(range(len(merged))):
        raise ValueError(f"config.expert_map[{layer}] must list a merged expert for each of the {num_experts} "
                         f"router rows, with ids 0..E'-1; got {expert_map}")
    return expert_map


class ExpertMapRouting(nn.Module):
    """Custom routing function for ``FusedMoEFactory``: family top-k over N logits, then original -> merged ids."""

    def __init__(self, expert_map: list[int]) -> None:
        super().__init__()
        self.num_slots = len(expert_map)
        self.num_merged = max(expert_map) + 1
        # A buffer so it follows the model to its device; not persistent: it comes from the config, not the weights.
        self.register_buffer("expert_map", torch.tensor(expert_map, dtype=torch.int32), persistent=False)

    def forward(self, hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int,
                renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [T, k] fp32, merged expert ids [T, k] int32)``; same arithmetic as the transformers routers
        (softmax in fp32 over all N, top-k, divide by the top-k sum when the family renormalises)."""
        probs = torch.softmax(gating_output, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, topk, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, self.expert_map[ids]


@contextmanager
def _building_with(module: ModuleType, name: str, replacement: type) -> Iterator[None]:
    """Let vLLM's stock decoder layer build ``replacement`` where it builds ``module.name``, for one model build.

    vLLM's decoder layers construct their MoE block by the module-level name; swapping that name while the stock
    model class builds itself is the only seam that avoids copying the decoder layer, model and causal-LM
    constructors (building the stock block first is not possible: its fused MoE registers its layer name, and a
    second one under the same name is refused). The replacement subclasses the stock block, so vLLM's own
    ``isinstance`` checks still hold, and the original is restored even if the build fails.
    """
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


class MappedMixtralMoE(MixtralMoE):
    """Mixtral's MoE block; in a mapped layer: N-row gate, E'_l fused experts, routing through ``expert_map``."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 params_dtype: torch.dtype | None = None, quant_config: QuantizationConfig | None = None,
                 tp_size: int | None = None, dp_size: int | None = None, prefix: str = "",
                 enable_eplb: bool = False) -> None:
        config = get_current_vllm_config().model_config.hf_config
        expert_map = layer_expert_map(config, prefix, num_experts)
        if expert_map is None:
            super().__init__(num_experts, top_k, hidden_size, intermediate_size, params_dtype, quant_config,
                             tp_size, dp_size, prefix, enable_eplb)
            return
        if enable_eplb:
            raise ValueError("moemerge mapped checkpoints do not support EPLB (expert counts differ per layer)")
        nn.Module.__init__(self)
        self.hidden_size = hidden_size
        self.ep_group = get_ep_group().device_group
        self.ep_size = self.ep_group.size()
        self.enable_eplb = False
        self.routing = ExpertMapRouting(expert_map)
        merged = self.routing.num_merged
        # Expert-count bookkeeping of the stock block (read by vLLM's MixtureOfExperts interface), in merged experts.
        self.n_routed_experts = self.n_logical_experts = self.n_physical_experts = merged
        self.n_redundant_experts = 0
        self.n_local_physical_experts = merged // self.ep_size
        self.gate = GateLinear(hidden_size, num_experts, params_dtype=params_dtype, prefix=f"{prefix}.gate")
        self.experts = FusedMoEFactory(
            num_experts=merged, top_k=top_k, hidden_size=hidden_size, intermediate_size=intermediate_size,
            params_dtype=params_dtype, renormalize=True, quant_config=quant_config, tp_size=tp_size,
            dp_size=dp_size, prefix=f"{prefix}.experts", custom_routing_function=self.routing,
            ckpt_names=("w1", "w2", "w3"))
    # forward: the stock one (gate -> N logits -> self.experts(hidden_states, router_logits)).


class MappedQwen2MoeSparseMoeBlock(Qwen2MoeSparseMoeBlock):
    """Qwen2-MoE's sparse block; in a mapped layer: N-row gate, E'_l fused experts, routing through ``expert_map``.

    The shared expert and its gate are built exactly as in the stock block (moemerge never touches them).
    """

    def __init__(self, config, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        expert_map = layer_expert_map(config, prefix, config.num_experts)
        if expert_map is None:
            super().__init__(config, quant_config, prefix)
            return
        nn.Module.__init__(self)
        self.tp_size = get_tensor_model_parallel_world_size()
        self.routing = ExpertMapRouting(expert_map)
        merged = self.routing.num_merged
        if self.tp_size > merged:
            raise ValueError(f"Tensor parallel size {self.tp_size} is greater than the {merged} merged experts of "
                             f"{prefix}.")
        self.gate = GateLinear(config.hidden_size, config.num_experts, prefix=f"{prefix}.gate")
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, bias=False, quant_config=None,
                                                   prefix=f"{prefix}.shared_expert_gate")
        self.shared_expert: Qwen2MoeMLP | None = None
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = Qwen2MoeMLP(
                hidden_size=config.hidden_size, intermediate_size=config.shared_expert_intermediate_size,
                hidden_act=config.hidden_act, quant_config=quant_config, reduce_results=False,
                expert_gate=self.shared_expert_gate, prefix=f"{prefix}.shared_expert")
        self.experts = FusedMoEFactory(
            shared_experts=self.shared_expert, num_experts=merged, top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size, intermediate_size=config.moe_intermediate_size,
            renormalize=config.norm_topk_prob, quant_config=quant_config, prefix=f"{prefix}.experts",
            custom_routing_function=self.routing)
    # forward: the stock one.


class MixtralMappedForCausalLM(MixtralForCausalLM):
    """vLLM's Mixtral with moemerge's mapped MoE layers (architecture ``MixtralMappedForCausalLM``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        with _building_with(mixtral, "MixtralMoE", MappedMixtralMoE):
            super().__init__(vllm_config=vllm_config, prefix=prefix)


class Qwen2MoeMappedForCausalLM(Qwen2MoeForCausalLM):
    """vLLM's Qwen2-MoE with moemerge's mapped MoE layers (architecture ``Qwen2MoeMappedForCausalLM``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        with _building_with(qwen2_moe, "Qwen2MoeSparseMoeBlock", MappedQwen2MoeSparseMoeBlock):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
