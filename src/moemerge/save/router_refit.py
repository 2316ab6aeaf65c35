"""``router_fit: true`` (``router: collapse`` or ``mapped``): refit the router, and the merged experts under it.

A collapsed router has one row per group, so a token's group probabilities are no longer the sums of its members',
and a token whose top-k originals fell into one group now also gets a second merged expert. The rows made by
``router_adapt`` only look at routing, and ``merge: fit`` fits each merged expert to its group's routed output
under the *original* routing (the ``keep``/``mapped`` one). Here both are refitted for what the written block
really computes, on a sample of calibration hidden states ``x`` at the layer:

    (1)  L(R, W) = mean_x ‖ Σ_{g ∈ topk(R x)} w_g(x) W_g h_g(x) − y(x) ‖²,

``R`` the router (collapsed: ``[G, H]``; mapped: its ``N`` rows, slot ``e`` feeding merged expert ``expert_map[e]``,
so slots of one expert add their weights), ``W_g`` merged expert ``g``'s down projection,
``h_g(x) = act(G_g x) ⊙ (U_g x)`` its intermediate activation, ``w_g`` the family's own routing weights
(:class:`~moemerge.families.Routing`: softmax or sigmoid scores, the collapsed score-correction bias, group-limited
choice, renormalisation and scaling), and ``y(x) = Σ_{e ∈ topk} w_e(x) E_e(x)`` the original routed output.
Block-coordinate descent, in rounds:

* **router** (:func:`refit_rows`): Adam on ``R`` with the experts fixed (100 steps the first time, a third of that
  in later rounds, which start from fitted rows: measured the same to three decimals, ~30 % less time). The top-k
  selection is piecewise constant; the gradient flows through the selected weights (the usual straight-through
  treatment of top-k routers);
* **experts** (:func:`refit_downs`): with the routing fixed, (1) is quadratic in each ``W_g``. One expert at a time
  (Gauss-Seidel), with the others' current outputs subtracted from the target, its ridge solution towards its
  current value (``Φ`` the rows ``w_g(x) h_g(x)`` of the tokens that chose ``g``, ``E`` their residual)

      (2)  W_g ← W_g + Eᵀ Φ (ΦᵀΦ + λI)⁻¹ = W_g + ((ΦᵀΦ + λI)⁻¹ Φᵀ E)ᵀ,   λ = damp·mean(diag ΦᵀΦ),

  from one eigendecomposition of the smaller of ``ΦᵀΦ [I, I]`` and ``ΦΦᵀ [t, t]`` (the dual form when fewer tokens
  than neurons chose ``g``), so every ``damp`` of :data:`~moemerge.merge.fit.DAMP_GRID` costs one matrix product.
  This is the "fit against the collapsed router's weights" that ``merge: fit`` cannot do (it runs before the router
  exists).

**Whole block** (``block_fit_steps``, after the rounds): gate and up enter (1) through ``h_g`` non-linearly, so
no closed form moves them under the written routing. :func:`fit_block` takes Adam steps on ``R``, every merged
``G_g, U_g, W_g`` at once (full batch of the fitted tokens, each expert run on the tokens that chose it, step sizes
relative to each tensor's scale), stopped by the held-out tokens. This is block-wise reconstruction, as post-training
quantisation does it layer by layer (BRECQ, Li et al., ICLR 2021), with the original MoE block's routed output as
the teacher: no labels, no end-to-end training. It overfits the sample fast (on the bundled models the fitted tokens'
error halves while the held-out error falls 8–20 %), which is why the held-out windows stop it and decide whether it
is kept. Cost: per step about three forward passes of the block on the fitted tokens (a GPU matter at real sizes).

**Error feedback** (``error_feedback``): the sample above is taken on the original model's hidden states, so each
layer is fitted as if the layers before it were exact. With it, the executor carries a second calibration stream
through the layers as written (merged), takes the sample's ``x_s`` there and corrects its targets by the gap between
the original layer's outputs on the original and on the merged model's inputs (both before the layer is replaced):

    (3)  y*(x_s) = y(x_s) + (h_orig − h_merged),

so that the routed experts add what the residual stream needs for the layer to give the original model's hidden
state, and each layer absorbs part of the error the layers before it left (asymmetric calibration, as GPTAQ does it
for quantisation: Li et al., ICML 2025). At the first merged layer the gap is zero and nothing changes.

**Held out, early stopping.** Tokens of the sample's held-out windows (``fit_held_out``, the same window split as
``merge: fit``) are never fitted: they choose each expert's ``damp`` (an update that does not lower its held-out
error is not taken), and after every round the held-out (1) decides: a round that does not lower it by at least
:data:`MIN_GAIN` ends the refit and is undone. ``router_fit_rounds`` caps the rounds after the first router fit
(0: the router only, as before). Without held-out tokens the damping is fixed and rounds run to the cap. The start
(``router_adapt`` rows, merged experts) is kept unless the fit lowers the sample objective on all its tokens and on
the held-out ones, so the refit never ends worse on either.

Memory: ``T`` sampled hidden states and targets per layer (``2·T·H`` fp32; ``T`` = :data:`MAX_TOKENS`, fewer where
the experts' outputs would pass :data:`REFIT_BYTES`: :func:`sample_tokens`), taken by the executor from the layer's
calibration inputs before its experts are replaced, the merged experts' outputs on them and their fitted part
(``≈ 2·G·T·H``), one expert's ``[t, I]`` activations and one ``min(t, I)²`` eigendecomposition at a time.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from ..errors import MoemergeError
from ..families import MoeLayer, Routing, expert_intermediate
from ..loading import device_kind
from ..merge.fit import DAMP, DAMP_GRID, WindowAware, even_share, held_out_tokens

LOG = logging.getLogger(__name__)

#: Largest refit sample, spread over all calibration windows (:func:`spread_tokens`). Measured (tiny-mixtral,
#: ``moemerge`` + block fit, 62.5 % fewer experts, scored on all three bundled domains): 32 × 256 calibration
#: windows, the first 4096 tokens ×1.138, all 8192 ×1.098; 128 × 256 windows, the first 4096 tokens (one domain of
#: three) ×1.363, 16384 spread over all ×1.067. With every window sampled from the model (``self_calibration: 1``,
#: 256 × 256, block fit, 62.5 %, scored on bible / python-code / python-docs): 16384 tokens tiny-mixtral ×1.085 / 1.109
#: / 1.090, tiny-qwen-moe ×1.061 / 1.084 / 1.067; 32768 ×1.076 / 1.103 / 1.077 and ×1.057 / 1.076 / 1.063 (every
#: domain better, the block fit about twice as long); calibrated on all three domains' text, tiny-mixtral ×1.061 /
#: 1.073 / 1.069 → ×1.055 / 1.061 / 1.056.
MAX_TOKENS = 32768
#: Budget of the merged experts' outputs on the sample and their fitted part (``≈ 2·G·T·H`` fp32): a layer with many
#: or wide experts samples fewer tokens (DeepSeek-V3's 256 × 7168 would otherwise need ~30 GiB at 4096 tokens).
REFIT_BYTES = 4 * 2**30
#: A round must lower the held-out objective by this share to count (else the refit stops and undoes it).
MIN_GAIN = 1e-3
#: ``router_fit_rounds`` default: expert/router rounds after the first router fit.
ROUNDS = 3
#: ``block_fit_steps``: Adam's step size, relative to each tensor's mean absolute value (measured on both bundled
#: models: 3e-3 gave ×1.123 / ×1.040 (tiny-mixtral / tiny-qwen-moe, compact 50 %), 1e-3 ×1.146 / ×1.042,
#: 1e-2 ×1.126 / ×1.039, 3e-4 at 600 steps ×1.161).
BLOCK_LR = 3e-3
#: ``block_fit_steps``: the held-out objective is checked every this many steps; the fit stops after
#: :data:`BLOCK_PATIENCE` checks without a new best.
BLOCK_EVERY = 10
BLOCK_PATIENCE = 5
#: ``block_fit_steps``: largest fp32 copy of a layer's merged experts and router with their gradients and Adam's two
#: moments (16 bytes a parameter); a larger layer is not block-fitted (logged).
BLOCK_BYTES = 16 * 2**30
#: ``block_fit_steps``' cost per device for :func:`block_fit_seconds`: fp32 flop/s of the experts' matmuls (the fit
#: runs in fp32 whatever the checkpoint's dtype) and seconds per fitted parameter per step (Adam's moments, the
#: gradient, the best copy: memory-bound). CPU: measured on 2 cores by ``benchmarks/bench_block_fit_step.py``,
#: 0.9–1.7e11 flop/s (narrow experts the slower) and 12–15 ns per parameter; CUDA: a data-centre GPU's fp32 rate and
#: bandwidth, not measured.
BLOCK_RATES = {"cpu": (1e11, 1.5e-8), "cuda": (2e13, 1e-10)}


def spread_tokens(windows: torch.Tensor | None, num_tokens: int, share: float) -> torch.Tensor:
    """``[T]`` bool: a batch's tokens that an even ``share`` of all calibration tokens keeps — token ``g`` of the
    job (window index × window length + position) is kept by :func:`~moemerge.merge.fit.even_share`, so every window,
    on any number of ranks, gives the same evenly spaced tokens. All True for ``share`` 1 or without window
    indices."""
    if share >= 1 or windows is None or len(windows) == 0 or num_tokens % len(windows):
        return torch.ones(num_tokens, dtype=torch.bool)
    length = num_tokens // len(windows)
    return even_share((windows[:, None] * length + torch.arange(length)).reshape(-1), share)


def sample_tokens(max_tokens: int, num_experts: int, hidden_size: int, budget: int | None = None,
                  log: bool = True) -> int:
    """Sample size for a layer of ``num_experts`` (an upper bound on the merged count) of width ``hidden_size``:
    ``max_tokens``, or fewer so that ``2·G·T·H`` fp32 stay within ``budget`` (:data:`REFIT_BYTES`), at least 256;
    logs when it cuts (unless ``log`` is false: an estimate)."""
    budget = REFIT_BYTES if budget is None else budget
    fits = max(256, budget // (8 * max(1, num_experts) * max(1, hidden_size)))
    if fits < max_tokens and log:
        LOG.warning("router_fit: %d experts of width %d: refit sample cut to %d tokens (memory budget %.1f GiB)",
                    num_experts, hidden_size, fits, budget / 2**30)
    return min(max_tokens, fits)


@torch.no_grad()
def routed_target(layer: MoeLayer, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``y(x) = Σ_e w_e(x) E_e(x)`` ``[T, H]`` (fp32) for routed weights ``[E, T]`` (zero where not routed), each
    expert run on its own tokens only (memory ``[t_e, H]``, not ``[E, T, H]``)."""
    gate_up, down = layer.expert_weights()
    out = torch.zeros(hidden.shape[0], down.shape[1], dtype=torch.float32, device=hidden.device)
    for e in range(weights.shape[0]):
        tokens = weights[e].nonzero().squeeze(1)
        if tokens.numel():
            h = expert_intermediate(hidden[tokens].float(), gate_up[e:e + 1].float(), layer.experts.act_fn)[0]
            out.index_add_(0, tokens, weights[e, tokens, None].float() * (h @ down[e].float().T))
    return out


class RoutedOutputSample(WindowAware):
    """Keeps up to ``max_tokens`` (hidden, original routed output, held out?) triples of one layer (Observer
    accumulator); tokens are held out by window (:func:`~moemerge.merge.fit.held_out_tokens`). Given the job's
    ``total_tokens``, the kept tokens are spread evenly over all calibration windows (:func:`spread_tokens`) instead
    of being the first ``max_tokens``: at ``seq_len`` 2048 the first 4096 tokens are two windows of one text, and
    none of them held out."""

    def __init__(self, layer: MoeLayer, max_tokens: int = MAX_TOKENS, held_out: float = 0.0,
                 total_tokens: int | None = None) -> None:
        self.layer, self.held_out = layer, held_out
        _, down = layer.expert_weights()
        self.max_tokens = sample_tokens(max_tokens, int(down.shape[0]), int(down.shape[1]))
        self.share = 1.0 if not total_tokens else min(1.0, self.max_tokens / total_tokens)
        self.hidden: list[torch.Tensor] = []
        self.target: list[torch.Tensor] = []
        self.held: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []  # of the kept tokens among those this rank pushed, in order
        self.count = 0
        self.seen = 0

    def full(self) -> bool:
        """Nothing more will be kept: with a share below 1 the sample fills only at the last window."""
        return self.count >= self.max_tokens

    def reduce(self, ranks) -> None:
        """Every rank's triples in rank order, cut to ``max_tokens``: the same sample on every rank."""
        if not ranks.distributed:
            return
        parts = ranks.gather(tuple(torch.cat(t) if t else None for t in (self.hidden, self.target, self.held)))
        hidden, target, held = (torch.cat([p[j] for p in parts if p[j] is not None])[:self.max_tokens]
                                for j in range(3))
        self.hidden, self.target, self.held, self.count = [hidden], [target], [held], int(hidden.shape[0])

    @torch.no_grad()
    def update(self, batch) -> None:
        n = batch.num_tokens
        room = self.max_tokens - self.count
        if room <= 0:
            self.seen += n
            return
        take = spread_tokens(self._windows, n, self.share).nonzero().squeeze(1)[:room]
        held = held_out_tokens(self._windows, n, self.held_out)[take]
        x = batch.hidden[take]
        self.hidden.append(x.cpu())
        self.target.append(routed_target(self.layer, x, batch.routed_weights()[:, take]).cpu())
        self.held.append(held.cpu())
        self.positions.append(take + self.seen)
        self.count += int(take.numel())
        self.seen += n

    def kept_positions(self) -> torch.Tensor:
        """``[count]``: where the kept tokens are among the tokens this rank pushed through the layer, in order
        (``error_feedback`` picks their hidden-state gaps)."""
        return torch.cat(self.positions) if self.positions else torch.zeros(0, dtype=torch.long)

    def add_to_target(self, correction: torch.Tensor) -> None:
        """Add ``[count, H]`` to the targets, token by token (``error_feedback``: the hidden-state gap that the
        layers before left and this one should close)."""
        target = torch.cat(self.target)
        self.target = [target + correction.to(target.dtype)]

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(hidden [T, H], target [T, H], held [T] bool)``."""
        return torch.cat(self.hidden), torch.cat(self.target), torch.cat(self.held)


def routed_output(rows: torch.Tensor, hidden: torch.Tensor, expert_out: torch.Tensor, routing: Routing,
                  bias: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_{g∈topk} w_g(x) M_g(x)`` for router ``rows [N, H]``, hidden ``[T, H]``, expert outputs ``[G, T, H]``,
    routed by the family's ``routing`` with score-correction ``bias [N]`` (if any); router row ``e`` feeds merged
    expert ``slots[e]`` (mapped; None: row ``g`` is expert ``g``)."""
    weights, index = routing(hidden @ rows.T, bias)
    return routed_from(weights, index if slots is None else slots[index], expert_out)


def routed_from(weights: torch.Tensor, index: torch.Tensor, expert_out: torch.Tensor) -> torch.Tensor:
    """``Σ_k weights[:, k]·expert_out[index[:, k]]`` ``[T, H]`` for a fixed routing (slots that share an expert add
    up)."""
    picked = expert_out.permute(1, 0, 2)[torch.arange(index.shape[0])[:, None], index]  # [T, k, H]
    return (weights[..., None] * picked).sum(1)


def refit_rows(rows: torch.Tensor, hidden: torch.Tensor, expert_out: torch.Tensor, target: torch.Tensor,
               routing: Routing, bias: torch.Tensor | None = None, steps: int = 100, lr: float = 1e-2,
               slots: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float]:
    """Adam on the router rows (the bias stays); returns ``(best rows, loss before, loss after)`` (MSE on the
    sample)."""
    def loss_of(r: torch.Tensor) -> torch.Tensor:
        return (routed_output(r, hidden, expert_out, routing, bias, slots) - target).pow(2).sum(-1).mean()

    start = rows.detach().float().clone()
    r = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([r], lr=lr * start.abs().mean().clamp_min(1e-3).item())
    with torch.no_grad():
        best_loss = before = float(loss_of(start))
    best = start
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(r)
        loss.backward()
        opt.step()
        with torch.no_grad():
            current = float(loss_of(r))
        if current < best_loss:
            best_loss, best = current, r.detach().clone()
    return best, before, best_loss


def ridge_steps(phi: torch.Tensor, resid: torch.Tensor, damps) -> dict[float, torch.Tensor]:
    """Eq. 2's step ``ΔWᵀ = (ΦᵀΦ + λI)⁻¹ Φᵀ E`` ``[I, H]`` for each ``damp`` (``λ = damp·mean(diag ΦᵀΦ)``), from
    one eigendecomposition in fp64: of ``ΦᵀΦ`` when there are at least as many rows as columns, else of ``ΦΦᵀ``
    (``(ΦᵀΦ + λI)⁻¹Φᵀ = Φᵀ(ΦΦᵀ + λI)⁻¹``). Empty when ``Φ`` is all zeros.

    Args:
        phi: ``Φ [t, I]``.  resid: ``E [t, H]``.  damps: the ``damp`` values.
    """
    phi, resid = phi.double(), resid.double()
    scale = float((phi * phi).sum()) / phi.shape[1]  # mean(diag ΦᵀΦ)
    if not scale > 0:
        return {}
    dual = phi.shape[0] < phi.shape[1]
    vals, vecs = torch.linalg.eigh(phi @ phi.T if dual else phi.T @ phi)
    vals = vals.clamp_min(0)
    proj = vecs.T @ resid if dual else vecs.T @ (phi.T @ resid)  # [r, H]
    out = {}
    for damp in damps:
        core = vecs @ (proj / (vals + damp * scale)[:, None])
        out[damp] = phi.T @ core if dual else core
    return out


def _chosen(weights: torch.Tensor, index: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [t], w [t])``: the tokens whose top-k ``index [T, k]`` chose expert ``g`` and its weight for each
    (slots of one merged expert add their weights, mapped)."""
    chose = index == g  # [T, k]
    tokens = chose.any(1).nonzero().squeeze(1)
    return tokens, (weights * chose).sum(1)[tokens]


def _expert_parts(layer: MoeLayer, hidden: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, g: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h [T, I], tokens [t], Φ [t, I])``: expert ``g``'s intermediate activations on every sample token (its
    outputs there feed the router fit), the tokens that chose it and their rows ``w_g(x) h_g(x)``."""
    gate_up, _ = layer.expert_weights()
    h = expert_intermediate(hidden, gate_up[g:g + 1].float(), layer.experts.act_fn)[0]
    tokens, w = _chosen(weights, index, g)
    return h, tokens, h[tokens] * w[:, None]


@torch.no_grad()
def refit_downs(layer: MoeLayer, hidden: torch.Tensor, target: torch.Tensor, held: torch.Tensor,
                weights: torch.Tensor, index: torch.Tensor, expert_out: torch.Tensor, damps) -> int:
    """One Gauss-Seidel sweep of eq. 2 over the merged experts of ``layer`` (in place) for the fixed routing
    ``(weights, index) [T, k]``; ``expert_out [G, T, H]`` (fp32, the experts' outputs on ``hidden``) is kept up to
    date. An expert's step is taken with the ``damp`` of ``damps`` of lowest held-out error, and only if it lowers
    that error; an expert no held-out token chose takes :data:`~moemerge.merge.fit.DAMP`. Returns how many experts
    changed."""
    _, down = layer.expert_weights()
    pred = routed_from(weights, index, expert_out)
    changed = 0
    for g in range(down.shape[0]):
        h, tokens, phi = _expert_parts(layer, hidden, weights, index, g)
        if tokens.numel() == 0:
            continue
        w_old = down[g].double()
        own = phi.double() @ w_old.T  # [t, H]: this expert's current contribution
        resid = target[tokens].double() - pred[tokens].double()  # what the layer still misses there
        fit_rows, held_rows = ~held[tokens], held[tokens]
        if not bool(fit_rows.any()):
            continue
        steps = ridge_steps(phi[fit_rows], resid[fit_rows], damps if bool(held_rows.any()) else (DAMP,))
        if not steps:
            continue
        if bool(held_rows.any()):
            phi_h, res_h = phi[held_rows].double(), resid[held_rows]
            errors = {d: float((phi_h @ s - res_h).pow(2).sum()) for d, s in steps.items()}
            damp = min(errors, key=errors.get)
            if errors[damp] >= float(res_h.pow(2).sum()):
                continue  # no damping helps on the held-out tokens: keep the expert
        else:
            damp = next(iter(steps))
        w_new = w_old + steps[damp].T
        down[g] = w_new.to(down.dtype)
        new_own = phi.double() @ down[g].double().T
        pred[tokens] += (new_own - own).to(pred.dtype)
        expert_out[g] = h @ down[g].float().T
        changed += 1
    return changed


def block_fit_seconds(steps: int, layers, top_k: int, device: str, tokens: int = MAX_TOKENS,
                      held_out: float = 0.25) -> float:
    """Rough time of ``steps`` of :func:`fit_block` over MoE ``layers`` (views) on ``device`` with a refit sample of
    ``tokens`` (cut per layer as :func:`sample_tokens` cuts it). A step is a forward and a backward pass (≈ 3
    forwards) of the top-k experts on the fitted tokens, ``2·3·H·I`` flops per token and expert in each forward, at
    :data:`BLOCK_RATES`' fp32 rate, plus Adam's pass over every fitted parameter (memory-bound). 300 steps: ~1.5 min
    per layer for the bundled models on 2 CPU cores (24576 fitted tokens), ~1 day per layer at Mixtral-8x7B's shapes
    (12288 fitted of 16384 sampled: the memory cut), ~7 min on a GPU. Every step is counted: the held-out checks may
    stop the fit sooner."""
    rate, per_parameter = BLOCK_RATES[device_kind(device)]
    seconds = 0.0
    for v in layers:
        num_experts, hidden_size = (int(d) for d in v.experts.down_proj.shape[:2])
        fitted = sample_tokens(tokens, num_experts, hidden_size, log=False) * (1 - held_out) * top_k
        flops = 3 * 2 * fitted * 3 * hidden_size * v.intermediate_size
        parameters = num_experts * 3 * hidden_size * v.intermediate_size
        seconds += flops / rate + parameters * per_parameter
    return steps * seconds  # the fixed evaluations are counted as steps


def block_output(rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, hidden: torch.Tensor,
                 routing: Routing, act_fn, bias: torch.Tensor | None = None, slots: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """What the written block adds, eq. 1's ``Σ_{g∈topk(Rx)} w_g(x) W_g h_g(x)`` ``[T, H]``, differentiable in
    ``rows [N, H]``, ``gate_up [G, 2I, H]`` and ``down [G, H, I]``; each merged expert runs on the tokens that chose
    it only (as the model does), so a step costs what a training step of the block on those tokens costs."""
    weights, index = routing(hidden @ rows.T, bias)
    if slots is not None:
        index = slots[index]
    out = hidden.new_zeros(hidden.shape[0], down.shape[1])
    # unbind once: a slice per expert (gate_up[g]) would make its backward write a zero gradient the size of all the
    # experts for every expert, G times the parameters' memory traffic per step (19.8 → 6.3 s a step at Qwen1.5-MoE's
    # 30 merged experts, benchmarks/bench_block_fit_step.py)
    for g, (gate_up_g, down_g) in enumerate(zip(gate_up.unbind(0), down.unbind(0))):
        tokens, w = _chosen(weights, index, g)
        if tokens.numel():
            h = expert_intermediate(hidden[tokens], gate_up_g[None], act_fn)[0]
            out = out.index_add(0, tokens, w[:, None] * (h @ down_g.T))
    return out


class BlockFit(NamedTuple):
    """:func:`fit_block`'s result: the best ``(rows, gate_up, down)`` (fp32), the steps run, and eq. 1 on all sample
    tokens and on the held-out ones (None without them) at the start and for the result."""
    params: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    steps: int
    start_all: float
    end_all: float
    start_held: float | None
    end_held: float | None


def fit_block(layer: MoeLayer, rows: torch.Tensor, hidden: torch.Tensor, target: torch.Tensor, held: torch.Tensor,
              routing: Routing, bias: torch.Tensor | None, slots: torch.Tensor, steps: int, lr: float = BLOCK_LR
              ) -> BlockFit | None:
    """``block_fit_steps``: Adam on eq. 1 over the whole written block at once: router ``rows``, the merged experts'
    gate/up and down projections (fp32 copies), on the sample's fitted tokens, full batch. The closed-form steps of
    :func:`refit_downs` cannot move gate and up under the written routing; this can, at the price of gradient
    steps. The held-out tokens are checked every :data:`BLOCK_EVERY` steps; the fit stops after
    :data:`BLOCK_PATIENCE` checks without a new best (without held-out tokens it runs ``steps``).

    Returns the best check and the objectives it was judged by (:class:`BlockFit`), or None when the layer is over
    :data:`BLOCK_BYTES` (nothing is changed either way; the caller decides whether to keep the result).
    """
    gate_up, down = layer.expert_weights()
    size = 16 * (rows.numel() + gate_up.numel() + down.numel())
    if size > BLOCK_BYTES:
        LOG.warning("block_fit: %.1f GiB of optimiser state for this layer, over the %.0f GiB budget: not fitted",
                    size / 2**30, BLOCK_BYTES / 2**30)
        return None
    params = [t.detach().float().clone().requires_grad_(True) for t in (rows, gate_up, down)]
    hidden, target = hidden.detach(), target.detach()
    act, train = layer.experts.act_fn, ~held
    judged = bool(held.any())

    def loss(part: torch.Tensor | None, ps) -> torch.Tensor:
        x, y = (hidden, target) if part is None else (hidden[part], target[part])
        return (block_output(ps[0], ps[1], ps[2], x, routing, act, bias, slots) - y).pow(2).sum(-1).mean()

    # one step size per tensor, relative to its scale: router rows and projections differ by orders of magnitude
    opt = torch.optim.Adam([{"params": [p], "lr": lr * float(p.detach().abs().mean().clamp_min(1e-6))}
                            for p in params])
    best = [p.detach().clone() for p in params]
    with torch.no_grad():
        start_all = float(loss(None, params))
        start_held = best_held = float(loss(held, params)) if judged else None
    run = misses = 0
    with torch.enable_grad():
        for run in range(1, steps + 1):
            opt.zero_grad()
            loss(train, params).backward()
            opt.step()
            if judged and (run % BLOCK_EVERY == 0 or run == steps):
                with torch.no_grad():
                    current = float(loss(held, params))
                if current < best_held:
                    best_held, best, misses = current, [p.detach().clone() for p in params], 0
                else:
                    misses += 1
                    if misses >= BLOCK_PATIENCE:
                        break
    if not judged:
        best = [p.detach() for p in params]
    with torch.no_grad():
        end_all = float(loss(None, best))
    return BlockFit(tuple(best), run, start_all, end_all, start_held, best_held)


def _mse(pred: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    if rows is not None:
        pred, target = pred[rows], target[rows]
    return float((pred - target).pow(2).sum(-1).mean()) if pred.shape[0] else float("nan")


@torch.no_grad()
def refit_layer(layer: MoeLayer, sample: tuple[torch.Tensor, ...], config, steps: int = 100,
                rounds: int = ROUNDS, block_steps: int = 0) -> dict:
    """Refit ``layer``'s router (collapsed or mapped) and merged experts' down projections in place on ``sample`` =
    ``(hidden, target[, held])`` (see the module docstring). Returns the sample objective (1) before and after
    (``before``/``after``, all tokens; ``held_out_before``/``held_out_after`` on the held-out tokens, None without
    them), the rounds run and kept, and the sample's token counts; with ``block_steps``, then the joint block fit
    (:func:`fit_block`, kept by :func:`_block_stage`'s rule) and its ``block_steps`` run / ``block_kept``."""
    weight = layer.router_weight
    hidden, target = (t.detach().to(weight.device).float() for t in sample[:2])
    held = sample[2].to(weight.device) if len(sample) > 2 else \
        torch.zeros(hidden.shape[0], dtype=torch.bool, device=weight.device)
    if not bool((~held).any()):
        held = torch.zeros_like(held)  # nothing left to fit on: fit on everything, judge nothing
    judged = bool(held.any())
    train = ~held
    expert_out = layer.run_experts(hidden)  # merged experts [G, T, H]
    # mapped: the router keeps its N rows and slot e feeds merged expert expert_map[e]; collapse: one row each
    slots = layer.experts.expert_map.to(weight.device) if hasattr(layer.experts, "expert_map_list") \
        else torch.arange(expert_out.shape[0], device=weight.device)
    if weight.shape[0] != slots.shape[0]:
        raise MoemergeError("router_fit needs one router row per merged expert (router=collapse) or the mapped "
                            "format's expert map")
    bias = layer.choice_bias
    bias = None if bias is None else bias.float()
    routing = layer.family.routing(config)
    _, down = layer.expert_weights()
    damps = DAMP_GRID if judged else (DAMP,)

    def objective(rows: torch.Tensor, out: torch.Tensor, part: torch.Tensor | None) -> float:
        return _mse(routed_output(rows, hidden, out, routing, bias, slots), target, part)

    def router_step(rows: torch.Tensor, n: int = steps) -> torch.Tensor:
        with torch.enable_grad():
            new, _, _ = refit_rows(rows, hidden[train], expert_out[:, train], target[train], routing, bias, n,
                                   slots=slots)
        return new

    rows = weight.data.float().clone()
    start_rows, start_down = rows.clone(), down.clone()
    before, held_before = objective(rows, expert_out, None), objective(rows, expert_out, held) if judged else None
    rows = router_step(rows)
    best_rows, best_down = rows.clone(), down.clone()
    after = objective(rows, expert_out, None)
    best_held = objective(rows, expert_out, held) if judged else None
    kept = ran = 0
    for _ in range(rounds):
        ran += 1
        weights, index = routing(hidden @ rows.T, bias)
        index = slots[index]  # slots of one merged expert add their weights (mapped)
        refit_downs(layer, hidden, target, held, weights, index, expert_out, damps)
        rows = router_step(rows, max(1, steps // 3))  # from fitted rows: a third of the steps does
        if judged:
            current = objective(rows, expert_out, held)
            if not current < best_held * (1 - MIN_GAIN):
                break  # held-out stopped improving: this round is undone below
            best_held = current
        best_rows, best_down, after, kept = rows.clone(), down.clone(), objective(rows, expert_out, None), kept + 1
    if not after < before or (judged and not best_held < held_before):  # never worse than the start on either
        best_rows, best_down, after, best_held, kept = start_rows, start_down, before, held_before, 0
    down.copy_(best_down)
    weight.data.copy_(best_rows.to(weight.dtype))
    block = {}
    if block_steps:
        after, best_held, block = _block_stage(layer, best_rows, hidden, target, held, routing, bias, slots,
                                               block_steps, after, best_held)
    return {"before": before, "after": after, "held_out_before": held_before,
            "held_out_after": best_held if judged else None, "rounds": ran, "rounds_kept": kept,
            "tokens": int(hidden.shape[0]), "held_out_tokens": int(held.sum()), **block}


def _block_stage(layer: MoeLayer, rows: torch.Tensor, hidden: torch.Tensor, target: torch.Tensor,
                 held: torch.Tensor, routing: Routing, bias: torch.Tensor | None, slots: torch.Tensor, steps: int,
                 after: float, held_after: float | None) -> tuple[float, float | None, dict]:
    """:func:`fit_block` from the refitted layer, kept (written into ``layer``) only if it lowers eq. 1 on all
    sample tokens and, with held-out tokens, theirs by :data:`MIN_GAIN`. Returns the objectives (all, held out)
    of what the layer now holds and the stage's summary (``block_steps`` run, ``block_kept``)."""
    fit = fit_block(layer, rows, hidden, target, held, routing, bias, slots, steps)
    if fit is None:
        return after, held_after, {"block_steps": 0, "block_kept": False}
    # start and result measured by the fit itself (sparse experts), so they compare to the float
    judged = fit.start_held is not None
    if not fit.end_all < fit.start_all or (judged and not fit.end_held < fit.start_held * (1 - MIN_GAIN)):
        return after, held_after, {"block_steps": fit.steps, "block_kept": False}
    gate_up, down = layer.expert_weights()
    new_rows, new_gate_up, new_down = fit.params
    gate_up.copy_(new_gate_up.to(gate_up.dtype))
    down.copy_(new_down.to(down.dtype))
    layer.router_weight.data.copy_(new_rows.to(layer.router_weight.dtype))
    return fit.end_all, fit.end_held, {"block_steps": fit.steps, "block_kept": True}
