"""Neuron-matching merges: ``zipit`` and ``fix-dom-same`` (HC-SMoE option document; ZipIt!, Stoica et al. 2024;
MC-SMoE's adaptation of ZipIt to FFN experts).

A group of ``n`` experts with ``I`` intermediate neurons each has ``n·I`` neurons. Both methods decide which neurons
become one merged neuron, from a similarity ``K [nI, nI]`` between neurons (neuron ``j`` of member ``k`` has index
``k·I + j``), then build the merged expert with :func:`merge_by_assignment`:

* merged gate / up rows of a cluster: average of its neurons' rows (weighted by the members' coefficients);
* merged down column: ``Σ_(k,j)∈c α_k · down_k[:, j]``. If every neuron of a cluster fires like the merged neuron, the
  merged expert equals ``Σ_k α_k E_k(x)``, the average of the members; with identical members it is exact.

``K`` (the ``ingredient``) is the correlation matrix of standardised neuron features: ``act`` = intermediate
activations ``act(x W_gate) ⊙ (x W_up)`` on the calibration tokens routed to the group (accumulated in fp64 by
:class:`GroupActivationMoments` in a plan-aware pass over the layer's calibration inputs); ``weight`` = the neurons'
weight vectors ``[gate row, up row, down column]``;
``act+weight`` = the sum of both correlation matrices (the correlation of the concatenated standardised features).

``mode``: ``normal`` averages members uniformly (α = 1/n); ``input-weight`` uses α = tokens routed to each member /
total (the members' frequencies); ``activation-with-router-logits`` multiplies each member's activations by its
router probability before correlating; ``all`` does both. Coefficients always sum to one (the reference code's
``input-weight`` coefficients were overwritten in a loop, see docs/options.md).

``zipit``: ZipIt's "zip" runs in rounds down to ``I`` clusters; each round merges the pairs of clusters that are each
other's most correlated partner (same-expert pairs allowed, as in ZipIt), most correlated first. The
similarity of merged clusters is that of their mean standardised feature, derived exactly from ``K`` (the reference
re-runs the merged neurons on the data instead; we keep no per-token activations). ``fix-dom-same``: the dominant
expert's neurons are fixed and every other member's neurons are matched one-to-one to them by optimal assignment
(scipy ``linear_sum_assignment``), so the merged expert keeps the dominant's neuron order.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..calibrate.stats import LayerBatch, Statistic
from ..families import MoeLayer, expert_intermediate
from . import MERGE, GroupInputs, LayerPass, MergeMethod, frequency_weights
from .align import match_permutation, neuron_features

MODES = ("normal", "activation-with-router-logits", "input-weight", "all")
INGREDIENTS = ("act", "weight", "act+weight")
ASSIGN_STAT = "group_assign"  # Stats entry written by the layer pass: {"<m1>,<m2>,...": assignment [nI]}
LOG = logging.getLogger(__name__)


def correlation(cov: torch.Tensor) -> torch.Tensor:
    """Correlation from a covariance (fp64); features with zero variance (dead neurons) correlate 0 with the rest
    and 1 with themselves."""
    c = cov.to(torch.float64)
    var = c.diagonal().clone()
    alive = var > 1e-12 * max(float(var.max()), 1e-300) if var.numel() else var > 0
    inv = torch.where(alive, var.clamp_min(1e-300).rsqrt(), torch.zeros_like(var))
    out = c * inv[:, None] * inv[None, :]
    out.diagonal().copy_(torch.ones_like(var))
    return out


def covariance_from_moments(total: torch.Tensor, gram: torch.Tensor, count: float) -> torch.Tensor:
    """Sample covariance from Σx ``[D]`` and Σxxᵀ ``[D, D]`` over ``count`` samples (fp64, no per-sample storage)."""
    mean = total.to(torch.float64) / count
    return gram.to(torch.float64) / count - mean[:, None] * mean[None, :]


def weight_correlation(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Pearson correlation ``[nI, nI]`` of all neurons' weight vectors ``[gate row, up row, down column]``."""
    feats = torch.cat([neuron_features(gu, dn) for gu, dn in zip(gate_up, down)]).to(torch.float64)
    feats = feats - feats.mean(1, keepdim=True)
    norms = feats.norm(dim=1)
    feats = feats / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    k = feats @ feats.T
    k.diagonal().fill_(1.0)
    return k


def zip_features(similarity: torch.Tensor, inter: int) -> np.ndarray:
    """ZipIt rounds on a correlation matrix ``[m, m]`` of standardised features: cluster id (0..inter-1) per feature.

    Each round merges every mutually-most-correlated pair (never below ``inter`` clusters); a merged cluster's feature
    is the mean of its members' standardised features, so its covariance with the
    others is an average of entries of the matrix, and its correlation follows.
    """
    k = similarity.to(torch.float64).clone()
    m = k.shape[0]
    members = [[i] for i in range(m)]
    cov = k.clone()  # covariance of the clusters' mean features
    while len(members) > inter:
        current = len(members)
        corr = correlation(cov).numpy()
        np.fill_diagonal(corr, -np.inf)
        best = corr.argmax(1)
        # Mutual best matches only: forcing a fixed number of pairs per round would pair leftovers badly (three
        # identical neurons: one pair is perfect, the third would be forced onto a stranger).
        mutual = [(i, int(best[i])) for i in range(current) if best[best[i]] == i and i < best[i]]
        if not mutual:  # cannot happen with exact arithmetic (the global maximum is mutual); guard anyway
            i, j = np.unravel_index(int(np.argmax(corr)), corr.shape)
            mutual = [(int(min(i, j)), int(max(i, j)))]
        mutual.sort(key=lambda p: -corr[p[0], p[1]])
        pairs = mutual[:max(1, min(current - inter, current // 2))]
        new_index = np.full(current, -1, dtype=np.int64)
        new_members: list[list[int]] = []
        for i, j in pairs:
            new_index[i] = new_index[j] = len(new_members)
            new_members.append(members[i] + members[j])
        for i in range(current):
            if new_index[i] < 0:
                new_index[i] = len(new_members)
                new_members.append(members[i])
        # Mean feature of a new cluster = size-weighted mean of its old clusters' mean features.
        sizes = torch.tensor([len(g) for g in members], dtype=torch.float64)
        new_sizes = torch.tensor([len(g) for g in new_members], dtype=torch.float64)
        idx = torch.as_tensor(new_index)
        proj = torch.zeros(current, len(new_members), dtype=torch.float64)
        proj[torch.arange(current), idx] = sizes / new_sizes[idx]
        cov = proj.T @ cov @ proj
        members = new_members
    assign = np.empty(m, dtype=np.int64)
    for c, g in enumerate(sorted(members, key=min)):
        assign[g] = c
    return assign


def match_to_dominant(similarity: torch.Tensor, size: int, inter: int, dominant: int) -> np.ndarray:
    """fix-dom-same: cluster id of every neuron = the dominant's neuron it is matched to (optimal assignment per
    member on the dominant-vs-member block of the similarity)."""
    assign = np.empty(size * inter, dtype=np.int64)
    dom = slice(dominant * inter, (dominant + 1) * inter)
    assign[dom] = np.arange(inter)
    for k in range(size):
        if k == dominant:
            continue
        block = similarity[dom, k * inter:(k + 1) * inter]
        perm = match_permutation(block)  # dominant neuron i <- member neuron perm[i]
        assign[k * inter + perm] = np.arange(inter)
    return assign


def merge_by_assignment(gate_up: torch.Tensor, down: torch.Tensor, assign, alpha: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged expert from a neuron clustering ``assign [nI]`` (ids 0..I-1) and member coefficients ``α [n]``
    (summing to one): weighted mean of gate/up rows per cluster, ``Σ α_k down_k[:, j]`` per cluster."""
    n, two_i, hidden = gate_up.shape
    inter = two_i // 2
    a = torch.as_tensor(np.asarray(assign), dtype=torch.long, device=gate_up.device)
    alpha = alpha.to(torch.float64).to(gate_up.device)
    w = alpha.repeat_interleave(inter)  # coefficient of every neuron, [nI]
    gate = gate_up[:, :inter].reshape(n * inter, hidden).to(torch.float64)
    up = gate_up[:, inter:].reshape(n * inter, hidden).to(torch.float64)
    cols = down.permute(0, 2, 1).reshape(n * inter, -1).to(torch.float64)  # [nI, H]
    mass = torch.zeros(inter, dtype=torch.float64, device=gate_up.device).index_add_(0, a, w)
    # A cluster whose members all have α = 0 (e.g. never-routed under input-weight) averages them uniformly.
    uniform = torch.zeros(inter, dtype=torch.float64, device=gate_up.device).index_add_(0, a, torch.ones_like(w))
    row_w = torch.where(mass[a] > 0, w / mass[a].clamp_min(1e-300), 1.0 / uniform[a])
    new_gate = torch.zeros(inter, hidden, dtype=torch.float64, device=gate_up.device).index_add_(
        0, a, gate * row_w[:, None])
    new_up = torch.zeros_like(new_gate).index_add_(0, a, up * row_w[:, None])
    new_down = torch.zeros(inter, cols.shape[1], dtype=torch.float64, device=gate_up.device).index_add_(
        0, a, cols * w[:, None])
    return torch.cat([new_gate, new_up]).to(gate_up.dtype), new_down.T.contiguous().to(down.dtype)


def member_coefficients(inputs: GroupInputs) -> torch.Tensor:
    """α per member: uniform, or the members' routing frequencies for ``input-weight`` / ``all``."""
    if inputs.mode in ("input-weight", "all"):
        return frequency_weights(inputs.frequency)
    return torch.full((inputs.size,), 1.0 / inputs.size, dtype=torch.float64)


def group_key(members: list[int]) -> str:
    return ",".join(str(m) for m in members)


def precomputed_assignment(inputs: GroupInputs) -> np.ndarray | None:
    """The assignment computed from calibration activations for this group, if the pipeline made one."""
    if inputs.stats is None or inputs.layer is None:
        return None
    entry = inputs.stats.layers.get(inputs.layer.index, {}).get(ASSIGN_STAT, {})
    found = entry.get(group_key(inputs.members))
    return None if found is None else found.numpy()


def assignment(method: str, similarity: torch.Tensor, size: int, inter: int, dominant: int) -> np.ndarray:
    if method == "zipit":
        return zip_features(similarity, inter)
    return match_to_dominant(similarity, size, inter, dominant)


def _merge(method: str, inputs: GroupInputs) -> tuple[torch.Tensor, torch.Tensor]:
    inter = inputs.down.shape[-1]
    if inputs.size == 1:
        return inputs.gate_up[0], inputs.down[0]
    assign = precomputed_assignment(inputs)
    if assign is None:  # called without a calibration pass (Python API on tensors): weight ingredient
        assign = assignment(method, weight_correlation(inputs.gate_up, inputs.down), inputs.size, inter,
                            inputs.dominant)
    return merge_by_assignment(inputs.gate_up, inputs.down, assign, member_coefficients(inputs))


def zipit_merge(inputs: GroupInputs) -> tuple[torch.Tensor, torch.Tensor]:
    return _merge("zipit", inputs)


def fix_dom_same_merge(inputs: GroupInputs) -> tuple[torch.Tensor, torch.Tensor]:
    return _merge("fix-dom-same", inputs)


# ---- the plan-aware pass ------------------------------------------------------------------------------------------
class GroupActivationMoments(Statistic):
    """Σf, Σffᵀ (fp64) and token count per group, over the tokens routed to any member, at most ``data_limit``
    tokens per group; ``f`` = the members' intermediate activations ``act(x W_gate) ⊙ (x W_up)`` side by side
    ``[n·I]`` (times each member's router probability with ``with_router``). No per-token storage."""

    def __init__(self, layer: MoeLayer, groups: list[list[int]], with_router: bool, data_limit: int | None) -> None:
        super().__init__(layer, layer.experts.gate_up_proj.device)
        self.groups = groups
        self.with_router = with_router
        self.data_limit = data_limit
        self.counts = {i: 0 for i in range(len(groups))}

    def full(self) -> bool:
        return self.data_limit is not None and all(c >= self.data_limit for c in self.counts.values())

    def reduce(self, ranks) -> None:
        """Sums and token counts over ranks (with ``data_limit`` each rank stops at the limit on its own share)."""
        ranks.sum_fields(self.sums)
        counts = torch.tensor([float(self.counts[i]) for i in range(len(self.groups))], dtype=torch.float64)
        ranks.sum_(counts)
        self.counts = {i: int(c) for i, c in enumerate(counts.tolist())}

    def update(self, batch: LayerBatch) -> None:
        gate_up, _ = self.layer.expert_weights()
        routed = batch.routed_mask()  # [E, T]
        probs = torch.softmax(batch.router_logits.float(), -1) if self.with_router else None
        for gi, members in enumerate(self.groups):
            room = None if self.data_limit is None else self.data_limit - self.counts[gi]
            if room is not None and room <= 0:
                continue
            tokens = torch.nonzero(routed[members].any(0)).reshape(-1)[:room]
            if tokens.numel() == 0:
                continue
            idx = torch.tensor(members, device=gate_up.device)
            act = expert_intermediate(batch.hidden[tokens], gate_up[idx].float(), self.layer.experts.act_fn)
            if probs is not None:  # activation-with-router-logits: scale by each member's router probability
                act = act * probs[tokens][:, members].T[:, :, None]
            feats = act.permute(1, 0, 2).reshape(tokens.numel(), -1).to(torch.float64)  # [t, nI]
            self._add(f"{gi}.sum", feats.sum(0))
            self._add(f"{gi}.gram", feats.T @ feats)
            self.counts[gi] += int(tokens.numel())


def _parts(jobs: list, partition: int) -> list[list]:
    """``partition`` parts of the job list (clamped to the number of jobs, never zero parts)."""
    n = max(1, min(partition, len(jobs)))
    return [[jobs[i] for i in chunk] for chunk in np.array_split(np.arange(len(jobs)), n) if len(chunk)]


def similarity_for_group(acc: GroupActivationMoments | None, gi: int, gate_up: torch.Tensor, down: torch.Tensor,
                         ingredient: str, layer: int) -> torch.Tensor:
    """The neuron similarity ``K`` of the ``ingredient`` for group ``gi`` of the accumulator."""
    k = None
    count = acc.counts[gi] if acc is not None else 0
    if ingredient in ("act", "act+weight"):
        if count >= 2:
            k = correlation(covariance_from_moments(acc.sums[f"{gi}.sum"], acc.sums[f"{gi}.gram"], count)).cpu()
        else:
            LOG.warning("layer %s group %s: %d routed calibration tokens, using the weight ingredient", layer, gi,
                        count)
    if ingredient in ("weight", "act+weight") or k is None:
        w = weight_correlation(gate_up, down)
        k = w if k is None or ingredient == "weight" else k + w
    return k


def assignment_pass(ctx: LayerPass) -> dict:
    """The plan-aware pass of ``zipit`` / ``fix-dom-same``: stats entry ``group_assign`` = {"m1,m2,...": neuron
    cluster ids [n·I]} for every group of more than one expert. ``partition`` splits the layer's groups into that
    many parts, one pass each, so only one part's Gram matrices live at a time; each part's matrices are reduced at
    once to the small assignment and freed (results do not depend on ``partition``)."""
    recipe, layer = ctx.recipe, ctx.layer
    jobs = [(m, d) for m, d in zip(ctx.plan.groups, ctx.plan.dominant) if len(m) > 1]
    use_act = recipe.ingredient in ("act", "act+weight")
    with_router = recipe.mode in ("activation-with-router-logits", "all")
    gate_up, down = layer.expert_weights()
    inter = down.shape[-1]
    out = {}
    for part in _parts(jobs, recipe.partition) if jobs else []:
        acc = None
        if use_act:
            acc = GroupActivationMoments(layer, [m for m, _ in part], with_router, recipe.data_limit)
            ctx.run([acc], until=acc.full)  # stop once every group has its data_limit of tokens
        for gi, (members, dom) in enumerate(part):
            idx = torch.tensor(members, device=gate_up.device)
            k = similarity_for_group(acc, gi, gate_up[idx].float().cpu(), down[idx].float().cpu(), recipe.ingredient,
                                     layer.index)
            out[group_key(members)] = torch.as_tensor(assignment(recipe.merge, k, len(members), inter,
                                                                 members.index(dom)))
        del acc
    return {ASSIGN_STAT: out} if out else {}


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not a mode of zipit / fix-dom-same; valid choices: {', '.join(MODES)}")


MERGE.add("zipit", MergeMethod(zipit_merge, description="ZipIt: zip correlated intermediate neurons of the group "
                                                        "(ingredient, mode)", layer_pass=assignment_pass,
                               check_mode=check_mode, neuron_matching=True))
MERGE.add("fix-dom-same", MergeMethod(fix_dom_same_merge, description="match every member's neurons to the "
                                                                      "dominant expert's, then average",
                                      layer_pass=assignment_pass, check_mode=check_mode, neuron_matching=True))
