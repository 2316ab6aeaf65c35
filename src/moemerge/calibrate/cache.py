"""On-disk cache of calibration statistics, one entry per layer and statistic, so that many plans reuse one pass over
the model and an interrupted run resumes from the layers it finished.

Layout: ``<cache_root>/stats/<key>/layer-<i>/<statistic>.safetensors`` (tensors named by field) and ``meta.json``
(model fingerprint, calibration settings, library versions). The key hashes the model fingerprint and the exact
calibration token windows, so any change in model, text, seq_len, n_sentences or seed misses the cache. Every file is
written under a unique temporary name and renamed into place, so a killed run or a second run writing the same
entry at the same time never leaves a truncated file that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__

LayerStats = dict[int, dict[str, dict[str, torch.Tensor]]]


def cache_key(model_fingerprint: str, windows: torch.Tensor) -> str:
    h = hashlib.sha256(model_fingerprint.encode())
    h.update(str(tuple(windows.shape)).encode())
    h.update(windows.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:20]


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class StatsCache:
    def __init__(self, root: Path, key: str) -> None:
        self.dir = Path(root) / "stats" / key

    def _layer_dir(self, layer: int) -> Path:
        return self.dir / f"layer-{layer}"

    def available(self, layer: int) -> set[str]:
        """Statistics stored for ``layer``."""
        d = self._layer_dir(layer)
        return {p.stem for p in d.glob("*.safetensors")} if d.is_dir() else set()

    def load(self, layer: int, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """``{statistic: {field: tensor}}`` of ``layer``; an unreadable entry is treated as absent (recomputed)."""
        out = {}
        for name in names:
            try:
                out[name] = load_file(self._layer_dir(layer) / f"{name}.safetensors")
            except (OSError, SafetensorError):
                continue
        return out

    def save(self, layer: int, stats: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
        d = self._layer_dir(layer)
        d.mkdir(parents=True, exist_ok=True)
        for name, fields in stats.items():
            tensors = {f: t.contiguous().cpu() for f, t in fields.items()}
            _atomic_write(d / f"{name}.safetensors", lambda tmp, t=tensors: save_file(t, tmp))
        meta_path = self.dir / "meta.json"
        if not meta_path.exists():
            text = json.dumps({**meta, "versions": versions()}, indent=2, default=str)
            _atomic_write(meta_path, lambda tmp: Path(tmp).write_text(text))


def versions() -> dict[str, str]:
    import transformers

    return {"moemerge": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
