"""Writing a checkpoint as layers finish, and proving it reloads, without a second copy of the model.

:class:`ShardSink` takes each finished decoder layer (and the trunk at the end), names its tensors as
``save_pretrained`` would (per-expert hub names, through transformers' own conversion table), and writes it to disk at
once as a part file, so memory never holds more than the layer at hand; at the end consecutive parts are joined, byte
for byte, into shards of at most ``max_shard_bytes`` (5 GB by default) with the usual index. Everything goes into a
hidden temporary folder beside the output, with a lock file naming the process; :meth:`ShardSink.commit` renames it
into place only after :func:`verify` has read the whole checkpoint back, layer by layer: strict key and shape loading
of every tensor into the output config's model (zero missing, unexpected or mismatched keys), and each layer read back
reproducing the merged layer's output on the probe hidden states, then the same final logits. On any failure (a full
disk, Ctrl-C, a failed check) the temporary folder is removed; a folder left by a killed process is recognised by its
dead lock owner and cleared by the next run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import MoemergeError
from .source import ShardSource
from .source import layers_prefix as _layers_prefix
from .trunk import Trunk, run_layer
from .weights import INDEX_FILE, KeyConverter

DEFAULT_SHARD_BYTES = 5 * 10**9  # the largest output shard, as save_pretrained's max_shard_size="5GB"
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
            if time.time() - tmp.stat().st_mtime < 60:  # a run that has just made its folder, lock not yet written
                continue
        if pid is None or not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def check_free(out: Path) -> None:
    """Refuse an output another live moemerge run is writing (after clearing what killed runs left behind)."""
    clear_stale(out)
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        raise MoemergeError(f"another moemerge run is writing {out} (its temporary folder {tmp.name} is locked by "
                            f"a live process); wait for it or choose another --output")


class ShardSink:
    """An output checkpoint folder written part by part: each :meth:`add` (a decoder layer, the trunk) goes to disk
    at once as a part file, so memory never holds more than the piece being added; :meth:`close_shards` then joins
    consecutive parts into shards of at most ``max_shard_bytes`` by copying their bytes (no tensor is loaded)."""

    def __init__(self, out: Path, converter: KeyConverter, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.out = Path(out)
        self.converter = converter
        self.max_shard_bytes = max_shard_bytes
        check_free(self.out)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        (self.tmp / LOCK_FILE).write_text(f"{os.getpid()}\n")
        self._parts: list[tuple[str, int]] = []  # (file name, data bytes)
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    # ---- tensors -----------------------------------------------------------------------------------------------
    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """In-memory tensors (full model keys) → hub names → part files on disk (several if they exceed the shard
        size; a single tensor larger than it gets a part of its own, as in ``save_pretrained``)."""
        part: dict[str, torch.Tensor] = {}
        size = 0
        for key, tensor in self.converter.to_hub(tensors).items():
            if key in self.weight_map or key in part:
                raise MoemergeError(f"tensor {key} written twice")
            t = tensor.detach().to("cpu").contiguous()
            nbytes = t.numel() * t.element_size()
            if part and size + nbytes > self.max_shard_bytes:
                self._write_part(part, size)
                part, size = {}, 0
            part[key] = t
            size += nbytes
        if part:
            self._write_part(part, size)

    def _write_part(self, tensors: dict[str, torch.Tensor], size: int) -> None:
        name = f"part-{len(self._parts):05d}.safetensors"
        _write(lambda: save_file(tensors, str(self.tmp / name), metadata={"format": "pt"}), name, self)
        for key in tensors:
            self.weight_map[key] = name
        self._parts.append((name, size))
        self.total_bytes += size

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

    def close_shards(self) -> None:
        """Join consecutive parts into shards of at most ``max_shard_bytes``, give them their final names and write
        the index (a single shard is ``model.safetensors``, as ``save_pretrained`` writes it)."""
        groups: list[list[str]] = []
        size = 0
        for name, nbytes in self._parts:
            if not groups or size + nbytes > self.max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes
        n = len(groups)
        final: dict[str, str] = {}
        for i, group in enumerate(groups):
            target = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            if len(group) == 1:
                os.replace(self.tmp / group[0], self.tmp / target)
            else:
                _write(lambda g=group, t=target: join_safetensors([self.tmp / p for p in g], self.tmp / t), target,
                       self)
                for part in group:
                    (self.tmp / part).unlink()
            final.update(dict.fromkeys(group, target))
        self.weight_map = {k: final[v] for k, v in self.weight_map.items()}
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))

    # ---- the folder ----------------------------------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        _write(lambda: (self.tmp / name).write_text(text), name, self)

    def commit(self, overwrite: bool) -> Path:
        (self.tmp / LOCK_FILE).unlink(missing_ok=True)
        umask = os.umask(0)
        os.umask(umask)
        for f in self.tmp.iterdir():  # safetensors creates its files 0600; give every file the usual mode
            if f.is_file():
                f.chmod(0o666 & ~umask)
        self.tmp.chmod(0o777 & ~umask)
        if self.out.exists():
            if not overwrite:
                raise MoemergeError(f"output folder {self.out} appeared during the run; pass --overwrite to replace it")
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _write(action, name: str, sink: ShardSink) -> None:
    """Run a write, turning a full disk (or any OS error) into one line naming the file."""
    try:
        action()
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise MoemergeError(f"the disk holding {sink.out.parent} is full while writing {name} "
                                f"({sink.total_bytes / 2**30:.1f} GiB written); free space and run again") from None
        raise MoemergeError(f"cannot write {name}: {exc}") from None


def join_safetensors(parts: list[Path], target: Path, chunk: int = 64 * 2**20) -> None:
    """Concatenate safetensors files into one by copying their data bytes (offsets shifted, one header)."""
    headers, starts, offset = [], [], 0
    for part in parts:
        with open(part, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        size = max((v["data_offsets"][1] for v in header.values()), default=0)
        headers.append((n, header, size))
        starts.append(offset)
        offset += size
    merged: dict = {"__metadata__": {"format": "pt"}}
    for (_, header, _), start in zip(headers, starts):
        for key, v in header.items():
            merged[key] = {**v, "data_offsets": [v["data_offsets"][0] + start, v["data_offsets"][1] + start]}
    text = json.dumps(merged, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to a multiple of 8 bytes
    with open(target, "wb") as out:
        out.write(len(text).to_bytes(8, "little"))
        out.write(text)
        for part, (n, _, size) in zip(parts, headers):
            with open(part, "rb") as fh:
                fh.seek(8 + n)
                left = size
                while left > 0:
                    block = fh.read(min(chunk, left))
                    if not block:
                        raise OSError(f"{part} ended early")
                    out.write(block)
                    left -= len(block)


def verify(folder: Path, probe: dict, dtype: torch.dtype, device: torch.device, config=None) -> float:
    """Read the written checkpoint back one layer at a time and check it against the probe recorded while merging:
    strict loading of every tensor (keys and shapes against the output config's model), each layer's output on its
    recorded input, and the final logits. Returns the largest logit difference; raises on any mismatch."""
    source = ShardSource(folder, dtype=dtype, device=device, config=config, strict=True)
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
