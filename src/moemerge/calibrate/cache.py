"""On-disk cache of calibration statistics, so that many plans reuse one pass over the model.

Layout: ``<cache_root>/stats/<key>/<statistic>.safetensors`` (tensors named ``<layer>.<field>``) and ``meta.json``
(model fingerprint, calibration settings, library versions, statistics present). The key hashes the model
fingerprint and the exact calibration token windows, so any change in model, text, seq_len, n_sentences or seed
misses the cache. Statistics are stored one file each: a later plan that needs one more statistic computes only
that one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import __version__

LayerStats = dict[int, dict[str, dict[str, torch.Tensor]]]


def cache_key(model_fingerprint: str, windows: torch.Tensor) -> str:
    h = hashlib.sha256(model_fingerprint.encode())
    h.update(str(tuple(windows.shape)).encode())
    h.update(windows.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:20]


class StatsCache:
    def __init__(self, root: Path, key: str) -> None:
        self.dir = Path(root) / "stats" / key

    def available(self) -> set[str]:
        meta = self._meta()
        return set(meta.get("statistics", [])) if meta else set()

    def _meta(self) -> dict | None:
        try:
            return json.loads((self.dir / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def load(self, names: list[str]) -> LayerStats:
        out: LayerStats = {}
        for name in names:
            for key, tensor in load_file(self.dir / f"{name}.safetensors").items():
                layer, field = key.split(".", 1)
                out.setdefault(int(layer), {}).setdefault(name, {})[field] = tensor
        return out

    def save(self, stats: LayerStats, meta: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        names = {n for per_layer in stats.values() for n in per_layer}
        for name in names:
            flat = {f"{li}.{field}": t.contiguous() for li, per in stats.items() for field, t in per[name].items()}
            # Write then rename so a killed run never leaves a truncated file that a later run would trust.
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            os.close(fd)
            save_file(flat, tmp)
            os.replace(tmp, self.dir / f"{name}.safetensors")
        old = self._meta() or {}
        meta = {**old, **meta, "statistics": sorted(set(old.get("statistics", [])) | names)}
        meta["versions"] = versions()
        (self.dir / "meta.json").write_text(json.dumps(meta, indent=2))


def versions() -> dict[str, str]:
    import transformers

    return {"moemerge": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
