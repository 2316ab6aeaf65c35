"""Stage 3, merge: turn each group of experts into one expert.

A merge method is a pure function on tensors (registry :data:`MERGE`): it receives one group's stacked weights in
fp32 (``gate_up [n, 2I, H]``, ``down [n, H, I]``), the members' frequencies and the layer's statistics, and returns
one ``(gate_up [2I, H], down [H, I])``. :func:`merge_layer` applies it group by group and casts back to the model's
dtype once. Methods live one per file in this package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..calibrate import Stats
from ..families import MoeLayer
from ..group.plan import LayerPlan
from ..registry import Registry


@dataclass
class GroupInputs:
    """One group to merge. ``dominant`` is the dominant member's position in the group."""

    gate_up: torch.Tensor
    down: torch.Tensor
    frequency: torch.Tensor
    dominant: int = 0
    members: list[int] = field(default_factory=list)
    mode: str = "normal"
    layer: MoeLayer | None = None
    stats: Stats | None = None
    recipe: Any = None  # the run's Recipe, for methods with numeric options (e.g. sub-moe's rank_ratio, whiten)

    @property
    def size(self) -> int:
        return int(self.gate_up.shape[0])


@dataclass
class MergedExpert:
    """One merged expert. ``factors`` optionally holds low-rank factors ``{"gate"|"up"|"down": (A [O, r], B [r, I])}``
    with ``A @ B`` equal to the dense matrix (Sub-MoE†); formats that store factors use them."""

    gate_up: torch.Tensor
    down: torch.Tensor
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class MergedLayer:
    """A layer's merged experts in plan order: ``gate_up [G, 2I, H]``, ``down [G, H, I]`` in the model's dtype, and
    per-group factors when the method produced them."""

    gate_up: torch.Tensor
    down: torch.Tensor
    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]] | None] | None = None


@dataclass(frozen=True)
class MergeMethod:
    """``fn`` merges one group. ``needs`` names the statistics it reads; ``handles_singletons`` means groups of one
    must go through ``fn`` too (e.g. a low-rank method factorises every expert)."""

    fn: Callable[[GroupInputs], tuple[torch.Tensor, torch.Tensor] | MergedExpert]
    needs: tuple[str, ...] = ()
    description: str = ""
    handles_singletons: bool = False
    needs_for: Callable[[Any], tuple[str, ...]] | None = None  # extra statistics that depend on the recipe
    # Plan-aware pass (zipit, fix-dom-same, fit): ``layer_pass(ctx: LayerPass) -> {stats entry: value}``. Which
    # neurons to match or what to fit depends on the groups, so these statistics cannot come from the plan-independent
    # calibration: the executor calls this once the layer's plan is known, with the layer built and ``ctx.run``
    # pushing the layer's calibration inputs through it with the method's own accumulators hooked in.
    layer_pass: Callable[[LayerPass], dict[str, Any]] | None = None
    # ``check_mode(mode)`` raises ValueError for a mode the method does not have (None: the method has no modes).
    check_mode: Callable[[str], None] | None = None
    neuron_matching: bool = False  # takes ``ingredient`` and ``data_limit``

    def statistics(self, recipe: Any = None) -> tuple[str, ...]:
        """``needs`` plus what ``needs_for(recipe)`` adds (e.g. covariances only when whitening)."""
        extra = self.needs_for(recipe) if self.needs_for is not None and recipe is not None else ()
        return tuple(dict.fromkeys((*self.needs, *extra)))


@dataclass
class LayerPass:
    """What a plan-aware method sees of one layer: the built MoE layer, its plan, the layer's statistics, the recipe,
    and ``run(accumulators, until=None)``, which pushes the layer's calibration inputs through the layer with the
    accumulators (anything with ``update(LayerBatch)``) fed by the observer hooks, stopping early once ``until()``
    is true. Before each batch, an accumulator with a ``start_batch(window_ids)`` method is told the indices of the
    batch's windows among the whole job's (the same on any number of ranks: held-out splits), and ``layer_pass`` may
    return an ``info`` entry (small, JSON-able) that ``merge_info.json`` records for the layer."""

    layer: MoeLayer
    plan: LayerPlan
    stats: Stats
    recipe: Any
    run: Callable[..., None]
    # ``reduce(accumulators)``: combine accumulators fed outside ``run`` (e.g. replaying recorded batches) over the
    # ranks of a distributed job, as ``run`` does for its own; None: single process, nothing to combine.
    reduce: Callable[[list], None] | None = None


MERGE: Registry[MergeMethod] = Registry("merge")


def check_options(recipe: Any) -> None:
    """Raise ``ValueError`` (one line, naming the valid choices) for merge options the recipe's method does not take:
    ``mode`` (each method checks its own), ``ingredient`` and ``data_limit`` (neuron-matching methods only)."""
    merge = recipe.merge
    method = MERGE.get(merge)
    given = recipe.explicit()
    if method.check_mode is not None:
        method.check_mode(recipe.mode)
    elif "mode" in given:
        with_modes = ", ".join(m for m in MERGE if MERGE.get(m).check_mode is not None)
        raise ValueError(f"mode only applies to merge={with_modes} (merge is {merge!r})")
    matching = [m for m in MERGE if MERGE.get(m).neuron_matching]
    for name in ("ingredient", "data_limit"):
        if name in given and getattr(recipe, name) is not None and not method.neuron_matching:
            raise ValueError(f"{name} only applies to merge={' or '.join(matching)} (merge is {merge!r})")
    if "fit_scope" in given and merge != "fit":
        raise ValueError(f"fit_scope only applies to merge=fit (merge is {merge!r})")
    if "fit_held_out" in given and merge != "fit" and not recipe.router_fit:
        raise ValueError(f"fit_held_out only applies to merge=fit or router_fit (merge is {merge!r})")
    for name in ("router_fit_rounds", "block_fit_steps", "error_feedback"):
        if name in given and not recipe.router_fit:
            raise ValueError(f"{name} only applies with router_fit")


def frequency_weights(frequency: torch.Tensor) -> torch.Tensor:
    """α_i = f_i / Σ f (Sub-MoE eq. 7, HC-SMoE's freq merge); uniform when no member was ever routed.

    The reference HC-SMoE code divides by Σf + 1e-7 and so zeroes every group whose members were never counted,
    singletons included.
    """
    f = frequency.to(torch.float64).clamp_min(0)
    total = f.sum()
    if total <= 0:
        return torch.full_like(f, 1.0 / len(f))
    return f / total


def weighted_average(inputs: GroupInputs, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = alpha.to(inputs.gate_up)
    return torch.einsum("n,noh->oh", a, inputs.gate_up), torch.einsum("n,nhi->hi", a, inputs.down)


def merge_layer(layer: MoeLayer, plan: LayerPlan, method: str, stats: Stats, mode: str = "normal",
                recipe: Any = None) -> MergedLayer:
    """Merge every group of one layer with ``method``; results in plan order, cast to the layer's dtype once."""
    spec = MERGE.get(method)
    gate_up, down = layer.expert_weights()
    freq = stats.frequency(layer.index)
    out_gu, out_dn, factors = [], [], []
    for members, dom in zip(plan.groups, plan.dominant):
        if len(members) == 1 and not spec.handles_singletons:
            # A group of one is its expert, whatever the method: no round trip through fp32 arithmetic.
            out_gu.append(gate_up[members[0]])
            out_dn.append(down[members[0]])
            factors.append(None)
            continue
        idx = torch.tensor(members, device=gate_up.device)
        inputs = GroupInputs(gate_up[idx].float(), down[idx].float(), freq[members], members.index(dom),
                             members, mode, layer, stats, recipe)
        merged = spec.fn(inputs)
        if not isinstance(merged, MergedExpert):
            merged = MergedExpert(*merged)
        out_gu.append(merged.gate_up.to(gate_up.dtype))
        out_dn.append(merged.down.to(down.dtype))
        factors.append(merged.factors)
    return MergedLayer(torch.stack(out_gu), torch.stack(out_dn),
                       factors if any(f is not None for f in factors) else None)


from . import (  # noqa: E402,F401  (HC-SMoE options, M-SMoE)
    align,
    average,  # noqa: E402,F401  (registers the methods)
    fit,  # noqa: E402,F401  (output-fitted merge, MergeMoE)
    subspace,  # noqa: E402,F401  (Sub-MoE)
    weighted,
    zipit,
)
