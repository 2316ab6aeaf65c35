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
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import MoemergeError

INDEX_FILE = "model.safetensors.index.json"


#: safetensors dtype names -> torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class Shard:
    """One safetensors file: its header, and tensors read with plain file reads.

    Reading into a fresh buffer (rather than through a memory map, as ``safe_open`` does) keeps the shard's pages out
    of the process's resident memory: a streamed pass touches every byte of the checkpoint once, and mapped pages
    would count as ours until the file is closed.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read(8)
                if len(raw) < 8:
                    raise ValueError("shorter than a safetensors header")
                self.header_len = int.from_bytes(raw, "little")
                if self.header_len > 100 * 2**20:
                    raise ValueError("header length is implausible")
                header = json.loads(fh.read(self.header_len))
        except (OSError, ValueError) as exc:
            raise MoemergeError(f"shard {self.path.name} is truncated or corrupt ({exc}); download or copy it "
                                f"again") from None
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        size = self.path.stat().st_size
        if size < 8 + self.header_len + end:
            raise MoemergeError(f"shard {self.path.name} is truncated ({size} bytes, its header needs "
                                f"{8 + self.header_len + end}); download or copy it again")

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise MoemergeError(f"{self.path.name}: {key} has dtype {entry['dtype']}, which moemerge cannot read")
        start, end = entry["data_offsets"]
        out = torch.empty(end - start, dtype=torch.uint8)
        with open(self.path, "rb") as fh:
            fh.seek(8 + self.header_len + start)
            if fh.readinto(memoryview(out.numpy())) != end - start:
                raise MoemergeError(f"shard {self.path.name} is truncated (reading {key}); copy it again")
        return out.view(dtype).reshape(entry["shape"])


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
        self.shards: dict[str, Shard] = {}
        self.location: dict[str, str] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise MoemergeError(f"shard {name} listed in {INDEX_FILE} is missing from {self.folder}")
            self.shards[name] = Shard(path)
            for key in self.shards[name].entries:
                self.location.setdefault(key, name)
        for key, name in weight_map.items():
            if self.location.get(key) != name:
                raise MoemergeError(f"{INDEX_FILE} places {key} in {name}, which does not hold it")

    def keys(self) -> list[str]:
        return list(self.location)

    def get(self, key: str) -> torch.Tensor:
        return self.shards[self.location[key]].read(key)

    def nbytes(self) -> int:
        return sum(s.path.stat().st_size for s in self.shards.values())


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
