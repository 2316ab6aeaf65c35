"""A checkpoint's tensors, read lazily, and the names they have on disk and in memory.

On disk, transformers-5 MoE checkpoints use the hub's names (``block_sparse_moe.experts.3.w1.weight``, or
``mlp.experts.3.gate_proj.weight``); in memory the experts of a layer are fused (``mlp.experts.gate_up_proj``).
transformers converts between the two with one table of renamings and converters per ``model_type``
(``conversion_mapping.py``). :class:`KeyConverter` applies that very table to one decoder layer's tensors at a time,
forwards (disk → memory, when a layer is built) and backwards (memory → disk, when a merged layer is written), so a
checkpoint streamed through moemerge is named exactly as ``save_pretrained`` would name it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import MoemergeError

INDEX_FILE = "model.safetensors.index.json"


class CheckpointIndex:
    """Where each tensor of a checkpoint folder lives; every shard's header is read (and so checked) up front.

    A shard named in ``model.safetensors.index.json`` but absent, a truncated or corrupt shard, and a key the index
    places in a shard that does not hold it are one-line errors naming the file, before any tensor is read.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MoemergeError(f"{index}: not a safetensors index (no weight_map)") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            weight_map = {}
        if not files:
            raise MoemergeError(f"{self.folder} holds no *.safetensors weights (moemerge reads safetensors only)")
        self._handles: dict[str, object] = {}
        self.location: dict[str, str] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise MoemergeError(f"shard {name} listed in {INDEX_FILE} is missing from {self.folder}")
            for key in self._open(name).keys():
                self.location.setdefault(key, name)
        for key, name in weight_map.items():
            if self.location.get(key) != name:
                raise MoemergeError(f"{INDEX_FILE} places {key} in {name}, which does not hold it")

    def _open(self, name: str):
        handle = self._handles.get(name)
        if handle is None:
            path = self.folder / name
            try:
                handle = safe_open(str(path), framework="pt")
                _check_size(path)
            except (SafetensorError, OSError, ValueError) as exc:
                raise MoemergeError(f"shard {name} is truncated or corrupt ({str(exc).splitlines()[0]}); "
                                    f"download or copy it again") from None
            self._handles[name] = handle
        return handle

    def keys(self) -> list[str]:
        return list(self.location)

    def get(self, key: str) -> torch.Tensor:
        name = self.location[key]
        try:
            return self._open(name).get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise MoemergeError(f"cannot read {key} from shard {name}: {str(exc).splitlines()[0]}") from None

    def nbytes(self) -> int:
        return sum((self.folder / n).stat().st_size for n in set(self.location.values()))


def _check_size(path: Path) -> None:
    """A shard must be as long as its header says: safetensors maps the file lazily and would fail only on read."""
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    size = path.stat().st_size
    if size < 8 + header_len + end:
        raise ValueError(f"file has {size} bytes, its header needs {8 + header_len + end}")


class KeyConverter:
    """transformers' conversion table for a model, applied to a few tensors at a time.

    ``model`` is the model the tensors belong to (a meta-device skeleton is enough): its ``model_type`` selects the
    table and its state-dict keys decide, as in ``from_pretrained``, whether the base-model prefix is added.
    """

    def __init__(self, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        self.model = model
        transforms = get_model_conversion_mapping(model)
        self._renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self._converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._by_pattern = {p: c for c in self._converters for p in c.source_patterns}
        self._memory_keys = dict.fromkeys(model.state_dict().keys(), True)

    def memory_key(self, key: str) -> tuple[str, str | None]:
        """The in-memory name of checkpoint key ``key`` and the converter pattern it matched (None: a rename)."""
        from transformers.core_model_loading import rename_source_key

        renamed, pattern = rename_source_key(key, self._renamings, self._converters, self.model.base_model_prefix,
                                             self._memory_keys)
        if renamed not in self._memory_keys and key in self._memory_keys:
            return key, None
        return renamed, pattern

    def to_memory(self, tensors: dict[str, torch.Tensor | Callable[[], torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (or callables that read them) → in-memory tensors (experts stacked and fused)."""
        from transformers.core_model_loading import WeightRenaming, dot_natural_key

        pending: dict[str, object] = {}
        for key in sorted(tensors, key=dot_natural_key):  # expert 10 after expert 9, as from_pretrained orders them
            target, pattern = self.memory_key(key)
            if pattern is not None:
                transform = pending.setdefault(target, copy.deepcopy(self._by_pattern[pattern]))
            else:
                transform, pattern = pending.setdefault(target, WeightRenaming(key, target)), key
            value = tensors[key]
            transform.add_tensor(target, key, pattern, value if callable(value) else (lambda v=value: v))
        out: dict[str, torch.Tensor] = {}
        for target, transform in pending.items():
            for name, value in transform.convert(target, model=self.model, config=self.model.config).items():
                out[name] = value[0] if isinstance(value, list) else value
        return out

    def to_hub(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """In-memory tensors → the names (and per-expert split) that ``save_pretrained`` writes."""
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, tensors)
