"""Formats that really shrink the checkpoint: ``mapped``, ``lowrank`` (shipped modeling code) and ``padded``
(stock, non-uniform counts padded to the largest).

* ``mapped``: the router keeps its N rows (routing exactly as ``keep``); each MoE layer stores only its E' merged
  experts and ``config.expert_map[layer]`` (original expert -> merged expert). E' may differ between layers. The
  modeling code (:mod:`.remote.modeling_moemerge`) is copied into the checkpoint; load it with
  ``trust_remote_code=True``.
* ``lowrank``: as ``mapped``, with each merged matrix stored as two factors (Sub-MoE†, ``MergedLayer.factors``).
* ``padded``: stock format; every layer gets as many slots as the largest layer has groups; extra slots split a
  group's router rows (:func:`.router_fit.split_slots`) and hold copies of its merged expert.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..errors import MoemergeError
from ..families import MoeLayer
from ..group.plan import LayerPlan
from ..merge import MergedLayer
from .formats import FORMATS, Format, _set_param, adapt_rows, merged_bias, set_count
from .router_fit import split_slots

REMOTE_DIR = Path(__file__).resolve().parent / "remote"
REMOTE_FILE = "modeling_moemerge.py"


def check_family(family: str, fmt: str, experts: nn.Module | None = None) -> None:
    """The shipped modeling code replaces a family's fused experts module in place (sizes, activation and biases from
    it), so every family whose experts compute ``down(act(gate(x)) * up(x))`` from the stock fused layout and are
    called as ``experts(hidden_states, top_k_index, top_k_weights)`` is covered; others are refused in one line.
    Called before calibration (on the skeleton's experts, no weight read) and again at apply time."""
    if experts is None:
        return
    from .remote.modeling_moemerge import _has_bias, experts_problem

    problem = experts_problem(experts)
    if problem is None and _has_bias(experts):
        problem = "its experts carry biases, which moemerge's merge methods do not produce"
    if problem is not None:
        raise MoemergeError(f"--format {fmt} cannot map {family}: {problem}; use --format keep, compact or padded")


def _new_experts(layer: MoeLayer, plan: LayerPlan, fmt: str, ranks: dict[str, int] | None = None) -> nn.Module:
    """Mapped experts shaped after the layer's stock experts module (sizes, activation, dtype, device)."""
    check_family(layer.family.name, fmt, layer.experts)
    from .remote.modeling_moemerge import mapped_experts  # imports transformers' modeling: only when writing

    return mapped_experts(plan.group_of(), layer.experts, ranks)


def apply_mapped(layer: MoeLayer, plan: LayerPlan, merged: MergedLayer, frequency: torch.Tensor,
                 adapt: str = "mean", inputs: torch.Tensor | None = None) -> None:
    """Replace the layer's experts with its G merged experts plus the map original -> merged; router untouched."""
    old = layer.experts
    experts = _new_experts(layer, plan, "mapped")
    experts.gate_up_proj = nn.Parameter(merged.gate_up.to(old.gate_up_proj).contiguous(), requires_grad=False)
    experts.down_proj = nn.Parameter(merged.down.to(old.down_proj).contiguous(), requires_grad=False)
    setattr(layer.block, layer.family.experts_attr, experts)


def exact_factors(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [O, r], B [r, I])`` with ``A @ B == matrix`` up to rounding, r = min(O, I) (a group without factors)."""
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return u * s, vh


def _pad_rank(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero-pad factor ``t`` along its rank dimension: extra rank-one terms 0 * 0 add nothing (exact)."""
    pad = rank - t.shape[dim]
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def stack_factors(merged: MergedLayer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per matrix kind, ``(a [G, O, r], b [G, r, I])`` with every group padded to the layer's largest rank."""
    if merged.factors is None:
        raise MoemergeError("--format lowrank needs low-rank factors from the merge method (e.g. --merge sub-moe "
                            "with --rank-ratio)")
    inter = merged.down.shape[2]
    dense = {"gate": merged.gate_up[:, :inter], "up": merged.gate_up[:, inter:], "down": merged.down}
    out = {}
    for name in ("gate", "up", "down"):
        pairs = [(f or {}).get(name) or exact_factors(dense[name][g]) for g, f in enumerate(merged.factors)]
        rank = max(a.shape[1] for a, _ in pairs)
        a = torch.stack([_pad_rank(a.to(torch.float64), rank, 1) for a, _ in pairs])
        b = torch.stack([_pad_rank(b.to(torch.float64), rank, 0) for _, b in pairs])
        out[name] = (a, b)
    return out


def apply_lowrank(layer: MoeLayer, plan: LayerPlan, merged: MergedLayer, frequency: torch.Tensor,
                  adapt: str = "mean", inputs: torch.Tensor | None = None) -> None:
    """As :func:`apply_mapped`, storing each merged matrix as its two factors."""
    like = layer.experts.gate_up_proj
    factors = stack_factors(merged)
    experts = _new_experts(layer, plan, "lowrank", {name: int(a.shape[2]) for name, (a, _) in factors.items()})
    for name, (a, b) in factors.items():
        setattr(experts, f"{name}_a", nn.Parameter(a.to(like).contiguous(), requires_grad=False))
        setattr(experts, f"{name}_b", nn.Parameter(b.to(like).contiguous(), requires_grad=False))
    setattr(layer.block, layer.family.experts_attr, experts)


def apply_padded(layer: MoeLayer, plan: LayerPlan, merged: MergedLayer, frequency: torch.Tensor,
                 adapt: str = "mean", inputs: torch.Tensor | None = None, num_slots: int | None = None) -> None:
    """Stock layout with ``num_slots`` experts: slots split groups' router rows and copy their merged expert."""
    slots, owner = split_slots(plan.groups, frequency, num_slots or plan.num_groups)
    rows = adapt_rows(adapt, layer.router_weight.data, slots, frequency, inputs, layer.family.scoring)
    index = torch.tensor(owner, device=merged.gate_up.device)
    _set_param(layer.experts, "gate_up_proj", merged.gate_up[index])
    _set_param(layer.experts, "down_proj", merged.down[index])
    layer.set_router_weight(rows)
    merged_bias(layer, slots, frequency)  # a split-off slot keeps its member's bias; a shared one the mean
    set_count(layer, len(slots))


FORMATS.add("mapped", Format(apply_mapped, changes_count=False, supports_dropping=False, remote_code=True,
                             description="router keeps all rows, per-layer map to only the merged experts "
                                         "(exact, smallest; needs trust_remote_code)"))
FORMATS.add("lowrank", Format(apply_lowrank, changes_count=False, supports_dropping=False, remote_code=True,
                              description="mapped with low-rank factors per merged matrix (Sub-MoE†; needs "
                                          "trust_remote_code)"))
FORMATS.add("padded", Format(apply_padded, changes_count=True, supports_dropping=True, padded=True,
                             description="stock; every layer padded to the largest count with slots that split "
                                         "a group's router rows"))


# ---- saving ------------------------------------------------------------------------------------------------------
def remote_config(spec, config: dict, mapped: dict[int, dict]) -> tuple[dict, dict[str, str]]:
    """For a model with mapped layers (``mapped[layer] = {"expert_map": [...], "ranks": {...} | None}``): the config
    to write (original + model_type, architectures, auto_map, expert_map, expert_ranks) and the modeling file shipped
    beside it for users of ``trust_remote_code`` (moemerge itself loads these checkpoints through its installed
    classes, never through that file)."""
    from .remote.modeling_moemerge import mapped_classes

    base_type = config["model_type"]
    if base_type not in spec.model_types:
        raise MoemergeError(f"model_type {base_type!r} is not one of family {spec.name}'s {spec.model_types}")
    config_cls, model_cls = mapped_classes(base_type)
    module = REMOTE_FILE.removesuffix(".py")
    new = dict(config)
    new.update(model_type=config_cls.model_type, architectures=[model_cls.__name__],
               auto_map={"AutoConfig": f"{module}.{config_cls.__name__}",
                         "AutoModelForCausalLM": f"{module}.{model_cls.__name__}"},
               expert_map={str(i): list(m["expert_map"]) for i, m in sorted(mapped.items())})
    ranks = {str(i): m["ranks"] for i, m in sorted(mapped.items()) if m.get("ranks")}
    if ranks:
        new["expert_ranks"] = ranks
    else:
        new.pop("expert_ranks", None)
    return new, {REMOTE_FILE: (REMOTE_DIR / REMOTE_FILE).read_text()}


_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.")


def check_expert_ids(keys: list[str]) -> None:
    """Per-expert checkpoint keys must use ids 0..E'-1 in every layer (vLLM indexes its fused tensors by id)."""
    ids: dict[str, set[int]] = {}
    for k in keys:
        m = _EXPERT_KEY.match(k)
        if m:
            ids.setdefault(m.group(1), set()).add(int(m.group(2)))
    for prefix, found in ids.items():
        if sorted(found) != list(range(len(found))):
            raise MoemergeError(f"{prefix}: expert ids are not contiguous 0..{len(found) - 1}: {sorted(found)[:8]}")
