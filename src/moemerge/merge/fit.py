"""``merge: fit``: an output-fitted merge, after MergeMoE (Miao et al., arXiv 2510.14436, "output merging").

Averaging weights assumes the members' neurons line up, which experts trained from scratch do not guarantee
(``docs/quality.md``). MergeMoE instead asks the merged expert to reproduce the group's *output*. Here: keep the
starting merged gate/up (frequency-weighted average, or another merge method named by ``mode``), and solve the down
projection in closed form so that, over the calibration tokens routed to the group,

    min_W  Σ_x ‖ s(x)·W h(x) − y(x) ‖²,   s(x) = Σ_{i∈g} w_i(x),   y(x) = Σ_{i∈g} w_i(x) E_i(x),

with ``h(x)`` the merged intermediate activation: ``s·W h`` is what the merged expert adds under ``router: keep``
(the slots of a group share it, so their weights add up) and ``y`` what the original block added. The normal
equations give ``W = B (A + λI)⁻¹`` with ``A = Σ s² h hᵀ``, ``B = Σ s y hᵀ`` (accumulated by
``calibrate/fit_stats.py`` in a second, plan-aware pass) and GPTQ-style damping ``λ = damp·mean(diag A)``, solved in
fp64. The result is kept only if it lowers the (undamped) objective below the starting average's, so ``fit`` never
does worse than its start on the calibration objective.

Gate/up are not refitted: the objective is not quadratic in them, and each alternating step would need another
pass over the calibration text. Groups of one are returned unchanged (they are their expert).
"""

from __future__ import annotations

import torch

from ..errors import MoemergeError
from . import MERGE, GroupInputs, MergeMethod, merge_layer

DAMP = 0.01


def solve_down(a: torch.Tensor, b: torch.Tensor, damp: float = DAMP) -> torch.Tensor | None:
    """``W = B (A + λI)⁻¹`` in fp64 with ``λ = damp·mean(diag A)``; ``None`` when ``A`` is empty (no tokens).

    Args:
        a: ``Σ s² h hᵀ`` ``[I, I]``.  b: ``Σ s y hᵀ`` ``[H, I]``.
    """
    a, b = a.to(torch.float64), b.to(torch.float64)
    scale = a.diagonal().mean()
    if not torch.isfinite(scale) or scale <= 0:
        return None
    reg = a + damp * scale * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    chol, info = torch.linalg.cholesky_ex(reg)
    if info == 0:
        return torch.cholesky_solve(b.T, chol).T  # A symmetric: W = B A⁻¹ ⇔ Wᵀ = A⁻¹ Bᵀ
    return torch.linalg.lstsq(reg, b.T).solution.T


def fit_objective(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> float:
    """``Σ_x ‖s W h − y‖² = tr(W A Wᵀ) − 2 tr(W Bᵀ) + C`` from the accumulated sums (fp64)."""
    w = w.to(torch.float64)
    return float((w @ a.to(torch.float64) * w).sum() - 2 * (w * b.to(torch.float64)).sum() + c.to(torch.float64))


def start_methods() -> list[str]:
    """Merges ``fit`` can start from: single-pass methods (no plan-aware pass of their own)."""
    return [m for m in MERGE if m not in ("fit", "no") and MERGE.get(m).prepare is None]


def start_method(mode: str) -> str:
    """The merge whose gate/up ``fit`` starts from: ``mode`` when it names another single-pass merge method
    (``freq``, ``aligned-freq``, ...), else M-SMoE's aligned frequency average when registered (experts trained
    from scratch share no neuron order, so their plain average is a poor start), else the frequency average."""
    if mode in start_methods():
        return mode
    return "aligned-freq" if "aligned-freq" in MERGE else "freq"


def _start(inputs: GroupInputs) -> tuple[torch.Tensor, torch.Tensor]:
    merged = MERGE.get(start_method(inputs.mode)).fn(inputs)
    return (merged.gate_up, merged.down) if hasattr(merged, "gate_up") else merged


def fit_merge(inputs: GroupInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting merge for gate/up, least-squares down projection (see the module docstring)."""
    gate_up, down = _start(inputs)
    key = "-".join(str(m) for m in sorted(inputs.members))
    layer = inputs.layer.index if inputs.layer is not None else None
    per = inputs.stats.layers.get(layer, {}).get("fit") if inputs.stats is not None else None
    if per is None:
        raise MoemergeError("merge=fit needs the plan-aware fit pass (run it through pipeline.merge_model or "
                            "merge.fit.prepare_fit)")
    if f"{key}.A" not in per:  # no calibration token reached this group: nothing to fit to
        return gate_up, down
    a, b, c = per[f"{key}.A"], per[f"{key}.B"], per[f"{key}.C"]
    fitted = solve_down(a, b)
    if fitted is None or fit_objective(fitted, a, b, c) >= fit_objective(down, a, b, c):
        return gate_up, down
    return gate_up, fitted.to(down.dtype)


def starting_gate_up(layer, layer_plan, stats, mode: str, recipe=None
                     ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """The multi-member groups of a layer and their starting merged gate/up (as the model will store them)."""
    method = start_method(mode)
    groups = [g for g in layer_plan.groups if len(g) > 1]
    if not groups:
        return [], []
    merged = merge_layer(layer, layer_plan, method, stats, mode, recipe)
    starts = [merged.gate_up[i] for i, g in enumerate(layer_plan.groups) if len(g) > 1]
    return groups, starts


def add_fit_statistics(model, layers, plan, stats, windows: torch.Tensor, mode: str = "normal",
                       batch_size: int = 1, progress: bool = False, stop_after=None, recipe=None) -> None:
    """Run the fit pass for ``layers`` (those the plan merges) and store the sums as ``stats.layers[i]["fit"]``."""
    from ..calibrate.fit_stats import fit_statistics

    todo = [layer for layer in layers if not plan.layers[layer.index].is_identity]
    groups, starts = {}, {}
    with torch.no_grad():
        for layer in todo:
            groups[layer.index], starts[layer.index] = starting_gate_up(layer, plan.layers[layer.index], stats,
                                                                        mode, recipe)
    fresh = fit_statistics(model, todo, groups, starts, windows, batch_size, progress, stop_after)
    for li, per in fresh.items():
        stats.layers.setdefault(li, {})["fit"] = per


def prepare_fit(loaded, recipe, plan, stats, settings, progress: bool = False, layers=None, stop_after=None):
    """Pipeline hook (``MergeMethod.prepare``): the plan-aware second pass over the calibration windows, on the
    still-unmerged model; returns ``stats`` with a ``fit`` entry per merged layer."""
    from ..calibrate import calibration_windows
    from ..families import moe_layers

    wins, _ = calibration_windows(loaded, settings)
    todo = [layer for layer in moe_layers(loaded.model) if layers is None or layer.index in layers]
    add_fit_statistics(loaded.model, todo, plan, stats, wins, recipe.mode, settings.train_batch_size, progress,
                       stop_after=stop_after, recipe=recipe)
    return stats


MERGE.add("fit", MergeMethod(
    fit_merge, description="output-fitted merge (MergeMoE): starting average, least-squares down projection on "
                           "the group's routed output; one extra calibration pass",
    prepare=prepare_fit))
