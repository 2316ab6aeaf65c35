"""How merged experts are put back into the model (``router``), and how a collapsed router row is made
(``router_adapt``).

* ``keep`` (HC-SMoE, MC-SMoE, REAP): every original router row stays and every original expert slot holds its
  group's merged expert. Top-k still runs over the N original logits and the weights of slots that share a merged
  expert add up, so routing is exactly the original. Stock-loadable, same size.
* ``collapse`` (alias ``compact``): one expert and one router row per group; the config's expert count shrinks.
  Stock-loadable and smaller, but the router is approximated (a group's probability is no longer the sum of its
  members'); ``router_adapt`` chooses how the row is made (see :mod:`.router_fit`).
* ``padded`` (:mod:`.router_fit`), ``mapped`` and ``lowrank`` (:mod:`.mapped`): see ``docs/formats.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MoemergeError
from ..families import MoeLayer
from ..group.plan import LayerPlan, MergePlan
from ..merge import MergedLayer, frequency_weights
from ..registry import Registry


@dataclass(frozen=True)
class Format:
    """``apply(layer, plan, merged: MergedLayer, frequency [E], router_adapt name, inputs=[S, H] | None)``.

    ``padded``: the count written to the config is the largest per-layer count (layers are padded to it) rather than
    one uniform count. ``remote_code``: the checkpoint ships modeling code (load with ``trust_remote_code=True``).
    """

    apply: Callable[..., None]
    changes_count: bool
    supports_dropping: bool
    description: str
    padded: bool = False
    remote_code: bool = False


FORMATS: Registry[Format] = Registry("router")
# (router rows of the members [n, H], their frequencies [n]) -> one row [H]
ROUTER_ADAPT: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("router_adapt")


def adapt_rows(name: str, weight: torch.Tensor, slots: list[list[int]], frequency: torch.Tensor,
               inputs: torch.Tensor | None = None, scoring: str = "softmax") -> torch.Tensor:
    """One router row per slot ``[G, H]`` (fp64) from the original rows ``weight [N, H]`` with ``router_adapt``
    ``name``. Per-group entries take ``(rows [n, H], frequency [n]) -> [H]``; entries with ``needs_inputs`` work on
    the whole layer with calibration router inputs and the family's ``scoring`` (softmax or sigmoid). If every slot
    is one original row, the rows are copied (exact)."""
    fn = ROUTER_ADAPT.get(name)
    if all(len(s) == 1 for s in slots):
        return weight[[s[0] for s in slots]].to(torch.float64)
    if getattr(fn, "needs_inputs", False):
        return fn(weight, slots, frequency, inputs, scoring=scoring)
    return torch.stack([fn(weight[s], frequency[s]) for s in slots])


@ROUTER_ADAPT.register("mean")
def mean_row(rows: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Frequency-weighted mean of the members' router rows."""
    alpha = frequency_weights(frequency).to(torch.float64)
    return (alpha[:, None] * rows.to(torch.float64)).sum(0)


def merged_bias(layer: MoeLayer, slots: list[list[int]], frequency: torch.Tensor) -> None:
    """Cut the layer's score-correction bias (DeepSeek-V3 and kin) in lockstep with its router rows: one entry per
    slot, the frequency-weighted mean of its members' (a slot of one expert keeps that expert's bias exactly)."""
    old = layer.choice_bias
    if old is None:
        return
    values = [(frequency_weights(frequency[s]).to(old) * old[s]).sum() for s in slots]
    layer.set_choice_bias(torch.stack(values))


def set_count(layer: MoeLayer, count: int) -> None:
    """The modules' own expert counts, for the code that reads them at run time (one-hot sizes, group views)."""
    for module in (layer.experts, layer.router, layer.block):
        if hasattr(module, "num_experts"):
            module.num_experts = count


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.to(device=old.device, dtype=old.dtype).contiguous(),
                                       requires_grad=False))


def apply_keep(layer: MoeLayer, plan: LayerPlan, merged: MergedLayer, frequency: torch.Tensor,
               adapt: str = "mean", inputs: torch.Tensor | None = None) -> None:
    index = torch.tensor(plan.group_of(), device=merged.gate_up.device)
    _set_param(layer.experts, "gate_up_proj", merged.gate_up[index])
    _set_param(layer.experts, "down_proj", merged.down[index])


def apply_collapse(layer: MoeLayer, plan: LayerPlan, merged: MergedLayer, frequency: torch.Tensor,
                   adapt: str = "mean", inputs: torch.Tensor | None = None) -> None:
    weight = layer.router_weight.data
    rows = adapt_rows(adapt, weight, plan.groups, frequency, inputs, layer.family.scoring)
    _set_param(layer.experts, "gate_up_proj", merged.gate_up)
    _set_param(layer.experts, "down_proj", merged.down)
    layer.set_router_weight(rows)
    merged_bias(layer, plan.groups, frequency)
    set_count(layer, plan.num_groups)


FORMATS.add("keep", Format(apply_keep, changes_count=False, supports_dropping=False,
                           description="all router rows kept; slots share their group's merged expert (exact)"))
FORMATS.add("collapse", Format(apply_collapse, changes_count=True, supports_dropping=True,
                               description="one expert and router row per group (smaller, stock-loadable)"))
# The name used in docs/formats.md; same format object, so both names keep working.
FORMATS.add("compact", FORMATS.get("collapse"))


def check_plan(plan: MergePlan, router: str, top_k: int) -> None:
    """Refuse, before any work is written, a plan that the chosen format cannot save as a loadable model."""
    fmt = FORMATS.get(router)
    if not fmt.supports_dropping and any(p.dropped for p in plan.layers.values()):
        raise MoemergeError(f"router={router} keeps every expert slot, so it cannot drop experts; use "
                            f"--router collapse for pruning")
    if fmt.changes_count:
        counts = set(plan.counts().values())
        if len(counts) > 1 and not fmt.padded:
            raise MoemergeError(f"router={router} needs the same expert count in every MoE layer (stock configs "
                                f"hold one count), got {sorted(counts)}; use --format padded, mapped or keep")
        slots = max(counts) if fmt.padded else min(counts)  # padded layers all get max(counts) slots
        if slots < top_k:
            raise MoemergeError(f"{slots} experts per layer is below the model's top-k ({top_k})")


from . import mapped, router_fit  # noqa: E402,F401  (register the mapped/lowrank/padded formats and fitted routers)
