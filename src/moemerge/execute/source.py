"""Where the executor gets decoder layers from.

* :class:`ModelSource`: a model already in memory (the Python API on small models); its layers are used in place,
  so merging one changes the model, and nothing is ever freed.
* :class:`ShardSource`: a checkpoint folder. The model is built on the meta device (no memory), its trunk
  (embeddings, final norm, LM head, rotary tables) is read once, and each decoder layer is read from the shards
  when the executor asks for it, converted to transformers' in-memory layout, put on the compute device, and turned
  back into meta tensors when the executor releases it. While one layer computes, the next layer's tensors are read
  by a background thread.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from ..errors import MoemergeError
from ..families import FamilySpec, MoeLayer, decoder_layers, family_of
from .weights import CheckpointIndex, KeyConverter

LOG = logging.getLogger(__name__)


class LayerSource:
    """A causal LM whose decoder layers can be built one at a time.

    ``model`` is the whole ``...ForCausalLM`` object: its trunk is always usable; its decoder layer ``i`` holds real
    weights only between :meth:`layer` and :meth:`release`.
    """

    model: nn.Module
    device: torch.device
    resident: bool = False  # every layer is in memory at all times (release frees nothing)

    @property
    def config(self):
        return self.model.config

    @property
    def family(self) -> FamilySpec:
        return family_of(self.model.config)

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def moe_view(self, index: int) -> MoeLayer | None:
        """The MoE block of decoder layer ``index`` (meta or real), or None for a dense layer."""
        return self.family.moe_layer(index, self.layers[index])

    def moe_views(self) -> list[MoeLayer]:
        return [v for v in (self.moe_view(i) for i in range(self.num_layers)) if v is not None]

    def layer(self, index: int) -> nn.Module:
        raise NotImplementedError

    def release(self, index: int) -> None:
        """Free decoder layer ``index`` (streamed sources); a no-op for resident ones."""

    def prefetch(self, index: int) -> None:
        """Start reading decoder layer ``index`` in the background (streamed sources)."""

    def close(self) -> None:
        """Release every resource (threads, open shards)."""


class ModelSource(LayerSource):
    """A model in memory; layers are used (and merged) in place."""

    resident = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device

    def layer(self, index: int) -> nn.Module:
        return self.layers[index]


def meta_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM for ``config`` with every parameter on the meta device (buffers such as rotary tables are
    real: they are computed from the config, not read from the checkpoint)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..save.remote.registered import register

    register(config.model_type)  # moemerge's own mapped model types
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _to_meta(module: nn.Module) -> None:
    """Replace every parameter of ``module`` by a meta tensor of the same shape (frees its memory)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


class ShardSource(LayerSource):
    """A checkpoint folder (safetensors shards) read one decoder layer at a time."""

    def __init__(self, folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 config=None, strict: bool = False) -> None:
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.strict = strict  # tensors the model does not use are an error (checking a written folder), not a warning
        self.index = CheckpointIndex(self.folder)  # shard problems fail here, before any weight is read
        if config is None:
            from ..save.remote.registered import register_folder

            register_folder(self.folder)
            config = AutoConfig.from_pretrained(str(self.folder))
        if dtype is None:
            dtype = _config_dtype(config)
        self.dtype = dtype
        self.device = torch.device(device)
        self.model = meta_skeleton(config, dtype)
        self._dtype_plan = self.model._get_dtype_plan(dtype)
        self.converter = KeyConverter(self.model)
        self._prefix = layers_prefix(self.model)
        self._layer_keys: dict[int, list[str]] = {}
        trunk_keys = []
        for key in self.index.keys():
            target, _ = self.converter.memory_key(key)
            index = _layer_of(target, self._prefix)
            if index is None:
                trunk_keys.append(key)
            elif index < self.num_layers:
                self._layer_keys.setdefault(index, []).append(key)
        self._load_trunk(trunk_keys)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moemerge-prefetch")
        self._pending: dict[int, Future] = {}

    # ---- trunk -------------------------------------------------------------------------------------------------
    def _load_trunk(self, keys: list[str]) -> None:
        tensors = self._cast(self.converter.to_memory({k: self.index.get(k) for k in keys}))
        _check_finite(tensors, "the model's trunk", self.folder)
        missing, unexpected = self.model.load_state_dict(tensors, strict=False, assign=True)
        if unexpected and self.strict:
            raise MoemergeError(f"{self.folder}: tensors the model does not have: {', '.join(unexpected[:3])}")
        if unexpected:  # as from_pretrained: tensors the model has no place for are left out, with a warning
            LOG.warning("%s: ignoring %d checkpoint tensors the model does not use (%s)", self.folder,
                        len(unexpected), ", ".join(unexpected[:3]))
        if getattr(self.model.config, "tie_word_embeddings", False) or \
                getattr(self.model.config.get_text_config(), "tie_word_embeddings", False):
            self.model.tie_weights()
        layer_prefix = self._prefix + "."
        absent = [n for n, p in self.model.named_parameters() if p.device.type == "meta"
                  and not n.startswith(layer_prefix)]
        if absent:
            raise MoemergeError(f"{self.folder}: the checkpoint lacks {absent[:3]}")
        for module in self.model.children():
            _move_except(module, self.layers, self.device)

    def _cast(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in tensors.items():
            dtype = next((d for pattern, d in self._dtype_plan.items() if pattern in name), self.dtype)
            out[name] = t.to(dtype) if t.is_floating_point() else t
        return out

    # ---- layers ------------------------------------------------------------------------------------------------
    def _read(self, index: int) -> dict[str, torch.Tensor]:
        keys = self._layer_keys.get(index)
        if not keys:
            raise MoemergeError(f"{self.folder}: the checkpoint has no tensors for decoder layer {index}")
        return {k: self.index.get(k) for k in keys}

    def prefetch(self, index: int) -> None:
        if 0 <= index < self.num_layers and index not in self._pending:
            self._pending[index] = self._pool.submit(self._read, index)

    def layer(self, index: int) -> nn.Module:
        future = self._pending.pop(index, None)
        raw = future.result() if future is not None else self._read(index)
        prefix = f"{self._prefix}.{index}."
        tensors = {k.removeprefix(prefix): v for k, v in self._cast(self.converter.to_memory(raw)).items()}
        del raw
        _check_finite(tensors, f"decoder layer {index}", self.folder)
        module = self.layers[index]
        expected = module.state_dict().keys()
        unused = [k for k in tensors if k not in expected]
        if unused and self.strict:
            raise MoemergeError(f"{self.folder}: decoder layer {index} has tensors the model does not have: "
                                f"{', '.join(unused[:3])}")
        if unused:  # as from_pretrained: e.g. rotary tables that old checkpoints stored; left out, with a warning
            LOG.warning("decoder layer %d: ignoring %d checkpoint tensors the model does not use (%s)", index,
                        len(unused), ", ".join(unused[:3]))
            tensors = {k: v for k, v in tensors.items() if k in expected}
        try:
            module.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as exc:
            raise MoemergeError(f"{self.folder}: decoder layer {index} does not match the config: "
                                f"{str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}"
                                ) from None
        return module.to(self.device)

    def release(self, index: int) -> None:
        _to_meta(self.layers[index])
        _return_freed_memory()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


def _check_finite(tensors: dict[str, torch.Tensor], where: str, folder: Path) -> None:
    """Refuse NaN or infinite weights as they are read (one pass over memory already being touched), naming the
    tensor and, for fused experts ``[E, ...]``, the expert."""
    for name, t in tensors.items():
        if not t.is_floating_point() or bool(torch.isfinite(t).all()):
            continue
        where_bad = ""
        if name.endswith(("gate_up_proj", "down_proj")) and t.dim() == 3:
            bad = (~torch.isfinite(t)).flatten(1).any(1).nonzero().flatten().tolist()
            where_bad = f", expert{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:8]))}"
        raise MoemergeError(f"{folder}: {where}, {name}{where_bad} holds NaN or infinite weights; the checkpoint "
                            f"is damaged (re-download it) or was saved from a diverged run")


def _return_freed_memory() -> None:
    """Hand the freed layer's memory back to the operating system. glibc keeps freed blocks below its (dynamically
    raised) mmap threshold in its heap, fragmented, so without this the resident size grows by about one layer per
    layer streamed (measured: 0.6 → 1.2 GB over 32 layers of 33 MB)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def _config_dtype(config) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(value), torch.float32)


def layers_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise MoemergeError(f"cannot find the decoder layers of {type(model).__name__}")


def _layer_of(key: str, prefix: str) -> int | None:
    if not key.startswith(prefix + "."):
        return None
    head = key[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _move_except(module: nn.Module, skip: nn.Module, device: torch.device) -> None:
    """Move ``module`` to ``device`` without touching ``skip`` (the decoder layers, which stay on meta)."""
    if module is skip:
        return
    if not any(m is skip for m in module.modules()):
        module.to(device)
        return
    for p_name, p in list(module._parameters.items()):
        if p is not None:
            module._parameters[p_name] = nn.Parameter(p.data.to(device), requires_grad=False)
    for b_name, b in list(module._buffers.items()):
        if b is not None:
            module._buffers[b_name] = b.to(device)
    for child in module.children():
        _move_except(child, skip, device)
