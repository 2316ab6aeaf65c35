"""Router rows for formats that give a group fewer router rows than it has members (``compact``, ``padded``).

With all N rows kept, a group's routing probability is the sum of its members' softmax probabilities, i.e.
``softmax`` over groups of ``lse_g(x) = logsumexp_{j in g}(w_j . x)``. One bias-free row per group can only
approximate that. The entries registered here (in :data:`ROUTER_ADAPT`, recipe option ``router_adapt``) fit the
rows on a sample of calibration router inputs (statistic ``router_inputs``):

* ``fit``: per group, least squares ``r_g . x ~ lse_g(x)`` (the log-sum-exp of the members' logits);
* ``kl``: starts from ``fit`` and minimises KL(exact group routing || softmax of the new logits) on the
  calibration tokens with a few L-BFGS steps.

``mean`` (frequency-weighted mean of the member rows, no data) lives in :mod:`.formats`.

Sigmoid-scored routers (DeepSeek-V3, GLM-4.5, dots.llm1, MiniMax-M2): with all N rows kept, the members of a slot
add up their scores ``m_g(x) = Σ_{j in g} σ(w_j . x)`` (the block's weights are those scores, renormalised over the
chosen experts). One sigmoid can give at most 1, so ``fit`` fits ``r_g . x ~ logit(m_g / n)`` with ``n`` the largest
slot size: a factor common to every slot, which the renormalisation over the chosen slots cancels (the bias, added
for the choice only, is not scaled, so the choice can still differ). ``kl`` minimises KL(m / Σ m || σ(R x) /
Σ σ(R x)), the renormalised group distributions, starting from ``fit``. Measured on random routers (8 experts in
slots of 2, 3, 1 and 2, 500 tokens, 3 seeds): mean KL 0.086 / 0.074 / 0.078 nats for ``mean``, 0.076 / 0.074 /
0.067 for ``fit``, 0.054 / 0.047 / 0.047 for ``kl``. The score-correction
bias of a slot (choice only) is cut alongside by the format (:func:`.formats.merged_bias`).

Not registered: least squares with a free per-token constant (targets centred over groups). It is provably the same
router as ``fit``: each row is the same linear map of its target, so centring the targets only subtracts one common
row from every row, which softmax ignores (measured: identical KL to 4 decimals).
"""

from __future__ import annotations

import torch

from ..errors import MoemergeError
from .formats import ROUTER_ADAPT

#: sigmoid targets are clipped to (ε, 1 - ε) before the logit (guards against round-off only: m_g / n < 1)
SIGMOID_EPS = 1e-6


def group_log_mass(weight: torch.Tensor, slots: list[list[int]], inputs: torch.Tensor,
                   scoring: str = "softmax") -> torch.Tensor:
    """``[S, G]``: log of each slot's unnormalised routing mass: ``logsumexp`` of its members' logits (softmax), or
    the log of its members' summed sigmoid scores (sigmoid)."""
    logits = inputs.to(torch.float64) @ weight.to(torch.float64).T  # [S, N]
    if scoring == "sigmoid":
        logs = torch.nn.functional.logsigmoid(logits)
        return torch.stack([torch.logsumexp(logs[:, s], dim=1) for s in slots], dim=1)
    return torch.stack([torch.logsumexp(logits[:, s], dim=1) for s in slots], dim=1)


def _new_log_mass(rows: torch.Tensor, x: torch.Tensor, scoring: str) -> torch.Tensor:
    """``[S, G]``: log of the unnormalised mass the new rows give each slot."""
    logits = x @ rows.T
    return torch.nn.functional.logsigmoid(logits) if scoring == "sigmoid" else logits


def exact_group_probs(weight: torch.Tensor, slots: list[list[int]], inputs: torch.Tensor) -> torch.Tensor:
    """``[S, G]``: the probability mass of each slot's members under the original softmax, renormalised over the
    kept slots (dropped experts' mass is spread proportionally, as top-k renormalisation would)."""
    return torch.softmax(group_log_mass(weight, slots, inputs), dim=1)


def routing_kl(weight: torch.Tensor, slots: list[list[int]], rows: torch.Tensor, inputs: torch.Tensor,
               scoring: str = "softmax") -> float:
    """Mean KL(exact group routing || routing of the new ``rows``) over the tokens ``inputs`` (nats), both
    distributions renormalised over the slots."""
    logp = torch.log_softmax(group_log_mass(weight, slots, inputs, scoring), dim=1)
    logq = torch.log_softmax(_new_log_mass(rows.to(torch.float64), inputs.to(torch.float64), scoring), dim=1)
    return float((logp.exp() * (logp - logq)).sum(1).mean())


def _ridge_solve(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[G, H]`` rows minimising ``||X R^T - Y||^2`` with a tiny ridge (the sample may be rank-deficient)."""
    x = inputs.to(torch.float64)
    gram = x.T @ x
    ridge = 1e-6 * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, x.T @ targets).T


def _check_inputs(name: str, inputs: torch.Tensor | None, hidden: int) -> torch.Tensor:
    if inputs is None or inputs.numel() == 0:
        raise MoemergeError(f"router_adapt={name} needs calibration router inputs (statistic 'router_inputs')")
    if inputs.shape[-1] != hidden:
        raise MoemergeError(f"router inputs have width {inputs.shape[-1]}, router rows {hidden}")
    return inputs


def fit_rows(weight: torch.Tensor, slots: list[list[int]], frequency: torch.Tensor,
             inputs: torch.Tensor | None, scoring: str = "softmax") -> torch.Tensor:
    """Least squares per group: ``r_g = argmin sum_t (r . x_t - lse_g(x_t))^2`` (softmax; singleton slots keep their
    row) or ``(r . x_t - logit(m_g(x_t) / n))^2`` with ``n`` the largest slot size (sigmoid, module docstring; every
    slot is fitted, singletons too, so that all share the common factor ``1 / n``)."""
    inputs = _check_inputs("fit", inputs, weight.shape[1])
    target = group_log_mass(weight, slots, inputs, scoring)
    if scoring == "sigmoid":
        # Σ of up to n sigmoid scores / n is a score one sigmoid can give; a common factor leaves the renormalised
        # weights of the chosen slots unchanged
        largest = max(len(s) for s in slots)
        mass = (target.exp() / largest).clamp(SIGMOID_EPS, 1 - SIGMOID_EPS)
        target = torch.log(mass) - torch.log1p(-mass)  # logit
    rows = _ridge_solve(inputs, target)
    for g, s in enumerate(slots):
        if len(s) == 1 and scoring != "sigmoid":
            rows[g] = weight[s[0]].to(rows.dtype)
    return rows


def fit_centered_rows(weight: torch.Tensor, slots: list[list[int]], frequency: torch.Tensor,
                      inputs: torch.Tensor | None, scoring: str = "softmax") -> torch.Tensor:
    """Least squares on group log-masses centred over groups: a per-token constant is free because softmax
    ignores it. The minimum-norm solution has rows summing to zero (a gauge choice that changes nothing)."""
    inputs = _check_inputs("fit_centered", inputs, weight.shape[1])
    target = group_log_mass(weight, slots, inputs)
    return _ridge_solve(inputs, target - target.mean(1, keepdim=True))


def kl_rows(weight: torch.Tensor, slots: list[list[int]], frequency: torch.Tensor, inputs: torch.Tensor | None,
            steps: int = 60, scoring: str = "softmax") -> torch.Tensor:
    """``fit_centered`` (softmax) or ``fit`` (sigmoid) refined by L-BFGS on the mean KL(exact group routing ||
    routing of R x), both renormalised over the slots, on the calibration tokens. Deterministic (full batch)."""
    inputs = _check_inputs("kl", inputs, weight.shape[1])
    x = inputs.to(torch.float64)
    logp = torch.log_softmax(group_log_mass(weight, slots, x, scoring), dim=1)
    p = logp.exp()
    # a sigmoid's scale matters (no shift invariance), so the sigmoid start is the uncentred fit
    start = fit_rows if scoring == "sigmoid" else fit_centered_rows
    rows = start(weight, slots, frequency, x, scoring=scoring).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([rows], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (p * (logp - torch.log_softmax(_new_log_mass(rows, x, scoring), dim=1))).sum(1).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return rows.detach()


for _name, _fn in (("fit", fit_rows), ("kl", kl_rows)):
    _fn.needs_inputs = True  # layer-level: (weight [N, H], slots, frequency [N], inputs [S, H], scoring=) -> [G, H]
    ROUTER_ADAPT.add(_name, _fn)


def split_slots(groups: list[list[int]], frequency: torch.Tensor, num_slots: int) -> tuple[list[list[int]],
                                                                                               list[int]]:
    """Split groups into ``num_slots`` router slots for ``--format padded``: ``(slots, group of each slot)``.

    Each group gets at least one slot; the extra slots go, one at a time, to the group with the most members left
    in a shared slot (ties: the larger routing mass), and each split-off slot holds that group's most frequent
    remaining member alone (its original row, exact). A group whose members all have their own slot routes exactly
    as with all N rows. Raises if there are fewer kept rows than slots (a bias-free router has no dead slot).
    """
    kept = sum(len(g) for g in groups)
    if kept < num_slots:
        raise MoemergeError(f"cannot pad to {num_slots} slots: only {kept} router rows are kept (a bias-free "
                            f"softmax router cannot hold a dead slot)")
    # per group: singles split off so far, and the remaining members (sorted by frequency, most frequent first)
    remaining = [sorted(g, key=lambda e: (-float(frequency[e]), e)) for g in groups]
    singles: list[list[int]] = [[] for _ in groups]
    for _ in range(num_slots - len(groups)):
        g = max((i for i in range(len(groups)) if len(remaining[i]) > 1),
                key=lambda i: (len(remaining[i]), float(frequency[remaining[i]].sum()), -i))
        singles[g].append(remaining[g].pop(0))
    slots, owner = [], []
    for g in range(len(groups)):
        for e in singles[g]:
            slots.append([e])
            owner.append(g)
        slots.append(sorted(remaining[g]))
        owner.append(g)
    return slots, owner
