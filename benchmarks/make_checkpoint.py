"""Write a random-weight MoE checkpoint folder with a real model's shapes, one decoder layer at a time.

    python benchmarks/make_checkpoint.py /tmp/qwen-moe --preset qwen1.5-moe-a2.7b          # 14.3 B params, 28.6 GB
    python benchmarks/make_checkpoint.py /tmp/deep --preset deep-small --layers 32 --dtype float32
    python benchmarks/make_checkpoint.py /tmp/tiny --preset tiny --verify --overwrite

The model is never materialised: the tensor names and shapes come from transformers itself (the model class built on
the meta device, its in-memory names mapped to the per-expert names of the hub format with
``transformers.core_model_loading.revert_weight_conversion``), and the data is generated tensor by tensor. Tensors are
gathered into a shard until the next one would push it past ``--max-shard-gb``; the shard is then written with
``safetensors.torch.save_file`` and freed, so the peak memory is about one shard plus one tensor whatever the depth.

Values: norm weights are ones, biases zeros, every other tensor is normal(0, 0.02), drawn from a generator seeded from
(seed, tensor name), so the output does not depend on the shard size or on the other tensors. The folder also gets a
hub-style ``config.json`` (the preset plus ``torch_dtype``), the 4096-token tokenizer of the bundled tiny-qwen-moe model
and a ``model.safetensors.index.json``. It is written to ``OUT_DIR.tmp`` and renamed to ``OUT_DIR`` when complete.

``--verify`` (small checkpoints only) loads the result with stock ``AutoModelForCausalLM.from_pretrained`` and checks
that there are no missing, unexpected or mismatched keys and that the logits are finite.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_SOURCE = REPO_ROOT / "src" / "moemerge" / "zoo" / "models" / "tiny-qwen-moe"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt")
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INIT_STD = 0.02
CHUNK_ELEMENTS = 1 << 24  # random numbers are drawn in float32 chunks of this many elements, then cast

# Hub-style config dicts (as in the config.json of the real checkpoints). The tokenizer copied into the folder has
# 4096 tokens: <unk>=0, <s>=1, </s>=2, <pad>=3; the real presets keep their own (valid) bos/eos ids.
PRESETS: dict[str, dict[str, Any]] = {
    # Exactly the config.json of Qwen/Qwen1.5-MoE-A2.7B (14.3 B parameters).
    "qwen1.5-moe-a2.7b": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 5632,
        "max_position_embeddings": 8192,
        "max_window_layers": 21,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "num_key_value_heads": 16,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
        "decoder_sparse_step": 1,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_experts_per_tok": 4,
        "num_experts": 60,
        "norm_topk_prob": False,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "mlp_only_layers": [],
        "qkv_bias": True,
    },
    # Shapes of mistralai/Mixtral-8x7B-v0.1 (46.7 B parameters).
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "num_attention_heads": 32,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": 32000,
    },
    # Same width at any depth, for the memory-versus-depth benchmark (about 8 M parameters per layer).
    "deep-small": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "hidden_act": "silu",
        "hidden_size": 512,
        "intermediate_size": 1024,
        "max_position_embeddings": 2048,
        "num_attention_heads": 8,
        "num_hidden_layers": 8,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vocab_size": 8192,
        "decoder_sparse_step": 1,
        "moe_intermediate_size": 256,
        "shared_expert_intermediate_size": 512,
        "num_experts_per_tok": 4,
        "num_experts": 16,
        "norm_topk_prob": False,
        "mlp_only_layers": [],
        "qkv_bias": True,
    },
}
# For tests and quick checks: deep-small at a tenth of the width.
PRESETS["tiny"] = {
    **PRESETS["deep-small"], "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 512,
    "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4, "vocab_size": 4096,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "num_experts_per_tok": 2, "num_experts": 8,
}

_LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint: its hub name and shape."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class CheckpointPlan:
    """Every tensor of a checkpoint, in writing order: the non-layer tensors that precede the decoder layers
    (embeddings), one list per decoder layer, then the rest (final norm, LM head)."""

    config: dict[str, Any]
    head: list[TensorSpec] = field(default_factory=list)
    layers: list[list[TensorSpec]] = field(default_factory=list)
    tail: list[TensorSpec] = field(default_factory=list)

    def tensors(self) -> Iterator[TensorSpec]:
        """All tensors in writing order."""
        yield from self.head
        for layer in self.layers:
            yield from layer
        yield from self.tail

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors())

    @property
    def non_layer_parameters(self) -> int:
        """Embeddings, final norm and LM head."""
        return sum(t.numel for t in (*self.head, *self.tail))

    def layer_parameters(self, index: int) -> int:
        return sum(t.numel for t in self.layers[index])

    @property
    def max_layer_parameters(self) -> int:
        return max((self.layer_parameters(i) for i in range(len(self.layers))), default=0)


@dataclass
class CheckpointStats:
    """What :func:`write_checkpoint` wrote."""

    path: Path
    num_parameters: int
    total_bytes: int
    num_shards: int
    seconds: float
    peak_rss_bytes: int


def preset_config(name: str, layers: int | None = None, dtype: str = "bfloat16") -> dict[str, Any]:
    """The hub-style config dict of preset ``name``, with ``num_hidden_layers`` overridden by ``layers`` and
    ``torch_dtype`` set to ``dtype``."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise KeyError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    config = copy.deepcopy(PRESETS[name])
    if layers is not None:
        if layers < 1:
            raise ValueError("layers must be at least 1")
        config["num_hidden_layers"] = layers
    config["torch_dtype"] = dtype
    return config


def _meta_model(config: dict[str, Any]) -> torch.nn.Module:
    """The causal-LM class of ``config`` built on the meta device (no memory for the weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:  # read the config exactly as from_pretrained will read config.json
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        hf_config = AutoConfig.from_pretrained(tmp)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def _meta_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without the tied duplicates that ``save_pretrained`` leaves out (the first name of a
    shared parameter is kept, e.g. the embeddings rather than a tied LM head)."""
    state = model.state_dict()
    all_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    unique_names = {name for name, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k not in all_names - unique_names}


def _hub_specs(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[TensorSpec]:
    """Hub names and shapes of the in-memory (meta) tensors ``state``: fused expert tensors are split back into
    per-expert tensors and renamed as the family's checkpoints name them."""
    from transformers.core_model_loading import revert_weight_conversion

    if not state:
        return []
    reverted = revert_weight_conversion(model, dict(state))
    return [TensorSpec(name, tuple(int(d) for d in t.shape)) for name, t in reverted.items()]


def plan_checkpoint(config: dict[str, Any]) -> CheckpointPlan:
    """Names and shapes of every tensor of the checkpoint for ``config`` (a hub-style config dict), from the model
    class of transformers on the meta device; nothing is allocated."""
    model = _meta_model(config)
    state = _meta_state_dict(model)
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    tail: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _LAYER_KEY.search(key)
        if match:
            by_layer.setdefault(int(match.group(1)), {})[key] = tensor
        else:
            (tail if by_layer else head)[key] = tensor
    expected = int(config["num_hidden_layers"])
    if sorted(by_layer) != list(range(expected)):
        raise RuntimeError(f"found decoder layers {sorted(by_layer)} in the meta model, expected 0..{expected - 1}")
    plan = CheckpointPlan(config=config, head=_hub_specs(model, head), tail=_hub_specs(model, tail))
    # One layer at a time: layers may differ (dense layers of mlp_only_layers / decoder_sparse_step).
    plan.layers = [_hub_specs(model, by_layer[i]) for i in range(expected)]
    names = [t.name for t in plan.tensors()]
    if len(names) != len(set(names)):
        raise RuntimeError("duplicate tensor names after revert_weight_conversion")
    return plan


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of the model of ``config`` (tied weights counted once), from the meta model."""
    return sum(p.numel() for p in _meta_model(config).parameters())


def _tensor_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, tensor name)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_tensor(spec: TensorSpec, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The values of one tensor: ones for norm weights, zeros for biases, normal(0, 0.02) otherwise (drawn in float32
    chunks so the temporary stays small, then cast to ``dtype``)."""
    leaf = spec.name.split(".")
    if leaf[-1] == "bias":
        return torch.zeros(spec.shape, dtype=dtype)
    if len(leaf) >= 2 and "norm" in leaf[-2]:
        return torch.ones(spec.shape, dtype=dtype)
    out = torch.empty(spec.shape, dtype=dtype)
    flat = out.view(-1)
    generator = torch.Generator().manual_seed(_tensor_seed(seed, spec.name))
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, flat.numel())
        flat[start:stop] = torch.randn(stop - start, generator=generator).mul_(INIT_STD)
    return out


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _copy_tokenizer(dest: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        source = TOKENIZER_SOURCE / name
        if source.is_file():
            shutil.copy2(source, dest / name)
            copied.append(name)
    return copied


def write_checkpoint(out_dir: str | Path, config: dict[str, Any], *, seed: int = 0, max_shard_gb: float = 5.0,
                     overwrite: bool = False, plan: CheckpointPlan | None = None,
                     log: Callable[[str], None] | None = print) -> CheckpointStats:
    """Write the random-weight checkpoint of ``config`` (from :func:`preset_config`) to ``out_dir``.

    Tensors are generated one at a time in the plan's order (embeddings, layer 0, layer 1, ..., final norm, LM head)
    and written in shards of at most ``max_shard_gb`` GB (a single larger tensor gets a shard of its own). The folder
    is built as ``out_dir.tmp`` and renamed at the end; an existing ``out_dir`` is refused unless ``overwrite``.
    """
    say = log or (lambda _msg: None)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (use --overwrite)")
    dtype_name = str(config.get("torch_dtype", "bfloat16"))
    dtype = DTYPES[dtype_name]
    element_size = torch.empty((), dtype=dtype).element_size()
    max_bytes = int(max_shard_gb * 1e9)
    if max_bytes <= 0:
        raise ValueError("max_shard_gb must be positive")

    t0 = time.perf_counter()
    plan = plan or plan_checkpoint(config)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_tokenizer(tmp)

    from safetensors.torch import save_file

    shard_files: list[Path] = []
    shard_of: dict[str, int] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    total_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending:
            return
        path = tmp / f"shard-{len(shard_files) + 1:05d}.safetensors.partial"
        save_file(pending, str(path), metadata={"format": "pt"})
        for name in pending:
            shard_of[name] = len(shard_files)
        shard_files.append(path)
        say(f"  shard {len(shard_files)}: {len(pending)} tensors, {pending_bytes / 1e9:.2f} GB "
            f"({time.perf_counter() - t0:.1f} s, peak RSS {peak_rss_bytes() / 2**30:.2f} GiB)")
        pending = {}
        pending_bytes = 0
        gc.collect()

    for spec in plan.tensors():
        nbytes = spec.numel * element_size
        if pending and pending_bytes + nbytes > max_bytes:
            flush()
        pending[spec.name] = make_tensor(spec, dtype, seed)
        pending_bytes += nbytes
        total_bytes += nbytes
    flush()

    count = len(shard_files)
    final_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    for path, name in zip(shard_files, final_names):
        path.rename(tmp / name)
    index = {"metadata": {"total_size": total_bytes},
             "weight_map": {name: final_names[i] for name, i in shard_of.items()}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return CheckpointStats(path=out, num_parameters=plan.num_parameters, total_bytes=total_bytes, num_shards=count,
                           seconds=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes())


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load ``path`` with stock ``AutoModelForCausalLM.from_pretrained`` and run one forward pass; raise if any key is
    missing, unexpected or mismatched or the logits are not finite. Returns a small summary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    problems = {k: list(v) for k, v in info.items() if k != "error_msgs" and v}
    if info.get("error_msgs"):
        problems["error_msgs"] = list(info["error_msgs"])
    if problems:
        raise RuntimeError(f"loading {path} reported: {problems}")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"non-finite logits from {path}")
    return {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "loading_info": {k: len(v) for k, v in info.items()}, "logits_shape": tuple(logits.shape),
            "logits_std": float(logits.float().std())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="Folder to create.")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=None, help="Override num_hidden_layers.")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing OUT_DIR.")
    parser.add_argument("--verify", action="store_true",
                        help="Load the result with from_pretrained and check keys and logits (small models only).")
    args = parser.parse_args(argv)

    if Path(args.out_dir).exists() and not args.overwrite:
        print(f"error: {args.out_dir} exists (use --overwrite)", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = preset_config(args.preset, args.layers, args.dtype)
    t_plan = time.perf_counter()
    plan = plan_checkpoint(config)
    t_plan = time.perf_counter() - t_plan
    element_size = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    layers = len(plan.layers)
    print(f"{args.preset}: {layers} layers, {plan.num_parameters / 1e9:.3f} B parameters "
          f"({plan.non_layer_parameters / 1e9:.3f} B embeddings/norm/LM head, "
          f"{plan.layer_parameters(0) / 1e9:.4f} B in layer 0), "
          f"{plan.num_parameters * element_size / 1e9:.2f} GB in {args.dtype} "
          f"(key plan {t_plan:.1f} s)")
    full_layers = int(PRESETS[args.preset]["num_hidden_layers"])
    if layers != full_layers:
        full = count_parameters(preset_config(args.preset, full_layers, args.dtype))
        print(f"  the full preset ({full_layers} layers) would have {full / 1e9:.3f} B parameters, "
              f"{full * element_size / 1e9:.2f} GB in {args.dtype}")
    try:
        stats = write_checkpoint(args.out_dir, config, seed=args.seed, max_shard_gb=args.max_shard_gb,
                                 overwrite=args.overwrite, plan=plan)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {stats.path}: {stats.num_parameters:,} parameters, {stats.total_bytes:,} bytes "
          f"({stats.total_bytes / 1e9:.3f} GB) in {stats.num_shards} shard(s), {stats.seconds:.1f} s, "
          f"peak RSS {stats.peak_rss_bytes / 2**30:.2f} GiB")
    if args.verify:
        summary = verify_checkpoint(stats.path)
        print(f"verified: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
