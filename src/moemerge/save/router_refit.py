"""``router_fit: true`` (with ``router: collapse``): refit the collapsed router rows on calibration tokens.

A collapsed router has one row per group, so a token's group probabilities are no longer the sums of its members'.
The rows made by ``router_adapt`` (``mean``, or the formats' fitted ``fit``/``kl``) only look at routing. Here the
rows are refitted for the block's *output*: on a sample of calibration hidden states ``x`` at the layer, minimise

    mean_x ‖ Σ_{g ∈ topk(R x)} w_g(x) M_g(x) − y(x) ‖²

over the collapsed router weight ``R [G, H]`` with Adam, where ``M_g`` are the merged experts (fixed), ``w_g`` the
family's own routing weights (:class:`~moemerge.families.Routing`: softmax or sigmoid scores, the collapsed
score-correction bias, group-limited choice, renormalisation and scaling, so nothing is hard-coded) and
``y(x) = Σ_{e ∈ topk} w_e(x) E_e(x)`` the original routed output. The top-k selection is piecewise constant; the
gradient flows through the selected weights (the usual straight-through treatment of top-k routers). Starts from the
``router_adapt`` rows and keeps them unless the objective on the sample improves, so it never does worse on it.

Memory: ``max_tokens`` sampled hidden states and targets per layer (``2·max_tokens·H`` fp32), taken by the executor
from the layer's calibration inputs before its experts are replaced.
"""

from __future__ import annotations

import torch

from ..errors import MoemergeError
from ..families import MoeLayer, Routing

MAX_TOKENS = 4096


class RoutedOutputSample:
    """Keeps up to ``max_tokens`` (hidden, original routed output) pairs of one layer (Observer accumulator)."""

    def __init__(self, layer: MoeLayer, max_tokens: int = MAX_TOKENS) -> None:
        self.layer, self.max_tokens = layer, max_tokens
        self.hidden: list[torch.Tensor] = []
        self.target: list[torch.Tensor] = []
        self.count = 0

    def full(self) -> bool:
        return self.count >= self.max_tokens

    def reduce(self, ranks) -> None:
        """Every rank's pairs in rank order, cut to ``max_tokens``: the same sample on every rank."""
        if not ranks.distributed:
            return
        parts = ranks.gather((torch.cat(self.hidden) if self.hidden else None,
                              torch.cat(self.target) if self.target else None))
        hidden = torch.cat([h for h, _ in parts if h is not None])[:self.max_tokens]
        target = torch.cat([t for _, t in parts if t is not None])[:self.max_tokens]
        self.hidden, self.target, self.count = [hidden], [target], int(hidden.shape[0])

    @torch.no_grad()
    def update(self, batch) -> None:
        room = self.max_tokens - self.count
        if room <= 0:
            return
        x = batch.hidden[:room]
        out = self.layer.run_experts(x)  # [E, t, H]
        w = batch.routed_weights()[:, :room]  # [E, t]
        self.hidden.append(x.cpu())
        self.target.append(torch.einsum("et,eth->th", w, out).cpu())
        self.count += int(x.shape[0])

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.hidden), torch.cat(self.target)


def routed_output(rows: torch.Tensor, hidden: torch.Tensor, expert_out: torch.Tensor, routing: Routing,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_{g∈topk} w_g(x) M_g(x)`` for router ``rows [G, H]``, hidden ``[T, H]``, expert outputs ``[G, T, H]``,
    routed by the family's ``routing`` with score-correction ``bias [G]`` (if any)."""
    weights, index = routing(hidden @ rows.T, bias)
    picked = expert_out.permute(1, 0, 2)[torch.arange(hidden.shape[0])[:, None], index]  # [T, k, H]
    return (weights[..., None] * picked).sum(1)


def refit_rows(rows: torch.Tensor, hidden: torch.Tensor, expert_out: torch.Tensor, target: torch.Tensor,
               routing: Routing, bias: torch.Tensor | None = None, steps: int = 100, lr: float = 1e-2
               ) -> tuple[torch.Tensor, float, float]:
    """Adam on the router rows (the bias stays); returns ``(best rows, loss before, loss after)`` (MSE on the
    sample)."""
    def loss_of(r: torch.Tensor) -> torch.Tensor:
        return (routed_output(r, hidden, expert_out, routing, bias) - target).pow(2).sum(-1).mean()

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


@torch.no_grad()
def refit_layer(layer: MoeLayer, sample: tuple[torch.Tensor, torch.Tensor], config, steps: int = 100
                ) -> tuple[float, float]:
    """Refit ``layer``'s (collapsed) router in place on ``sample`` (the family's routing for ``config``); returns the
    sample MSE before and after."""
    weight = layer.router_weight
    hidden, target = (t.to(weight.device).float() for t in sample)
    expert_out = layer.run_experts(hidden)  # merged experts, fixed
    if weight.shape[0] != expert_out.shape[0]:
        raise MoemergeError("router_fit needs one router row per merged expert (router=collapse)")
    bias = layer.choice_bias
    with torch.enable_grad():
        rows, before, after = refit_rows(weight.data, hidden, expert_out, target, layer.family.routing(config),
                                         None if bias is None else bias.float(), steps)
    weight.data.copy_(rows.to(weight.dtype))
    return before, after
