"""Everything moemerge knows about model families, as data.

transformers 5 stores the routed experts of most MoE families in one fused module ``<block>.experts`` with
``gate_up_proj [E, 2I, H]`` (rows ``[:I]`` gate, ``[I:]`` up) and ``down_proj [E, H, I]``, and a router module whose
``weight`` is ``[E, H]`` (see the README's "How it works"). A :class:`FamilySpec` says where those live and which config
keys hold the expert count and top-k. A new family with this layout is one more ``FAMILIES.add(...)`` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import MoemergeError
from .registry import Registry


@dataclass(frozen=True)
class FamilySpec:
    """Where a family keeps its MoE pieces and how it routes.

    Attributes:
        name: registry name.
        model_types: ``config.model_type`` values this spec handles.
        num_experts_keys: config keys holding the routed-expert count; all present ones are rewritten on save.
        top_k_key: config key holding top-k.
        block_attr: attribute of a decoder layer holding the MoE block.
        router_attr / experts_attr: attributes of the block.
        shared_attrs: attributes of the block that belong to the shared expert (left untouched).
        renormalize: ``"always"``, ``"never"`` or the name of the config flag (``"norm_topk_prob"``) that decides
            whether the top-k routing weights are renormalised to sum to one.
        route_exact: :meth:`route` (softmax → top-k → renormalise) is exactly the family's routing. False for
            DeepSeek (scaling factor, group-limited choice, sigmoid scores): features that re-route tokens
            (interventions, router refitting) are refused there, while everything that reads the routing the model
            really used still works.
        scoring: ``softmax`` or ``sigmoid`` router scores (a collapsed row fitted to a log-sum-exp needs softmax).
        router_buffers: expert-indexed buffers of the router that must shrink with its rows
            (DeepSeek-V3's ``e_score_correction_bias``).
        group_key: config key of the number of expert groups for group-limited routing (``n_group``).
        tiny: config values of a tiny random model of the family (the family's tests build one from it).
    """

    name: str
    model_types: tuple[str, ...]
    num_experts_keys: tuple[str, ...]
    top_k_key: str = "num_experts_per_tok"
    block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_attrs: tuple[str, ...] = ()
    renormalize: str = "always"
    route_exact: bool = True
    scoring: str = "softmax"
    router_buffers: tuple[str, ...] = ()
    group_key: str | None = None
    tiny: dict = field(default_factory=dict, compare=False)

    def expert_groups(self, config) -> int:
        """Groups of contiguous expert ids that group-limited routing picks from (1 when routing is not grouped)."""
        if self.group_key is None or getattr(config, "topk_method", None) == "greedy":
            return 1
        return int(getattr(config, self.group_key, 1) or 1)

    # ---- config ----------------------------------------------------------------------------------------------
    def num_experts(self, config) -> int:
        for key in self.num_experts_keys:
            value = getattr(config, key, None)
            if value:
                return int(value)
        raise MoemergeError(f"config of {config.model_type!r} has none of {self.num_experts_keys}")

    def top_k(self, config) -> int:
        return int(getattr(config, self.top_k_key))

    def renormalizes(self, config) -> bool:
        if self.renormalize in ("always", "never"):
            return self.renormalize == "always"
        return bool(getattr(config, self.renormalize, False))

    # ---- routing -----------------------------------------------------------------------------------------------
    def route(self, logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax → top-k (→ renormalise): the routing of every family registered here.

        Returns ``(weights [T, k], indices [T, k])`` exactly as the family's router hands them to its experts.
        """
        probs = torch.softmax(logits.float(), dim=-1)
        weights, indices = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, indices

    # ---- modules -----------------------------------------------------------------------------------------------
    def moe_layer(self, index: int, decoder_layer: nn.Module) -> MoeLayer | None:
        """The MoE block of one decoder layer, or None for a dense layer (Qwen's ``mlp_only_layers``, DeepSeek's
        ``first_k_dense_replace``)."""
        block = getattr(decoder_layer, self.block_attr, None)
        if block is None or not hasattr(block, self.experts_attr):
            return None
        return MoeLayer(index=index, block=block, family=self)

    def moe_layers(self, model: nn.Module) -> list[MoeLayer]:
        return [v for v in (self.moe_layer(i, layer) for i, layer in enumerate(decoder_layers(model)))
                if v is not None]


@dataclass
class MoeLayer:
    """A view of one MoE block: its router, fused experts and shared expert."""

    index: int
    block: nn.Module
    family: FamilySpec

    @property
    def router(self) -> nn.Module:
        return getattr(self.block, self.family.router_attr)

    @property
    def experts(self) -> nn.Module:
        return getattr(self.block, self.family.experts_attr)

    @property
    def shared(self) -> list[nn.Module]:
        return [getattr(self.block, a) for a in self.family.shared_attrs if getattr(self.block, a, None) is not None]

    @property
    def num_experts(self) -> int:
        return int(self.experts.gate_up_proj.shape[0])

    @property
    def intermediate_size(self) -> int:
        return int(self.experts.down_proj.shape[-1])

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up [E, 2I, H], down [E, H, I])`` as stored (no copy)."""
        return self.experts.gate_up_proj.data, self.experts.down_proj.data

    def run_experts(self, hidden: torch.Tensor, gate_up: torch.Tensor | None = None,
                    down: torch.Tensor | None = None) -> torch.Tensor:
        """Every expert on every token, batched over experts: ``[T, H] -> [E, T, H]`` in fp32.

        Used for the expert-output statistics (HC-SMoE, Sub-MoE eq. 2). Matches ``experts(h, idx=e, w=1)``.
        """
        gu, dn = self.expert_weights()
        gu = gate_up if gate_up is not None else gu
        dn = down if down is not None else dn
        x = hidden.float()
        out = torch.empty(gu.shape[0], x.shape[0], dn.shape[1], dtype=torch.float32, device=x.device)
        # fp32 copies of a few experts at a time: a whole layer's would double its memory (2 GB for Qwen1.5-MoE)
        step = max(1, EXPERT_CHUNK_BYTES // max(1, 4 * (gu[0].numel() + dn[0].numel())))
        for lo in range(0, gu.shape[0], step):
            inter = expert_intermediate(x, gu[lo:lo + step].float(), self.experts.act_fn)
            out[lo:lo + step] = torch.einsum("eti,ehi->eth", inter, dn[lo:lo + step].float())
        return out


#: fp32 expert weights converted at once by :meth:`MoeLayer.run_experts`
EXPERT_CHUNK_BYTES = 256 * 2**20


def expert_intermediate(hidden: torch.Tensor, gate_up: torch.Tensor, act_fn) -> torch.Tensor:
    """SwiGLU intermediate activations ``act(x W_gate^T) * (x W_up^T)`` of each expert:
    ``[T,H],[E,2I,H] -> [E,T,I]``."""
    gu = torch.einsum("th,eoh->eto", hidden, gate_up)
    gate, up = gu.chunk(2, dim=-1)
    return act_fn(gate) * up


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers (``model.model.layers``)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise MoemergeError(f"cannot find decoder layers in {type(model).__name__}")
    return layers


FAMILIES: Registry[FamilySpec] = Registry("model family")
# Every family's tiny config has 8 experts in 2 MoE layers (more for DeepSeek's dense first layer), hidden 32.
FAMILIES.add("mixtral", FamilySpec("mixtral", ("mixtral", "minimax"), ("num_local_experts", "num_experts"),
                                   tiny={"intermediate_size": 48, "num_local_experts": 8, "num_experts_per_tok": 2}))
FAMILIES.add(
    "qwen2_moe",
    FamilySpec(
        "qwen2_moe", ("qwen2_moe",), ("num_experts",),
        shared_attrs=("shared_expert", "shared_expert_gate"), renormalize="norm_topk_prob",
        tiny={"intermediate_size": 64, "moe_intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 4,
              "shared_expert_intermediate_size": 48, "norm_topk_prob": False, "decoder_sparse_step": 1,
              "mlp_only_layers": []},
    ),
)
# Same layout and routing as Qwen2-MoE minus the shared expert. Qwen3-MoE's config maps num_experts to
# num_local_experts on save, so both keys are rewritten.
FAMILIES.add("qwen3_moe", FamilySpec("qwen3_moe", ("qwen3_moe",), ("num_experts", "num_local_experts"),
                                     renormalize="norm_topk_prob",
                                     tiny={"moe_intermediate_size": 24, "intermediate_size": 64, "num_experts": 8,
                                           "num_experts_per_tok": 2, "norm_topk_prob": True, "head_dim": 16}))
FAMILIES.add("olmoe", FamilySpec("olmoe", ("olmoe",), ("num_experts",), renormalize="norm_topk_prob",
                                 tiny={"intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 2,
                                       "norm_topk_prob": False}))
_DEEPSEEK_TINY = {"intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 3, "n_routed_experts": 8,
                  "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 1,
                  "topk_group": 1, "q_lora_rank": None, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
                  "qk_nope_head_dim": 8, "v_head_dim": 8, "routed_scaling_factor": 2.0, "num_key_value_heads": 2}
# DeepSeek-V2 (softmax, greedy or group-limited top-k, × routed_scaling_factor) and DeepSeek-V3 (sigmoid scores, a
# score-correction bias for the choice, group-limited top-k): same fused experts; dense first layers are skipped.
FAMILIES.add("deepseek_v2", FamilySpec("deepseek_v2", ("deepseek_v2",), ("n_routed_experts", "num_experts"),
                                       shared_attrs=("shared_experts",), renormalize="never", route_exact=False,
                                       group_key="n_group", tiny={**_DEEPSEEK_TINY, "topk_method": "greedy"}))
FAMILIES.add("deepseek_v3", FamilySpec("deepseek_v3", ("deepseek_v3",), ("n_routed_experts", "num_local_experts"),
                                       shared_attrs=("shared_experts",), renormalize="norm_topk_prob",
                                       route_exact=False, scoring="sigmoid",
                                       router_buffers=("e_score_correction_bias",), group_key="n_group",
                                       tiny={**_DEEPSEEK_TINY, "norm_topk_prob": True}))


def tiny_model(name: str, vocab_size: int, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random model of registered family ``name`` (fp32, eval mode), from its ``tiny`` config, with router
    weights larger than the init gives so that routing is far from uniform (tests and examples)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = FAMILIES.get(name)
    values = {"vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "max_position_embeddings": 128, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, **spec.tiny, **overrides}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.model_types[0], **values)).eval()
    with torch.no_grad():
        for layer in spec.moe_layers(model):
            layer.router.weight.normal_(0, 0.5)
            for name in spec.router_buffers:
                getattr(layer.router, name).normal_(0, 0.1)
    return model


def family_of(config) -> FamilySpec:
    """The family spec for a config, or a one-line error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    for name in FAMILIES:
        spec = FAMILIES.get(name)
        if model_type in spec.model_types:
            return spec
    supported = sorted(t for n in FAMILIES for t in FAMILIES.get(n).model_types)
    raise MoemergeError(
        f"model_type {model_type!r} is not a supported MoE family (dense model?); supported: {', '.join(supported)}"
    )


def moe_layers(model: nn.Module) -> list[MoeLayer]:
    layers = family_of(model.config).moe_layers(model)
    if not layers:
        raise MoemergeError(f"{type(model).__name__} has no MoE layers")
    return layers
