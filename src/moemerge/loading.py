"""Loading models and tokenizers from a local folder or the Hugging Face hub (the I/O edge of the pipeline)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import MoemergeError
from .families import family_of, moe_layers
from .paths import model_folder

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """A model with what the later stages need to know about where it came from."""

    model: nn.Module
    tokenizer: object
    source: str  # folder or hub id
    local_dir: Path | None  # folder holding config.json, when there is one
    fingerprint: str


def resolve_dtype(name: str | None) -> torch.dtype | str:
    if name in (None, "auto"):
        return "auto"
    try:
        return DTYPES[name]
    except KeyError:
        raise MoemergeError(f"unknown dtype {name!r}; valid choices: auto, {', '.join(DTYPES)}") from None


def resolve_device(name: str | None) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MoemergeError(f"device {name!r} requested but CUDA is not available")
    return name


#: Sustained throughput (flop/s) the self-calibration estimate assumes for a model's own forward passes, in its own
#: dtype: kept low on CPU, where bf16 matmuls are several times slower than fp32 ones (the block fit, always fp32, has
#: its own rates: :data:`~moemerge.save.router_refit.BLOCK_RATES`); CUDA: a data-centre GPU's fp32 rate.
FLOPS = {"cpu": 2e10, "cuda": 2e13}


def device_kind(device: str | torch.device) -> str:
    """The key of the time estimates' rate tables for ``device``: ``cuda`` for ``cuda``/``cuda:N``, else ``cpu``."""
    return "cuda" if str(device).startswith("cuda") else "cpu"


def device_flops(device: str) -> float:
    """:data:`FLOPS` for ``device`` (:func:`device_kind`)."""
    return FLOPS[device_kind(device)]


def ships_moemerge_code(config_path: Path) -> bool:
    """A checkpoint written by moemerge's ``mapped`` / ``lowrank`` formats: its ``auto_map`` points at the
    ``modeling_moemerge.py`` we ship, so loading it runs our own code, not a stranger's."""
    try:
        auto_map = json.loads(config_path.read_text()).get("auto_map", {})
    except (OSError, json.JSONDecodeError):
        return False
    return bool(auto_map) and all(str(v).startswith("modeling_moemerge.") for v in auto_map.values())


def check_shipped_code(folder: Path) -> None:
    """A folder that claims moemerge's modeling code must hold exactly the file moemerge writes (or none): moemerge
    loads it through its own installed classes either way, and refuses a folder whose file was changed."""
    from .save.mapped import REMOTE_DIR, REMOTE_FILE

    shipped = folder / REMOTE_FILE
    if shipped.exists() and shipped.read_bytes() != (REMOTE_DIR / REMOTE_FILE).read_bytes():
        raise MoemergeError(f"{shipped} differs from the modeling code moemerge writes; refusing a folder whose code "
                            f"was changed (moemerge never runs a model folder's own code)")


def hub_config_folder(source: str) -> Path:
    """The hub cache folder holding hub id ``source``'s ``config.json`` (downloaded once; transformers then reads it
    from the cache), or a one-line error (offline, unknown or gated repo) before anything else is tried."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, "config.json")).parent
    except Exception as exc:  # many exception types
        raise MoemergeError(f"cannot load config of {source!r}: {str(exc).splitlines()[0]}") from None


def load_model(source: str, dtype: str | None = "auto", device: str | None = "auto",
               device_map: str | None = None, require_moe: bool = True) -> LoadedModel:
    """Load a causal-LM MoE checkpoint and its tokenizer.

    Args:
        source: a local folder or a hub id (``mistralai/Mixtral-8x7B-v0.1``).
        dtype: ``auto`` (the checkpoint's), ``bfloat16`` or ``float32``.
        device: ``cpu``, ``cuda`` or ``auto``; ignored when ``device_map`` is given.
        device_map: passed to ``from_pretrained`` (``auto`` spreads a large model over several GPUs).
        require_moe: refuse models whose MoE layers moemerge cannot merge (dense models, and moemerge's own
            ``mapped`` / ``lowrank`` checkpoints, which can be evaluated but not merged again).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .save.remote.registered import register_folder

    local_dir = model_folder(source)
    register_folder(local_dir if local_dir is not None else hub_config_folder(source))  # moemerge's mapped types

    where = str(local_dir) if local_dir else source

    ours = local_dir is not None and ships_moemerge_code(local_dir / "config.json")
    if ours:
        check_shipped_code(local_dir)
    try:
        # Never trust_remote_code: moemerge's own formats load through the classes installed with it (registered
        # above), and any other folder's Python file is never run.
        config = AutoConfig.from_pretrained(where, trust_remote_code=False)
    except (OSError, ValueError) as exc:  # offline hub, unknown repo, malformed config
        raise MoemergeError(f"cannot load config of {source!r}: {str(exc).splitlines()[0]}") from None
    if require_moe:
        if ours:
            raise MoemergeError(f"{source!r} is a moemerge {config.model_type} checkpoint (mapped/lowrank format): "
                                "evaluate it with `moemerge eval`; merge or analyse the original or a keep/compact one")
        family_of(config)  # fail on dense / unsupported models before loading any weight
    kwargs: dict = {"dtype": resolve_dtype(dtype), "trust_remote_code": False}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise MoemergeError(f"cannot load {source!r}: {str(exc).splitlines()[0]}") from None
    if not device_map:
        model.to(resolve_device(device))
    model.eval()
    if require_moe:
        moe_layers(model)
    return LoadedModel(model, tokenizer, source, local_dir,
                       fingerprint(model, local_dir, source) if require_moe else "")


@dataclass
class Checkpoint:
    """A checkpoint folder opened without reading any weight: config, tokenizer and fingerprint."""

    folder: Path
    config: object
    config_dict: dict
    tokenizer: object
    fingerprint: str


HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


def open_checkpoint(source: str) -> Checkpoint:
    """A local folder, or a hub id downloaded (safetensors, config and tokenizer files only) to the hub cache; then
    the config and tokenizer, checked to be a MoE family moemerge can merge. No weight is read."""
    from transformers import AutoConfig, AutoTokenizer

    from .save.remote.registered import register_folder

    path = model_folder(source)
    if path is None:
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source, allow_patterns=HUB_PATTERNS))
        except Exception as exc:  # offline, unknown repo, gated: many exception types
            raise MoemergeError(f"cannot download {source!r}: {str(exc).splitlines()[0]}") from None
    try:
        config_dict = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MoemergeError(f"{path / 'config.json'}: not a JSON config ({exc})") from None
    if ships_moemerge_code(path / "config.json"):
        check_shipped_code(path)
        raise MoemergeError(f"{source!r} is a moemerge {config_dict.get('model_type')} checkpoint (mapped/lowrank "
                            "format): evaluate it with `moemerge eval`; merge the original or a keep/compact one")
    register_folder(path)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise MoemergeError(f"cannot load config of {source!r}: {str(exc).splitlines()[0]}") from None
    family_of(config)  # dense or unsupported models fail before anything else
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise MoemergeError(f"cannot load the tokenizer of {source!r}: {str(exc).splitlines()[0]}") from None
    return Checkpoint(path, config, config_dict, tokenizer, fingerprint(None, path, source))


def fingerprint(model: nn.Module | None, local_dir: Path | None = None, source: str = "") -> str:
    """A short hash that changes when the weights change, used to key the statistics cache.

    For a folder it hashes config.json and each safetensors file's name, size and header (the header lists every
    tensor with its byte offsets, so any change in shapes or files shows). Models that only exist in memory are
    hashed from the config and a checksum of every MoE tensor.
    """
    h = hashlib.sha256()
    if local_dir is not None:
        h.update((local_dir / "config.json").read_bytes())
        for f in sorted(local_dir.glob("*.safetensors")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(min(n, 1 << 24)))
    else:
        h.update(source.encode())
        h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
        for layer in moe_layers(model):
            for t in (*layer.expert_weights(), layer.router_weight.data):
                t64 = t.double()
                h.update(f"{t64.sum().item():.10e}:{t64.abs().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("MOEMERGE_CACHE", Path.home() / ".cache" / "moemerge"))
