"""Named per-layer statistics, accumulated on the fly during one calibration pass.

Each statistic is a small accumulator class registered under the name that plans ask for. It sees one
:class:`LayerBatch` at a time (the tokens that reached one MoE layer, with the routing the model really used) and
keeps only sums, in fp64 on the model's device, so memory does not grow with the amount of calibration text.
Everything is batched over experts: no Python loop over experts, expert pairs or tokens.

Adding a statistic = one class + ``@STATISTICS.register("name")``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..families import MoeLayer, expert_intermediate
from ..registry import Registry


@dataclass
class LayerBatch:
    """The tokens of one forward call at one MoE layer.

    ``hidden`` is the input of the experts ``[T, H]``; ``top_k_index`` / ``top_k_weights`` ``[T, k]`` are exactly
    what the block handed to its experts; ``router_logits`` ``[T, E]`` are the router's pre-softmax scores.
    ``expert_outputs()`` runs every expert on every token (``[E, T, H]``), computed once per batch and only when a
    statistic asks for it.
    """

    layer: MoeLayer
    hidden: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    router_logits: torch.Tensor | None
    _outputs: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.hidden.shape[0])

    def expert_outputs(self) -> torch.Tensor:
        if self._outputs is None:
            self._outputs = self.layer.run_experts(self.hidden)
        return self._outputs

    def routed_mask(self) -> torch.Tensor:
        """``[E, T]`` boolean: expert e is in token t's top-k."""
        num_experts = self.layer.num_experts
        mask = torch.zeros(self.num_tokens, num_experts, dtype=torch.bool, device=self.hidden.device)
        mask.scatter_(1, self.top_k_index, True)
        return mask.T

    def routed_weights(self) -> torch.Tensor:
        """``[E, T]`` routing weight of expert e on token t (0 where it was not chosen)."""
        dense = torch.zeros(self.num_tokens, self.layer.num_experts, device=self.hidden.device)
        dense.scatter_(1, self.top_k_index, self.top_k_weights.float())
        return dense.T


class Statistic:
    """Base accumulator. Subclasses set ``needs_outputs`` / ``needs_logits`` and fill ``self.sums``."""

    needs_outputs: ClassVar[bool] = False
    needs_logits: ClassVar[bool] = False

    def __init__(self, layer: MoeLayer, device: torch.device) -> None:
        self.layer = layer
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}

    def _add(self, name: str, value: torch.Tensor) -> None:
        value = value.to(torch.float64)
        if name in self.sums:
            self.sums[name] += value
        else:
            self.sums[name] = value.clone()

    def update(self, batch: LayerBatch) -> None:
        raise NotImplementedError

    def reduce(self, ranks) -> None:
        """Combine this statistic over the ranks of a distributed job (:mod:`.ranks`): sums are summed."""
        ranks.sum_fields(self.sums)

    def result(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.sums.items()}


def _rank() -> int:
    """This process's rank in a distributed job (0 alone)."""
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else 0


STATISTICS: Registry[type[Statistic]] = Registry("statistic")


@STATISTICS.register("frequency")
class Frequency(Statistic):
    """Eq. 6 of Sub-MoE / HC-SMoE's usage: ``counts[e]`` = tokens whose top-k holds e (the model's real top-k),
    ``weight_sum[e]`` = summed routing weight, ``tokens`` = tokens seen. Frequency = counts / tokens.
    """

    def update(self, batch: LayerBatch) -> None:
        num_experts = batch.layer.num_experts
        idx = batch.top_k_index.reshape(-1)
        self._add("counts", torch.bincount(idx, minlength=num_experts))
        w = torch.zeros(num_experts, dtype=torch.float64, device=idx.device)
        w.index_add_(0, idx, batch.top_k_weights.reshape(-1).to(torch.float64))
        self._add("weight_sum", w)
        self._add("tokens", torch.tensor(batch.num_tokens))


@STATISTICS.register("router_logits")
class RouterLogits(Statistic):
    """Sum and Gram matrix of the router logits over tokens. Each expert's feature is its logit column over all
    calibration tokens (MC-SMoE's router-logit similarity); the Gram ``[E, E]`` gives all cosines at once.
    """

    needs_logits = True

    def update(self, batch: LayerBatch) -> None:
        logits = batch.router_logits.to(torch.float64)
        self._add("sum", logits.sum(0))
        self._add("gram", logits.T @ logits)
        self._add("tokens", torch.tensor(batch.num_tokens))


@STATISTICS.register("expert_output_mean")
class ExpertOutputMean(Statistic):
    """HC-SMoE's feature: each expert's output averaged over *all* calibration tokens of the layer, ``[E, H]``."""

    needs_outputs = True

    def update(self, batch: LayerBatch) -> None:
        self._add("sum", batch.expert_outputs().sum(1))
        self._add("tokens", torch.tensor(batch.num_tokens))


@STATISTICS.register("expert_output_cosine")
class ExpertOutputCosine(Statistic):
    """Sub-MoE eq. 2: Σ_t cos(E_i(x_t), E_j(x_t)) over all tokens, as one batched product of per-token-normalised
    outputs, ``[E, E]``; divide by ``tokens`` for the mean."""

    needs_outputs = True

    def update(self, batch: LayerBatch) -> None:
        y = torch.nn.functional.normalize(batch.expert_outputs(), dim=-1)  # [E, T, H]
        self._add("sum", torch.einsum("eth,fth->ef", y, y))
        self._add("tokens", torch.tensor(batch.num_tokens))


@STATISTICS.register("expert_output_gram")
class ExpertOutputGram(Statistic):
    """Σ_t ⟨E_i(x_t), E_j(x_t)⟩ over all tokens, ``[E, E]``: the Gram matrix of the experts' raw output collections
    (Sub-MoE eq. 3's Y_j, unnormalised), so ‖Y_i − Y_j‖² = G_ii + G_jj − 2 G_ij is in output units."""

    needs_outputs = True

    def update(self, batch: LayerBatch) -> None:
        y = batch.expert_outputs()  # [E, T, H]
        self._add("sum", torch.einsum("eth,fth->ef", y, y))
        self._add("tokens", torch.tensor(batch.num_tokens))


@STATISTICS.register("routed_output_norm")
class RoutedOutputNorm(Statistic):
    """Per expert, over the tokens routed to it: Σ‖E_e(x)‖ (``norm_sum``, the output-norm pruning criterion) and
    Σ g_e(x)·‖E_e(x)‖ (``weighted_norm_sum``, REAP's saliency), with ``counts`` to average them."""

    needs_outputs = True

    def update(self, batch: LayerBatch) -> None:
        norms = batch.expert_outputs().norm(dim=-1)  # [E, T]
        mask = batch.routed_mask()
        self._add("norm_sum", (norms * mask).sum(1))
        self._add("weighted_norm_sum", (norms * batch.routed_weights()).sum(1))
        self._add("counts", mask.sum(1))


@STATISTICS.register("input_cov")
class InputCovariance(Statistic):
    """Per expert, Σ x xᵀ over the tokens routed to it, ``[E, H, H]`` in fp64 (Sub-MoE† whitening, eq. 10)."""

    def update(self, batch: LayerBatch) -> None:
        x = batch.hidden.to(torch.float64)
        mask = batch.routed_mask().to(torch.float64)  # [E, T]
        self._add("sum", torch.einsum("et,th,tg->ehg", mask, x, x))
        self._add("counts", mask.sum(1))


@STATISTICS.register("intermediate_cov")
class IntermediateCovariance(Statistic):
    """Per expert, Σ h hᵀ over the tokens routed to it, with h = act(x W_gateᵀ) ⊙ (x W_upᵀ) the input of down_proj,
    ``[E, I, I]`` (Sub-MoE† whitening of down_proj, eq. 10). Products in fp32 (an fp64 copy of ``[E, T, I]`` would
    double the peak memory), sums across batches in fp64. Memory: E·I²·8 bytes per layer (Qwen1.5-MoE: 0.95 GB)."""

    def update(self, batch: LayerBatch) -> None:
        gate_up, _ = batch.layer.expert_weights()
        inter = expert_intermediate(batch.hidden.float(), gate_up.float(), batch.layer.experts.act_fn)  # [E, T, I]
        inter = inter * batch.routed_mask().unsqueeze(-1)
        self._add("sum", inter.transpose(1, 2) @ inter)
        self._add("counts", batch.routed_mask().sum(1))


@STATISTICS.register("weight_gram")
class WeightGram(Statistic):
    """Gram matrix ``[E, E]`` of the experts' flattened (gate, up, down) weights, fp64: the ``weight`` similarity
    base as a statistic, taken while the layer is built, so that plans over every layer need no weights in memory."""

    def reduce(self, ranks) -> None:
        """Every rank computed it from the same weights: nothing to combine."""

    def update(self, batch: LayerBatch) -> None:
        if "gram" in self.sums:
            return
        gate_up, down = self.layer.expert_weights()
        num_experts = gate_up.shape[0]
        gram = torch.zeros(num_experts, num_experts, dtype=torch.float64, device=gate_up.device)
        for t in (gate_up.reshape(num_experts, -1), down.reshape(num_experts, -1)):
            for s in range(0, t.shape[1], 1 << 22):  # fp64 copies of a few million values at a time
                block = t[:, s:s + (1 << 22)].to(torch.float64)
                gram += block @ block.T
        self.sums["gram"] = gram


@STATISTICS.register("router_entropy")
class RouterEntropy(Statistic):
    """Σ over tokens of the entropy (nats) of the router's softmax over all experts; divide by ``tokens`` for the
    mean. Low entropy = confident routing; log(E) = uniform."""

    needs_logits = True

    def update(self, batch: LayerBatch) -> None:
        probs = torch.softmax(batch.router_logits.to(torch.float64), dim=-1)
        self._add("sum", torch.special.entr(probs).sum())  # entr(0) = 0: masked (-inf) experts add nothing
        self._add("tokens", torch.tensor(batch.num_tokens))


@STATISTICS.register("router_inputs")
class RouterInputs(Statistic):
    """A bounded uniform random sample of the router's inputs ``x [S, H]`` (fp32), for fitting router rows
    (``router_adapt`` fit / fit_centered / kl). Bottom-k sampling: every token draws a key from a generator seeded by
    the layer index and the ``S`` smallest keys are kept, so the sample is uniform over the whole stream and
    deterministic. ``S`` is about 2**23 / H values, clamped to [512, 8192] (8192 tokens for H = 128)."""

    def __init__(self, layer: MoeLayer, device: torch.device) -> None:
        super().__init__(layer, device)
        self.generator = torch.Generator().manual_seed(1000 + layer.index + 7919 * _rank())
        self.keys: torch.Tensor | None = None

    def update(self, batch: LayerBatch) -> None:
        x = batch.hidden.detach().float()
        cap = max(512, min(8192, (1 << 23) // x.shape[1]))
        keys = torch.rand(x.shape[0], generator=self.generator).to(x.device)
        if self.keys is not None:
            x, keys = torch.cat([self.sums["x"], x]), torch.cat([self.keys, keys])
        self._keep(x, keys, cap)

    def _keep(self, x: torch.Tensor, keys: torch.Tensor, cap: int) -> None:
        if x.shape[0] > cap:
            keep = torch.topk(keys, cap, largest=False).indices.sort().values
            x, keys = x[keep], keys[keep]
        self.sums["x"], self.keys = x, keys

    def reduce(self, ranks) -> None:
        """The bottom-k of every rank's candidates: a uniform sample of all ranks' tokens, the same on every rank
        (each rank draws its keys from a generator seeded by the layer and the rank)."""
        if not ranks.distributed:
            return
        parts = ranks.gather((self.sums["x"].cpu(), self.keys.cpu()))
        x = torch.cat([p[0] for p in parts]).to(self.sums["x"].device)
        keys = torch.cat([p[1] for p in parts]).to(x.device)
        self._keep(x, keys, max(512, min(8192, (1 << 23) // x.shape[1])))
