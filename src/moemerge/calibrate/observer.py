"""Hooks that read the routing the model really used, and feed the statistics.

Every decorated transformers-5 experts container is called as ``experts(hidden [T,H], top_k_index [T,k],
top_k_weights [T,k])`` after the router ran, whatever the experts kernel (eager, grouped_mm). A forward hook on the
router keeps its logits; a forward pre-hook on the experts then sees the tokens and the routing the block actually
used (its own top-k, weights after renormalisation), so no top-k is ever recomputed or hard-coded here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..families import MoeLayer
from .stats import STATISTICS, LayerBatch, Statistic

# Upper bound on the fp32 temporaries of running every expert on a chunk of tokens ([E, T, 2I] + [E, T, H]).
DEFAULT_CHUNK_BYTES = 512 * 2**20


class Observer:
    """Accumulates the named statistics for the given MoE layers while the model runs."""

    def __init__(self, layers: list[MoeLayer], names: list[str], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.layers = layers
        self.names = list(dict.fromkeys(names))
        classes = [STATISTICS.get(n) for n in self.names]
        self.needs_outputs = any(c.needs_outputs for c in classes)
        self.chunk_bytes = chunk_bytes
        self.accumulators: dict[int, list[Statistic]] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._handles: list = []

    @contextmanager
    def attached(self) -> Iterator[Observer]:
        for layer in self.layers:
            self._handles.append(layer.router.register_forward_hook(self._router_hook(layer)))
            self._handles.append(layer.experts.register_forward_pre_hook(self._experts_hook(layer)))
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._logits.clear()

    def _router_hook(self, layer: MoeLayer):
        def hook(module: nn.Module, args, output) -> None:
            logits = output[0] if isinstance(output, tuple) else output
            self._logits[layer.index] = logits.detach()

        return hook

    def _experts_hook(self, layer: MoeLayer):
        def hook(module: nn.Module, args) -> None:
            hidden, top_k_index, top_k_weights = args[:3]
            accs = self.accumulators.get(layer.index)
            if accs is None:
                accs = [STATISTICS.get(n)(layer, hidden.device) for n in self.names]
                self.accumulators[layer.index] = accs
            logits = self._logits.pop(layer.index, None)
            for sl in self._token_chunks(layer, hidden.shape[0]):
                batch = LayerBatch(
                    layer=layer,
                    hidden=hidden[sl].detach().float(),
                    top_k_index=top_k_index[sl].detach(),
                    top_k_weights=top_k_weights[sl].detach().float(),
                    router_logits=None if logits is None else logits[sl].float(),
                )
                for acc in accs:
                    acc.update(batch)

        return hook

    def _token_chunks(self, layer: MoeLayer, num_tokens: int) -> list[slice]:
        if not self.needs_outputs:
            return [slice(0, num_tokens)]
        gu, dn = layer.expert_weights()
        per_token = 4 * layer.num_experts * (gu.shape[1] + dn.shape[1])
        step = max(1, self.chunk_bytes // per_token)
        return [slice(s, min(s + step, num_tokens)) for s in range(0, num_tokens, step)]

    def results(self) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
        return {
            li: {name: acc.result() for name, acc in zip(self.names, accs)}
            for li, accs in self.accumulators.items()
        }
