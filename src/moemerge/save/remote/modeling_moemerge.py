"""Modeling code shipped inside moemerge checkpoints saved with ``--format mapped`` or ``--format lowrank``.

Load such a checkpoint with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.

One implementation serves every MoE family of transformers whose experts are one fused module
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) called as ``experts(hidden_states, top_k_index,
top_k_weights)``. For a config of model type ``<base>_mapped`` the model is the stock ``<base>`` causal LM, found
through transformers' auto mappings, with, in every layer that ``config.expert_map`` names, the fused experts module
replaced by a mapped one that takes its sizes, activation and biases from the stock module it replaces:

* the router (and the whole block) stays the family's own: it keeps all N original rows, so top-k (softmax or
  sigmoid, score-correction bias, group-limited choice, scaling) runs over the original N logits exactly as before;
* ``config.expert_map[layer][e]`` is the merged expert that original expert ``e`` became; the top-k weights of slots
  that map to the same merged expert are added (scatter-add), and each merged expert that was hit runs once on its
  tokens. This is exactly the HC-SMoE / MC-SMoE routing rule, with E' < N experts stored per layer (E' may differ
  between layers);
* ``config.expert_ranks[layer]`` (lowrank only): each merged matrix is stored as two factors ``A [O, r] @ B [r, I]``.

Class names follow the stock ones: ``MixtralConfig`` / ``MixtralForCausalLM`` give ``MixtralMappedConfig`` /
``MixtralMappedForCausalLM`` (model type ``mixtral_mapped``). They are built on first use (module ``__getattr__``),
so this one file serves any family without a table of families.

Per-expert tensors are saved under the family's hub names (``experts.{i}.w1.weight`` / ``gate_proj.weight``)
through ``register_checkpoint_conversion_mapping`` with the stock family's mapping; low-rank factors are saved fused
(``experts.gate_a`` ...). This file depends on torch and transformers only.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

MAPPED_SUFFIX = "_mapped"
_FACTOR_NAMES = ("gate", "up", "down")
_CALL_ARGS = 3  # experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])


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


# ---- what a stock experts module must look like ------------------------------------------------------------------
def _default_gate() -> object | None:
    """transformers' default ``act(gate) * up`` gate of fused experts (None if this version has no such hook)."""
    try:
        from transformers.integrations import moe
    except ImportError:
        return None
    return getattr(moe, "_default_apply_gate", None)


def experts_problem(stock: nn.Module) -> str | None:
    """Why the mapped experts cannot replace ``stock`` (a family's fused experts module), or None when they can.

    The mapped experts compute ``down(act(gate(x)) * up(x))`` (+ biases) from ``gate_up_proj [E, 2I, H]`` (gate rows
    first) and ``down_proj [E, H, I]``, and are called exactly as the stock module is, with the block's top-k over
    the N original experts. Anything else (no gate, interleaved gate/up rows, transposed weights, a custom gate such
    as a clamped SwiGLU, a norm after each expert, another call signature) would compute something else.
    """
    gate_up, down = getattr(stock, "gate_up_proj", None), getattr(stock, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
            and gate_up.dim() == 3 and down.dim() == 3):
        return "its experts are not one fused module with 3-D gate_up_proj and down_proj tensors"
    if not getattr(stock, "has_gate", True):
        return "its experts have no gate projection (up_proj only)"
    if not getattr(stock, "is_concatenated", True):
        return "its experts interleave gate and up rows"
    if getattr(stock, "is_transposed", False):
        return "its expert weights are stored transposed ([E, in, out])"
    if getattr(stock, "has_post_expert_norm", False):
        return "its experts apply a norm after each expert"
    gate = getattr(type(stock), "_apply_gate", None)
    default = _default_gate()
    if gate is not None and default is not None and gate is not default:
        return f"its experts use their own gate function ({type(stock).__name__}._apply_gate), not act(gate) * up"
    experts, inter2, hidden = gate_up.shape
    if tuple(down.shape) != (experts, hidden, inter2 // 2) or inter2 % 2:
        return f"its experts' shapes gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)} are not " \
               f"[E, 2I, H] / [E, H, I]"
    if _has_bias(stock):
        gub, db = getattr(stock, "gate_up_proj_bias", None), getattr(stock, "down_proj_bias", None)
        if not (isinstance(gub, torch.Tensor) and isinstance(db, torch.Tensor)
                and tuple(gub.shape) == (experts, inter2) and tuple(db.shape) == (experts, hidden)):
            return "its experts have biases other than gate_up_proj_bias [E, 2I] and down_proj_bias [E, H]"
    params = list(inspect.signature(type(stock).forward).parameters.values())[1:]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) != _CALL_ARGS or any(p.kind not in positional for p in params):
        names = ", ".join(p.name for p in params)
        return f"its experts are called as experts({names}), not experts(hidden_states, top_k_index, top_k_weights)"
    return None


def _has_bias(stock: nn.Module) -> bool:
    return bool(getattr(stock, "has_bias", False)) or isinstance(getattr(stock, "gate_up_proj_bias", None),
                                                                 torch.Tensor)


# ---- mapped experts ----------------------------------------------------------------------------------------------
class _MappedBase(nn.Module):
    """Shared routing part: original top-k -> merged experts hit; subclasses implement ``_expert(x, e)``.

    With ``bias=True`` the merged experts carry ``gate_up_proj_bias [E', 2I]`` and ``down_proj_bias [E', H]`` (the
    stock names, so they save and load under the family's own keys).
    """

    def __init__(self, expert_map: list[int], hidden_size: int, intermediate_size: int, act: str | nn.Module,
                 bias: bool = False, dtype: torch.dtype | None = None, device: torch.device | str | None = None
                 ) -> None:
        super().__init__()
        self.num_experts = int(max(expert_map)) + 1
        self.num_slots = len(expert_map)
        self.hidden_size, self.intermediate_size = int(hidden_size), int(intermediate_size)
        # Configuration (config.expert_map), not a weight: kept as a list, so meta-device initialisation in
        # from_pretrained cannot leave it uninitialised (a non-persistent buffer would be), and made a tensor on use.
        self.expert_map_list = [int(e) for e in expert_map]
        self._map_cache: torch.Tensor | None = None
        self.act_fn = ACT2FN[act] if isinstance(act, str) else act
        self.has_bias = bool(bias)
        self._factory = {"dtype": dtype, "device": device}
        if self.has_bias:
            self.gate_up_proj_bias = self._param(self.num_experts, 2 * self.intermediate_size)
            self.down_proj_bias = self._param(self.num_experts, self.hidden_size)

    def _param(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, **self._factory))

    @property
    def expert_map(self) -> torch.Tensor:
        """``[N]`` long: merged expert of each original expert, on the parameters' device."""
        device = next(self.parameters()).device
        if self._map_cache is None or self._map_cache.device != device:
            self._map_cache = torch.tensor(self.expert_map_list, dtype=torch.long, device=device)
        return self._map_cache

    def _bias(self, name: str, e: int, lo: int | None = None, hi: int | None = None) -> torch.Tensor | None:
        return getattr(self, name)[e, lo:hi] if self.has_bias else None

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

    def __init__(self, expert_map: list[int], hidden_size: int, intermediate_size: int, act: str | nn.Module,
                 bias: bool = False, dtype: torch.dtype | None = None, device: torch.device | str | None = None
                 ) -> None:
        super().__init__(expert_map, hidden_size, intermediate_size, act, bias, dtype, device)
        self.gate_up_proj = self._param(self.num_experts, 2 * self.intermediate_size, self.hidden_size)
        self.down_proj = self._param(self.num_experts, self.hidden_size, self.intermediate_size)

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        gate_up = nn.functional.linear(x, self.gate_up_proj[e], self._bias("gate_up_proj_bias", e))
        gate, up = gate_up.chunk(2, dim=-1)
        return nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e], self._bias("down_proj_bias", e))


class LowRankMappedExperts(_MappedBase):
    """E' merged experts whose gate, up and down matrices are products ``a [E', O, r] @ b [E', r, I]``.

    Ranks are per layer and per matrix kind (experts with a smaller rank are zero-padded: exact). Biases, if the
    family's experts have them, are stored whole (``gate_up_proj_bias``, ``down_proj_bias``).
    """

    def __init__(self, expert_map: list[int], hidden_size: int, intermediate_size: int, act: str | nn.Module,
                 ranks: dict[str, int], bias: bool = False, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(expert_map, hidden_size, intermediate_size, act, bias, dtype, device)
        n, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        shapes = {"gate": (i, h), "up": (i, h), "down": (h, i)}
        for name in _FACTOR_NAMES:
            out_dim, in_dim = shapes[name]
            r = int(ranks[name])
            setattr(self, f"{name}_a", self._param(n, out_dim, r))
            setattr(self, f"{name}_b", self._param(n, r, in_dim))

    def _lin(self, x: torch.Tensor, name: str, e: int, bias: torch.Tensor | None) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, getattr(self, f"{name}_b")[e]),
                                    getattr(self, f"{name}_a")[e], bias)

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        i = self.intermediate_size
        gate = self._lin(x, "gate", e, self._bias("gate_up_proj_bias", e, 0, i))
        up = self._lin(x, "up", e, self._bias("gate_up_proj_bias", e, i, 2 * i))
        return self._lin(self.act_fn(gate) * up, "down", e, self._bias("down_proj_bias", e))


def mapped_experts(expert_map: list[int], stock: nn.Module, ranks: dict[str, int] | None = None) -> _MappedBase:
    """The mapped (or, with ``ranks``, low-rank) experts replacing the family's fused experts module ``stock``: sizes,
    activation module, biases, dtype and device come from ``stock`` (raises ValueError if it cannot be replaced)."""
    problem = experts_problem(stock)
    if problem is not None:
        raise ValueError(f"{type(stock).__name__} cannot be mapped: {problem}")
    _, inter2, hidden = stock.gate_up_proj.shape
    like = {"dtype": stock.gate_up_proj.dtype, "device": stock.gate_up_proj.device}
    if ranks:
        return LowRankMappedExperts(expert_map, hidden, inter2 // 2, stock.act_fn, ranks, _has_bias(stock), **like)
    return MappedExperts(expert_map, hidden, inter2 // 2, stock.act_fn, _has_bias(stock), **like)


def fused_experts(decoder_layer: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """``(parent, attribute, module)`` of the one fused routed-experts module of a decoder layer: the submodule with a
    3-D ``gate_up_proj`` (shared experts are plain MLPs with 2-D weights)."""
    found = [(name, module) for name, module in decoder_layer.named_modules()
             if isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) and module.gate_up_proj.dim() == 3]
    if len(found) != 1:
        raise ValueError(f"expected one fused experts module in {type(decoder_layer).__name__}, found "
                         f"{[n for n, _ in found]}")
    name, module = found[0]
    parent_name, _, attr = name.rpartition(".")
    return decoder_layer.get_submodule(parent_name), attr, module


def install_mapped_experts(model: nn.Module, config) -> None:
    """Replace the fused experts of every layer that ``config.expert_map`` names by its mapped experts."""
    layers = getattr(model, model.base_model_prefix).layers
    ranks = getattr(config, "expert_ranks", None) or {}
    for key, expert_map in sorted((getattr(config, "expert_map", None) or {}).items(), key=lambda kv: int(kv[0])):
        parent, attr, stock = fused_experts(layers[int(key)])
        setattr(parent, attr, mapped_experts(expert_map, stock, ranks.get(str(key))))


# ---- per-family classes, built from transformers' auto mappings --------------------------------------------------
_CLASSES: dict[str, tuple[type, type]] = {}


def mapped_classes(base_model_type: str) -> tuple[type, type]:
    """``(config class, causal-LM class)`` of model type ``<base_model_type>_mapped``: the stock config plus
    ``expert_map`` / ``expert_ranks``, and the stock causal LM with the mapped experts installed. Built once per
    base type; also registers the stock family's checkpoint conversion for the new model type."""
    if base_model_type in _CLASSES:
        return _CLASSES[base_model_type]
    base_config = CONFIG_MAPPING[base_model_type]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
    model_type = base_model_type + MAPPED_SUFFIX

    def config_init(self, expert_map: dict | None = None, expert_ranks: dict | None = None, **kwargs) -> None:
        self.expert_map = expert_map
        self.expert_ranks = expert_ranks
        base_config.__init__(self, **kwargs)

    config_cls = type(base_config.__name__.replace("Config", "MappedConfig"), (base_config,),
                      {"model_type": model_type, "__init__": config_init, "__module__": __name__})

    def model_init(self, config) -> None:
        base_model.__init__(self, config)
        install_mapped_experts(self, config)
        self.post_init()

    model_cls = type(base_model.__name__.replace("ForCausalLM", "MappedForCausalLM"), (base_model,),
                     {"config_class": config_cls, "__init__": model_init, "__module__": __name__})
    # The custom model type gets no checkpoint conversion by default, so it would save fused keys and could not read
    # per-expert ones; registering the stock family's mapping gives it the hub names both ways.
    conversion = get_checkpoint_conversion_mapping(base_model_type)
    if conversion is not None:
        register_checkpoint_conversion_mapping(model_type, conversion, overwrite=True)
    _CLASSES[base_model_type] = (config_cls, model_cls)
    return config_cls, model_cls


def _base_type_of(class_name: str) -> tuple[str, int] | None:
    """``(base model type, 0 for the config class / 1 for the model class)`` of a mapped class name, looked up in
    transformers' name tables (no modeling module is imported to find it)."""
    for base_type in sorted(CONFIG_MAPPING_NAMES):
        lm_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(base_type)
        if not isinstance(lm_name, str) or base_type.endswith(MAPPED_SUFFIX):
            continue
        if CONFIG_MAPPING_NAMES[base_type].replace("Config", "MappedConfig") == class_name:
            return base_type, 0
        if lm_name.replace("ForCausalLM", "MappedForCausalLM") == class_name:
            return base_type, 1
    return None


def __getattr__(name: str) -> type:
    """``<Base>MappedConfig`` / ``<Base>MappedForCausalLM`` for any family (what ``auto_map`` names), built on use."""
    if name.endswith(("MappedConfig", "MappedForCausalLM")):
        found = _base_type_of(name)
        if found is not None:
            return mapped_classes(found[0])[found[1]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
