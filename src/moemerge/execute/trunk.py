"""The model's own forward, with its decoder layers stubbed out.

Each family prepares its decoder layers' inputs differently (embedding scale, rotary tables, causal or sliding-window
masks per layer type) and finishes differently (final norm, LM head, logit scaling). Rather than re-implement any of
it, :class:`Trunk` runs the family's own ``forward`` with every decoder layer's ``forward`` replaced by a stub:

* :meth:`Trunk.layer_inputs`: the stubs record the hidden states entering layer 0 and the arguments each layer is
  called with, and stop the forward after the last one;
* :meth:`Trunk.logits`: the stubs pass hidden states through and the last one returns the final hidden states that
  the executor computed layer by layer, so the family's own norm and head turn them into logits.

The stubbed layers may be on the meta device: only the embeddings, rotary tables, norm and head need real weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..families import decoder_layers


class _Stop(Exception):
    """Raised by the last stub: the trunk needs nothing after the decoder layers."""


@dataclass
class LayerCall:
    """The positional and keyword arguments (besides the hidden states) one decoder layer is called with."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@contextmanager
def _stubbed(layers: nn.ModuleList, make: Callable[[int], Callable]) -> Iterator[None]:
    saved = [layer.__dict__.get("forward") for layer in layers]
    try:
        for i, layer in enumerate(layers):
            layer.forward = make(i)  # instance attribute: nn.Module.__call__ looks it up before the class method
        yield
    finally:
        for layer, old in zip(layers, saved):
            if old is None:
                del layer.forward
            else:
                layer.forward = old


class Trunk:
    """Layer inputs and logits of a causal LM, computed by its own forward around the decoder layers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = decoder_layers(model)
        self.base = getattr(model, model.base_model_prefix)

    @torch.no_grad()
    def layer_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[LayerCall]]:
        """``(hidden states entering decoder layer 0 [B, S, H], the call of every decoder layer)`` for ``input_ids``."""
        calls: list[LayerCall] = [LayerCall() for _ in self.layers]
        first: list[torch.Tensor] = []
        last = len(self.layers) - 1

        def make(i: int) -> Callable:
            def stub(hidden_states, *args, **kwargs):
                if i == 0:
                    first.append(hidden_states)
                calls[i] = LayerCall(args, kwargs)
                if i == last:
                    raise _Stop
                return hidden_states
            return stub

        with _stubbed(self.layers, make):
            try:
                self.base(input_ids=input_ids, use_cache=False)
            except _Stop:
                pass
        return first[0], calls

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, final_hidden: torch.Tensor, positions: slice | None = None
               ) -> torch.Tensor:
        """Logits ``[B, S, V]`` that the model gives for ``input_ids`` when its last decoder layer outputs
        ``final_hidden`` (only at ``positions``, when given: the LM head of a large vocabulary over long windows
        would not fit at once)."""
        last = len(self.layers) - 1

        def make(i: int) -> Callable:
            def stub(hidden_states, *args, **kwargs):
                return final_hidden if i == last else hidden_states
            return stub

        kwargs = {} if positions is None else {"logits_to_keep": positions}
        with _stubbed(self.layers, make):
            return self.model(input_ids=input_ids, use_cache=False, **kwargs).logits


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """One decoder layer on ``hidden`` with the arguments the model would give it."""
    return layer(hidden, *call.args, **call.kwargs)
