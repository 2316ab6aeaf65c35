"""Writing a checkpoint as layers finish, and proving it reloads, without a second copy of the model.

:class:`ShardSink` takes each finished decoder layer (and the trunk at the end), names its tensors as
``save_pretrained`` would (per-expert hub names, through transformers' own conversion table), and appends them to the
current output shard; a shard is written as soon as it would pass ``max_shard_bytes`` (5 GB by default), so memory
holds at most one shard's worth of tensors. Everything goes into a hidden temporary folder beside the output, with a
lock file naming the process; :meth:`ShardSink.commit` renames it into place only after :func:`verify` has read the
whole checkpoint back, layer by layer: strict key and shape loading of every tensor into the output config's model
(zero missing, unexpected or mismatched keys), and each layer read back reproducing the merged layer's output on the
probe hidden states, then the same final logits. On any failure (a full disk, Ctrl-C, a failed check) the temporary
folder is removed; a folder left by a killed process is recognised by its dead lock owner and cleared by the next run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import MoemergeError
from .weights import INDEX_FILE, KeyConverter

DEFAULT_SHARD_BYTES = 5 * 10**9
LOCK_FILE = ".moemerge-lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale(out: Path) -> None:
    """Remove temporary folders of ``out`` left behind by killed runs (their lock names a dead process)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        lock = tmp / LOCK_FILE
        try:
            pid = int(lock.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        if pid is None or not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


class ShardSink:
    """An output checkpoint folder written tensor group by tensor group."""

    def __init__(self, out: Path, converter: KeyConverter, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.out = Path(out)
        self.converter = converter
        self.max_shard_bytes = max_shard_bytes
        clear_stale(self.out)
        for tmp in self.out.parent.glob(f".{self.out.name}.tmp-*"):
            raise MoemergeError(f"another moemerge run is writing {self.out} (its temporary folder {tmp.name} is "
                                f"locked by a live process); wait for it or choose another --output")
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        (self.tmp / LOCK_FILE).write_text(f"{os.getpid()}\n")
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    # ---- tensors -----------------------------------------------------------------------------------------------
    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """In-memory tensors (full model keys) → hub names → the current shard."""
        for key, tensor in self.converter.to_hub(tensors).items():
            if key in self.weight_map or key in self._pending:
                raise MoemergeError(f"tensor {key} written twice")
            t = tensor.detach().to("cpu").contiguous()
            size = t.numel() * t.element_size()
            if self._pending and self._pending_bytes + size > self.max_shard_bytes:
                self._flush()
            self._pending[key] = t
            self._pending_bytes += size

    def add_layer(self, index: int, layer: nn.Module) -> None:
        prefix = f"{_layers_prefix(self.converter.model)}.{index}."
        self.add({prefix + k: v for k, v in layer.state_dict().items()})

    def add_trunk(self, model: nn.Module) -> None:
        """Every persistent tensor outside the decoder layers, tied ones once (as ``save_pretrained`` does)."""
        prefix = _layers_prefix(model) + "."
        seen: set[int] = set()
        tensors = {}
        for key, t in model.state_dict(keep_vars=True).items():
            if key.startswith(prefix) or id(t) in seen:
                continue
            seen.add(id(t))
            tensors[key] = t.data if isinstance(t, nn.Parameter) else t
        self.add(tensors)

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"model-{len(self._files) + 1:05d}.safetensors"
        try:
            save_file(self._pending, str(self.tmp / name), metadata={"format": "pt"})
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise MoemergeError(f"the disk holding {self.out.parent} is full while writing {name} "
                                    f"({self.total_bytes / 2**30:.1f} GiB written); free space and run again") \
                    from None
            raise MoemergeError(f"cannot write {name}: {exc}") from None
        for key in self._pending:
            self.weight_map[key] = name
        self._files.append(name)
        self.total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def close_shards(self) -> None:
        """Write the last shard, give the shards their final names and write the index."""
        self._flush()
        n = len(self._files)
        final = {name: ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
                 for i, name in enumerate(self._files)}
        for old, new in final.items():
            os.replace(self.tmp / old, self.tmp / new)
        self.weight_map = {k: final[v] for k, v in self.weight_map.items()}
        self._files = list(final.values())
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))

    # ---- the folder ----------------------------------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text)

    def commit(self, overwrite: bool) -> Path:
        (self.tmp / LOCK_FILE).unlink(missing_ok=True)
        if self.out.exists():
            if not overwrite:
                raise MoemergeError(f"output folder {self.out} appeared during the run; pass --overwrite to replace it")
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _layers_prefix(model: nn.Module) -> str:
    from .source import _layers_prefix as prefix

    return prefix(model)


def verify(folder: Path, probe: dict, dtype: torch.dtype, device: torch.device, config=None) -> float:
    """Read the written checkpoint back one layer at a time and check it against the probe recorded while merging:
    strict loading of every tensor (keys and shapes against the output config's model), each layer's output on its
    recorded input, and the final logits. Returns the largest logit difference; raises on any mismatch."""
    from .source import ShardSource
    from .trunk import Trunk, run_layer

    source = ShardSource(folder, dtype=dtype, device=device, config=config)
    try:
        trunk = Trunk(source.model)
        ids = probe["ids"].to(device)
        hidden, calls = trunk.layer_inputs(ids)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        _close(hidden, probe["input"], tol, "the embeddings")
        for i in range(source.num_layers):
            source.prefetch(i + 1)
            layer = source.layer(i)  # strict: a missing, unexpected or mismatched tensor fails here
            x, y = probe["layers"][i]
            with torch.no_grad():
                got = run_layer(layer, x.to(device), calls[i])
            _close(got, y, tol, f"decoder layer {i}")
            source.release(i)
        with torch.no_grad():
            logits = trunk.logits(ids, probe["layers"][source.num_layers - 1][1].to(device)).float().cpu()
        return _close(logits, probe["logits"].float(), tol, "the final logits")
    finally:
        source.close()


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> float:
    got, want = got.float().cpu(), want.float().cpu()
    diff = (got - want).abs().max().item() if got.numel() else 0.0
    if got.shape != want.shape or not diff <= tol * max(1.0, want.abs().max().item()):
        raise MoemergeError(f"reload check failed: {what} read back from the checkpoint differ from the merged model "
                            f"(max difference {diff:.3g})")
    return diff
