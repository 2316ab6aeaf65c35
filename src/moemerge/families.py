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
class Routing:
    """One MoE layer's routing function as data: router logits ``[T, E]`` → ``(weights [T, k], indices [T, k])``
    exactly as the family's router hands them to its experts.

    It covers every router of the registered families (transformers 5.23 ``modeling_*.py``):

    * scores: ``softmax`` or ``sigmoid`` of the fp32 logits;
    * choice: the scores, plus a per-expert score-correction bias when the family has one (DeepSeek-V3, GLM-4.5,
      dots.llm1, MiniMax-M2, ERNIE-4.5); the bias only chooses, the weights are the plain scores;
    * group-limited choice (``n_group > 1``): the experts are ``n_group`` contiguous blocks; each block is scored by its
      best choice score (DeepSeek-V2 ``group_limited_greedy``, ``max``) or the sum of its best two (DeepSeek-V3,
      ``top2``), the ``topk_group`` best blocks are kept and the others masked (to 0 for V2, to −inf for V3);
    * top-k of the choice scores (``sorted=False`` where the family's code asks for it, so the order matches too);
      Granite-MoE takes the top-k of the logits first and then the softmax of those k (``topk_first``: the same
      weights as softmax → top-k → renormalise, computed in its own order);
    * optional renormalisation of the k weights (``+ renorm_eps`` in the denominator as DeepSeek-V3 does, or a floor
      ``renorm_min`` as ERNIE does), then ``× scale`` (DeepSeek's ``routed_scaling_factor``).
    """

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    renorm_eps: float = 0.0
    renorm_min: float | None = None
    scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2"
    sorted_topk: bool = True
    topk_first: bool = False

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-expert scores ``[T, E]`` in fp32 (before any choice bias)."""
        logits = logits.float()
        return torch.sigmoid(logits) if self.scoring == "sigmoid" else torch.softmax(logits, dim=-1)

    def __call__(self, logits: torch.Tensor, bias: torch.Tensor | None = None,
                 allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [T, k] fp32, indices [T, k])`` for ``logits [T, E]``.

        ``bias [E]``: the score-correction bias (choice only). ``allowed [E]`` (bool): experts that may be chosen
        (routing interventions); a disallowed expert is never chosen and, when fewer than k are allowed, the extra
        picks get weight 0. Differentiable in ``logits`` (router refitting runs gradients through the weights).
        """
        if self.topk_first:  # Granite-MoE: top-k of the logits, softmax over those k
            chosen = logits.float() if allowed is None else logits.float().masked_fill(~allowed.to(logits.device),
                                                                                       float("-inf"))
            values, indices = torch.topk(chosen, self.top_k, dim=-1)
            return torch.softmax(values, dim=-1) * self.scale, indices
        scores = self.scores(logits)
        choice = scores if bias is None else scores + bias.to(scores.device, torch.float32)
        if allowed is not None:
            allowed = allowed.to(scores.device)
            choice = choice.masked_fill(~allowed, float("-inf"))
        num_experts = choice.shape[-1]
        if self.n_group > 1:
            if num_experts % self.n_group:
                raise MoemergeError(f"{num_experts} experts cannot form {self.n_group} routing groups (n_group)")
            grouped = choice.view(-1, self.n_group, num_experts // self.n_group)
            if self.group_score == "max":
                group_scores = grouped.max(dim=-1).values
            else:
                top = grouped.topk(2, dim=-1).values
                # an intervention may leave a group one allowed expert: score it by that one (not by -inf)
                group_scores = top.masked_fill(top == float("-inf"), 0.0).sum(dim=-1) if allowed is not None \
                    else top.sum(dim=-1)
            if allowed is not None:  # a group with no allowed expert is never chosen
                group_scores = group_scores.masked_fill(~allowed.view(self.n_group, -1).any(-1), float("-inf"))
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
            expert_mask = group_mask.unsqueeze(-1).expand(-1, self.n_group, num_experts // self.n_group)
            # DeepSeek-V2 zeroes the other groups' softmax scores, V3 sets their choice scores to -inf
            fill = 0.0 if self.group_score == "max" else float("-inf")
            choice = choice.masked_fill(~expert_mask.reshape(-1, num_experts), fill)
        values, indices = torch.topk(choice, self.top_k, dim=-1, sorted=self.sorted_topk)
        # Softmax routers without a bias hand over the chosen values themselves (DeepSeek-V2 takes them from its
        # group-masked scores, so a pick outside the chosen groups weighs 0); a -inf pick (intervention) weighs 0.
        # With a choice bias the weights are the plain scores of the chosen experts.
        weights = values.clamp(min=0.0) if bias is None and self.scoring == "softmax" \
            else scores.gather(1, indices)
        if allowed is not None:
            weights = weights * allowed.gather(0, indices.reshape(-1)).view_as(weights)
        if self.renormalize:
            denom = weights.sum(dim=-1, keepdim=True)
            if self.renorm_min is not None:
                denom = denom.clamp(min=self.renorm_min)
            weights = weights / (denom + self.renorm_eps)
        return weights * self.scale if self.scale != 1.0 else weights, indices


@dataclass(frozen=True)
class FamilySpec:
    """Where a family keeps its MoE pieces and how it routes (read from its transformers 5.23 modeling code).

    Attributes:
        name: registry name.
        model_types: ``config.model_type`` values this spec handles.
        num_experts_keys: config keys holding the routed-expert count; all present ones are rewritten on save.
        top_k_key: config key holding top-k (HunYuan's may be a per-layer list of equal values).
        block_attr: attribute of a decoder layer holding the MoE block.
        router_attr / experts_attr: attributes of the block. The router module is what the block calls for
            ``(router_logits, weights, indices)``.
        router_weight: path of the router's ``[E, H]`` weight inside the router module (HunYuan: ``wg.weight``).
        shared_attrs: attributes of the block that belong to the shared expert (left untouched).
        scoring: ``softmax`` or ``sigmoid`` router scores.
        renormalize: ``"always"``, ``"never"`` or the name of the config flag (``"norm_topk_prob"``) that decides
            whether the top-k routing weights are renormalised to sum to one.
        renorm_eps / renorm_min_key: DeepSeek-V3's ``+ 1e-20`` in the denominator; ERNIE's config key of the
            denominator's floor (``moe_norm_min``).
        choice_bias: path, from the block, of the score-correction bias that is added to the scores for the choice
            only (``gate.e_score_correction_bias``); it is cut and merged with the router rows.
        group_key / topk_group_key: config keys of group-limited routing (``n_group``, ``topk_group``).
        group_score: how a routing group is scored: ``max`` (DeepSeek-V2) or ``top2`` (DeepSeek-V3 and kin).
        scale_key: config key of the factor the weights are multiplied by (``routed_scaling_factor``).
        topk_first: top-k of the logits, then softmax over the k (Granite-MoE).
        sorted_topk: whether the family's top-k returns sorted indices (``torch.topk(..., sorted=False)`` otherwise).
        tiny: config values of a tiny random model of the family (the family's tests build one from it).
    """

    name: str
    model_types: tuple[str, ...]
    num_experts_keys: tuple[str, ...]
    top_k_key: str = "num_experts_per_tok"
    block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    router_weight: str = "weight"
    shared_attrs: tuple[str, ...] = ()
    scoring: str = "softmax"
    renormalize: str = "always"
    renorm_eps: float = 0.0
    renorm_min_key: str | None = None
    choice_bias: str | None = None
    group_key: str | None = None
    topk_group_key: str = "topk_group"
    group_score: str = "top2"
    scale_key: str | None = None
    sorted_topk: bool = True
    topk_first: bool = False
    tiny: dict = field(default_factory=dict, compare=False)

    def expert_groups(self, config) -> int:
        """Groups of contiguous expert ids that group-limited routing picks from (1 when routing is not grouped;
        DeepSeek-V2 groups only with ``topk_method=group_limited_greedy``)."""
        if self.group_key is None:
            return 1
        if self.group_score == "max" and getattr(config, "topk_method", None) != "group_limited_greedy":
            return 1
        return int(getattr(config, self.group_key, 1) or 1)

    def min_per_group(self, config) -> int:
        """Fewest experts a routing group may hold: DeepSeek-V3 scores a group by its best two."""
        return 2 if self.expert_groups(config) > 1 and self.group_score == "top2" else 1

    # ---- config ----------------------------------------------------------------------------------------------
    def num_experts(self, config) -> int:
        for key in self.num_experts_keys:
            value = getattr(config, key, None)
            if value:
                return int(value)
        raise MoemergeError(f"config of {config.model_type!r} has none of {self.num_experts_keys}")

    def top_k(self, config) -> int:
        value = getattr(config, self.top_k_key)
        if isinstance(value, (list, tuple)):  # HunYuan's per-layer moe_topk
            if len(set(value)) != 1:
                raise MoemergeError(f"{self.name}: per-layer {self.top_k_key}={list(value)} differ; moemerge "
                                    f"supports one top-k for all layers")
            value = value[0]
        return int(value)

    def renormalizes(self, config) -> bool:
        if self.renormalize in ("always", "never"):
            return self.renormalize == "always"
        return bool(getattr(config, self.renormalize, False))

    # ---- routing -----------------------------------------------------------------------------------------------
    def routing(self, config) -> Routing:
        """The family's routing function for ``config`` (same for every MoE layer)."""
        groups = self.expert_groups(config)
        return Routing(
            top_k=self.top_k(config), scoring=self.scoring, renormalize=self.renormalizes(config),
            renorm_eps=self.renorm_eps,
            renorm_min=None if self.renorm_min_key is None else float(getattr(config, self.renorm_min_key)),
            scale=float(getattr(config, self.scale_key, 1.0) or 1.0) if self.scale_key else 1.0,
            n_group=groups, topk_group=int(getattr(config, self.topk_group_key, 1) or 1) if groups > 1 else 1,
            group_score=self.group_score, sorted_topk=self.sorted_topk, topk_first=self.topk_first)

    def route(self, logits: torch.Tensor, config, bias: torch.Tensor | None = None,
              allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [T, k], indices [T, k])`` exactly as the family's router hands them to its experts, for router
        logits ``[T, E]`` (possibly of modified router rows), with the layer's score-correction ``bias`` if the
        family has one (see :class:`Routing`)."""
        return self.routing(config)(logits, bias, allowed)

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
    def router_weight(self) -> nn.Parameter:
        """The router's ``[E, H]`` weight (``router.weight``; HunYuan's ``gate.wg.weight``)."""
        return _get_path(self.router, self.family.router_weight)

    def set_router_weight(self, rows: torch.Tensor) -> None:
        """Replace the router's weight by ``rows [E', H]`` (same dtype and device as the old one)."""
        old = self.router_weight
        _set_path(self.router, self.family.router_weight,
                  nn.Parameter(rows.to(device=old.device, dtype=old.dtype).contiguous(), requires_grad=False))

    @property
    def choice_bias(self) -> torch.Tensor | None:
        """The score-correction bias ``[E]`` (fp32 view) that the router adds to the scores for the choice, or None."""
        if self.family.choice_bias is None:
            return None
        return _get_path(self.block, self.family.choice_bias).detach().reshape(-1)

    def set_choice_bias(self, values: torch.Tensor) -> None:
        """Replace the score-correction bias by ``values [E']``, keeping its leading dimensions (ERNIE's is
        ``[1, E]``), dtype, device and kind (buffer or parameter), so it saves under its own key."""
        path = self.family.choice_bias
        old = _get_path(self.block, path)
        new = values.to(device=old.device, dtype=old.dtype).reshape(*old.shape[:-1], -1).contiguous()
        _set_path(self.block, path, nn.Parameter(new, requires_grad=False) if isinstance(old, nn.Parameter) else new)

    def route(self, logits: torch.Tensor, config, allowed: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's routing of ``logits [T, E]`` (its own score-correction bias included)."""
        return self.family.route(logits, config, self.choice_bias, allowed)

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


def _get_path(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _set_path(module: nn.Module, path: str, value) -> None:
    """Set a dotted attribute; a plain tensor replacing a buffer stays a registered buffer (so it is saved)."""
    *parents, last = path.split(".")
    for part in parents:
        module = getattr(module, part)
    if isinstance(value, nn.Parameter) or last not in module._buffers:
        setattr(module, last, value)
    else:
        module._buffers[last] = value


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
# Softmax → top-k (→ renormalise), fused experts, no bias: Mixtral, Qwen2/3-MoE, Qwen3-Next, OLMoE, HunYuan.
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
# Qwen3-Next: hybrid attention (gated DeltaNet linear attention on 3 layers of 4, gated full attention on the 4th)
# around a Qwen2-MoE-style block (shared expert with a sigmoid gate, softmax top-k, norm_topk_prob).
FAMILIES.add("qwen3_next", FamilySpec("qwen3_next", ("qwen3_next",), ("num_experts",),
                                      shared_attrs=("shared_expert", "shared_expert_gate"),
                                      renormalize="norm_topk_prob",
                                      tiny={"intermediate_size": 64, "moe_intermediate_size": 24, "num_experts": 8,
                                            "num_experts_per_tok": 2, "shared_expert_intermediate_size": 32,
                                            "norm_topk_prob": True, "head_dim": 16, "num_attention_heads": 2,
                                            "linear_num_key_heads": 2, "linear_num_value_heads": 2,
                                            "linear_key_head_dim": 8, "linear_value_head_dim": 8,
                                            "layer_types": ["linear_attention", "full_attention"],
                                            "decoder_sparse_step": 1, "mlp_only_layers": []}))
FAMILIES.add("olmoe", FamilySpec("olmoe", ("olmoe",), ("num_experts",), renormalize="norm_topk_prob",
                                 tiny={"intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 2,
                                       "norm_topk_prob": False}))
# HunYuan-MoE-V1: the router's weight is gate.wg.weight (kept in fp32), a shared MLP of intermediate_size is added
# to every MoE output, top-k (moe_topk) renormalised always.
FAMILIES.add("hunyuan_v1_moe", FamilySpec("hunyuan_v1_moe", ("hunyuan_v1_moe",), ("num_experts",),
                                          top_k_key="moe_topk", router_weight="wg.weight",
                                          shared_attrs=("shared_mlp",),
                                          tiny={"intermediate_size": 24, "num_experts": 8, "moe_topk": 2,
                                                "head_dim": 16, "use_qk_norm": True}))
_DEEPSEEK_TINY = {"intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 3, "n_routed_experts": 8,
                  "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 1,
                  "topk_group": 1, "q_lora_rank": None, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
                  "qk_nope_head_dim": 8, "v_head_dim": 8, "routed_scaling_factor": 2.0, "num_key_value_heads": 2}
# DeepSeek-V2: softmax scores, greedy or group-limited (best score per group) top-k, never renormalised,
# × routed_scaling_factor. Dense first layers are skipped.
FAMILIES.add("deepseek_v2", FamilySpec("deepseek_v2", ("deepseek_v2",), ("n_routed_experts", "num_experts"),
                                       shared_attrs=("shared_experts",), renormalize="never", group_key="n_group",
                                       group_score="max", scale_key="routed_scaling_factor", sorted_topk=False,
                                       tiny={**_DEEPSEEK_TINY, "topk_method": "greedy"}))
# DeepSeek-V3 (and Kimi-K2), GLM-4.5 (glm4_moe), dots.llm1 (dots1): the same router: sigmoid scores, the
# score-correction bias for the choice only, groups scored by their best two, norm_topk_prob with +1e-20,
# × routed_scaling_factor.
_SIGMOID_GROUPED = dict(shared_attrs=("shared_experts",), scoring="sigmoid", renormalize="norm_topk_prob",
                        renorm_eps=1e-20, choice_bias="gate.e_score_correction_bias", group_key="n_group",
                        scale_key="routed_scaling_factor", sorted_topk=False)
FAMILIES.add("deepseek_v3", FamilySpec("deepseek_v3", ("deepseek_v3",), ("n_routed_experts", "num_local_experts"),
                                       tiny={**_DEEPSEEK_TINY, "norm_topk_prob": True}, **_SIGMOID_GROUPED))
_GLM_TINY = {"intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 3, "n_routed_experts": 8,
             "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 1,
             "topk_group": 1, "routed_scaling_factor": 2.0, "norm_topk_prob": True, "head_dim": 16}
FAMILIES.add("glm4_moe", FamilySpec("glm4_moe", ("glm4_moe",), ("n_routed_experts",),
                                    tiny={**_GLM_TINY, "use_qk_norm": True}, **_SIGMOID_GROUPED))
FAMILIES.add("dots1", FamilySpec("dots1", ("dots1",), ("n_routed_experts",),
                                 tiny={**_GLM_TINY, "norm_topk_prob": False}, **_SIGMOID_GROUPED))
# ERNIE-4.5-MoE: softmax scores, the correction bias [1, E] (gate.moe_statics) for the choice, weights from the
# softmax renormalised with a floor (moe_norm_min); MoE layers from moe_layer_start_index every moe_layer_interval.
FAMILIES.add("ernie4_5_moe", FamilySpec("ernie4_5_moe", ("ernie4_5_moe",), ("moe_num_experts",), top_k_key="moe_k",
                                        shared_attrs=("shared_experts",), renorm_min_key="moe_norm_min",
                                        choice_bias="gate.moe_statics.e_score_correction_bias",
                                        tiny={"intermediate_size": 64, "moe_intermediate_size": 16,
                                              "moe_num_experts": 8, "moe_k": 2, "moe_num_shared_experts": 1,
                                              "moe_layer_start_index": 0, "head_dim": 16}))
# MiniMax-M2: sigmoid scores, a correction bias held by the MoE block (mlp.e_score_correction_bias) for the choice,
# always renormalised, no shared expert.
FAMILIES.add("minimax_m2", FamilySpec("minimax_m2", ("minimax_m2",), ("num_local_experts",), scoring="sigmoid",
                                      choice_bias="e_score_correction_bias", sorted_topk=False,
                                      tiny={"intermediate_size": 24, "num_local_experts": 8,
                                            "num_experts_per_tok": 2, "head_dim": 16}))
# Granite-MoE (and Granite-MoE-Shared, whose shared MLP sits beside the block in the decoder layer): block
# ``block_sparse_moe`` with router ``router``; top-k of the logits, then softmax over those k.
_GRANITE = dict(num_experts_keys=("num_local_experts",), block_attr="block_sparse_moe", router_attr="router",
                topk_first=True)
_GRANITE_TINY = {"intermediate_size": 24, "num_local_experts": 8, "num_experts_per_tok": 2}
FAMILIES.add("granitemoe", FamilySpec("granitemoe", ("granitemoe",), tiny=_GRANITE_TINY, **_GRANITE))
FAMILIES.add("granitemoeshared", FamilySpec("granitemoeshared", ("granitemoeshared",),
                                            tiny={**_GRANITE_TINY, "shared_intermediate_size": 32}, **_GRANITE))

#: MoE causal LMs of transformers 5.23 that moemerge refuses, with the reason (read from their modeling code):
#: :func:`family_of` names it before any weight is read. Supporting one exactly needs more than a FamilySpec.
REFUSED: dict[str, str] = {
    "gpt_oss": "its experts carry biases and a clamped SwiGLU (gate and up interleaved, transposed [E, H, 2I]) and its "
               "router has a bias; moemerge's merge methods and formats handle bias-free fused SwiGLU experts only",
    "llama4_text": "its router's sigmoid scores multiply the experts' input (not their output) and every expert runs "
                   "on every token in a transposed [E, H, 2I] layout; merging by routed output would not be exact",
    "phimoe": "its sparsemixer routing (two-pass top-2 with a jitter-threshold mask) is not one of moemerge's routing "
              "functions, so calibration, re-routing and fitted routers would not be the model's own",
    "dbrx": "its experts are three [E*I, H] matrices (w1, v1, w2) and its router sits at router.layer, not the fused "
            "gate_up_proj / down_proj layout moemerge merges",
    "jetmoe": "its expert count also sizes its mixture-of-attention experts, so the MLP experts cannot be reduced "
              "alone",
}
REFUSED["llama4"] = REFUSED["llama4_text"]  # the multimodal wrapper's text model


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
            layer.router_weight.normal_(0, 0.5)
            if spec.choice_bias is not None:
                _get_path(layer.block, spec.choice_bias).normal_(0, 0.1)
    return model


def family_of(config) -> FamilySpec:
    """The family spec for a config, or a one-line error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise MoemergeError(f"model_type {model_type!r} is not supported: {REFUSED[model_type]}")
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
