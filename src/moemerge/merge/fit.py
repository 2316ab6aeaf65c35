"""``merge: fit``: an output-fitted merge, after MergeMoE (Miao et al., arXiv 2510.14436, "output merging").

Averaging weights assumes the members' neurons line up, which experts trained from scratch do not guarantee
(``docs/quality.md``). MergeMoE instead asks the merged expert to reproduce the group's *output*. Here: keep the
starting merged gate/up (frequency-weighted average, or another merge method named by ``mode``), and solve the down
projection in closed form so that, over the calibration tokens routed to the group,

    min_W  Σ_x ‖ s(x)·W h(x) − y(x) ‖²,   s(x) = Σ_{i∈g} w_i(x),   y(x) = Σ_{i∈g} w_i(x) E_i(x),

with ``h(x)`` the merged intermediate activation: ``s·W h`` is what the merged expert adds under ``router: keep``
(the slots of a group share it, so their weights add up) and ``y`` what the original block added. The normal
equations give ``W = B (A + λI)⁻¹`` with ``A = Σ s² h hᵀ``, ``B = Σ s y hᵀ`` (accumulated by
a plan-aware pass over the layer's calibration inputs, :class:`GroupFitAccumulator`) and GPTQ-style damping ``λ =
damp·mean(diag A)``, solved in
fp64. The result is kept only if it lowers the (undamped) objective below the starting average's, so ``fit`` never
does worse than its start on the calibration objective.

Gate/up are not refitted: the objective is not quadratic in them, and each alternating step would need another
pass over the calibration text. Groups of one are returned unchanged (they are their expert).
"""

from __future__ import annotations

import torch

from ..calibrate.stats import LayerBatch, Statistic
from ..errors import MoemergeError
from ..families import MoeLayer, expert_intermediate
from . import MERGE, GroupInputs, LayerPass, MergeMethod, merge_layer

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
    return [m for m in MERGE if m not in ("fit", "no") and MERGE.get(m).layer_pass is None]


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
    key = group_key(inputs.members)
    layer = inputs.layer.index if inputs.layer is not None else None
    per = inputs.stats.layers.get(layer, {}).get("fit") if inputs.stats is not None else None
    if per is None:
        raise MoemergeError("merge=fit needs the plan-aware fit pass (run it through moemerge.merge_model or "
                            "the executor)")
    if f"{key}.A" not in per:  # no calibration token reached this group: nothing to fit to
        return gate_up, down
    a, b, c = per[f"{key}.A"], per[f"{key}.B"], per[f"{key}.C"]
    fitted = solve_down(a, b)
    if fitted is None or fit_objective(fitted, a, b, c) >= fit_objective(down, a, b, c):
        return gate_up, down
    return gate_up, fitted.to(down.dtype)


# ---- the plan-aware pass ------------------------------------------------------------------------------------------
# Largest number of routed tokens pushed through one group's members at once (bounds [n, T, 2I] temporaries).
CHUNK_TOKENS = 4096


def group_key(members) -> str:
    """Stable field prefix of a group's sums: its sorted members joined by ``-``."""
    return "-".join(str(m) for m in sorted(members))


class GroupFitAccumulator(Statistic):
    """The sufficient statistics of the least-squares down projection, per multi-member group of one layer, over the
    calibration tokens routed to the group (fp64 sums; no per-token tensor outlives one chunk of one batch):

    * ``A = Σ s² h hᵀ`` ``[I, I]``, ``h`` the *starting* merged expert's intermediate activation;
    * ``B = Σ s y hᵀ`` ``[H, I]``, ``y = Σ_{i∈g} w_i E_i(x)`` what the original members added;
    * ``C = Σ ‖y‖²``, so the objective can be evaluated for any ``W`` without the tokens; and ``tokens``.

    ``starts[g]`` is the starting merged gate/up ``[2I, H]`` of ``groups[g]``. Memory: ``G·(I² + H·I)·8`` bytes.
    """

    def __init__(self, layer: MoeLayer, groups: list[list[int]], starts: list[torch.Tensor]) -> None:
        super().__init__(layer, layer.experts.gate_up_proj.device)
        self.groups = [list(g) for g in groups]
        self.starts = starts

    @torch.no_grad()
    def update(self, batch: LayerBatch) -> None:
        weights = batch.routed_weights()  # [E, T]
        mask = batch.routed_mask()  # [E, T]
        gate_up, down = self.layer.expert_weights()
        act = self.layer.experts.act_fn
        for members, start in zip(self.groups, self.starts):
            key = group_key(members)
            idx = torch.tensor(members, device=weights.device)
            selected = mask[idx].any(0).nonzero().squeeze(1)
            if selected.numel() == 0:
                continue
            gu_m, dn_m, start32 = gate_up[idx].float(), down[idx].float(), start.float()[None]
            for lo in range(0, selected.numel(), CHUNK_TOKENS):
                tok = selected[lo:lo + CHUNK_TOKENS]
                x = batch.hidden[tok]
                w = weights[idx][:, tok]  # [n, t]
                s = w.sum(0).double()  # [t]
                out = torch.einsum("nti,nhi->nth", expert_intermediate(x, gu_m, act), dn_m)
                y = torch.einsum("nt,nth->th", w, out).double()  # Σ_i w_i E_i(x): what the block added
                h = expert_intermediate(x, start32, act)[0].double()  # [t, I]
                self._add(f"{key}.A", (h * (s * s)[:, None]).T @ h)
                self._add(f"{key}.B", (y * s[:, None]).T @ h)
                self._add(f"{key}.C", (y * y).sum())
                self._add(f"{key}.tokens", torch.tensor(float(tok.numel())))


@torch.no_grad()
def starting_gate_up(layer: MoeLayer, layer_plan, stats, mode: str, recipe=None
                     ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """The multi-member groups of a layer and their starting merged gate/up (as the model will store them)."""
    groups = [g for g in layer_plan.groups if len(g) > 1]
    if not groups:
        return [], []
    merged = merge_layer(layer, layer_plan, start_method(mode), stats, mode, recipe)
    starts = [merged.gate_up[i] for i, g in enumerate(layer_plan.groups) if len(g) > 1]
    return groups, starts


def fit_pass(ctx: LayerPass) -> dict:
    """The plan-aware pass of ``fit``: the fit sums of every multi-member group, as stats entry ``fit``."""
    groups, starts = starting_gate_up(ctx.layer, ctx.plan, ctx.stats, ctx.recipe.mode, ctx.recipe)
    if not groups:
        return {}
    acc = GroupFitAccumulator(ctx.layer, groups, starts)
    ctx.run([acc])
    return {"fit": acc.result()}


def _check_start(mode: str) -> None:
    """``mode`` names the single-pass merge that fit starts from."""
    if mode != "normal" and mode not in start_methods():
        raise ValueError(f"mode {mode!r} is not a start for merge=fit; valid choices: normal, "
                         f"{', '.join(start_methods())}")


MERGE.add("fit", MergeMethod(
    fit_merge, description="output-fitted merge (MergeMoE): starting average, least-squares down projection on "
                           "the group's routed output; one extra pass per layer",
    layer_pass=fit_pass, check_mode=_check_start))
