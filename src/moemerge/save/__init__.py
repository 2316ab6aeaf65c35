"""Stage 4, save: put merged experts into a layer in the checkpoint format asked for, adapt the router, and edit the
config. Writing the files, and reading them back, is the executor's sink (:mod:`moemerge.execute.sink`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import MoemergeError
from ..families import family_of, moe_layers
from ..group.plan import MergePlan
from .formats import FORMATS, ROUTER_ADAPT, check_plan

__all__ = ["FORMATS", "ROUTER_ADAPT", "check_plan", "apply_plan", "SaveReport", "edited_config", "set_expert_count",
           "prepare_output", "count_parameters", "original_config", "router_statistics", "router_adapt_for"]


def router_adapt_for(recipe, spec) -> str:
    """The router adaptation actually used: the recipe's, for every scoring (the fitted rows of
    :mod:`.router_fit` have softmax and sigmoid targets)."""
    return recipe.router_adapt


def router_statistics(router: str, router_adapt: str) -> list[str]:
    """Statistics the format's router adaptation needs (a sample of router inputs for the fitted rows)."""
    fmt = FORMATS.get(router)
    uses_adapt = fmt.changes_count  # only formats that give groups fewer rows adapt them
    return ["router_inputs"] if uses_adapt and getattr(ROUTER_ADAPT.get(router_adapt), "needs_inputs", False) else []


def apply_plan(model: nn.Module, plan: MergePlan, merged: dict, frequencies: dict, router: str,
               router_adapt: str, stats=None) -> None:
    """Write merged experts (``merged[layer]``, a :class:`MergedLayer`) into the model in place, with the router
    handled by format ``router``; updates the config's expert count when the format changes it. ``stats`` supplies
    the calibration router inputs for fitted router rows (``router_adapt`` fit, fit_centered, kl)."""
    fmt = FORMATS.get(router)
    spec = family_of(model.config)
    counts = plan.counts()
    extra = {"num_slots": max(counts.values())} if fmt.padded else {}
    for layer in moe_layers(model):
        layer_plan = plan.layers[layer.index]
        if layer_plan.is_identity:
            continue
        inputs = None
        if stats is not None and "router_inputs" in stats.layers.get(layer.index, {}):
            inputs = stats.get(layer.index, "router_inputs")["x"]
        fmt.apply(layer, layer_plan, merged[layer.index], frequencies[layer.index], router_adapt,
                  inputs=inputs, **extra)
    set_expert_count(model.config, spec, plan, router)


@dataclass
class SaveReport:
    path: Path
    parameters: int
    file_bytes: int
    max_logit_diff: float
    missing_keys: list[str]
    unexpected_keys: list[str]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*.safetensors"))


def prepare_output(output_path: str | None, overwrite: bool) -> Path:
    """Check the output folder before any expensive work."""
    if not output_path:
        raise MoemergeError("no output folder given (--output / output_path)")
    out = Path(output_path).expanduser()
    if out.exists() and not overwrite:
        raise MoemergeError(f"output folder {str(out)!r} exists; pass --overwrite to replace it")
    if not out.parent.exists():
        raise MoemergeError(f"parent folder of {str(out)!r} does not exist")
    return out


def original_config(source: str, local_dir: Path | None, model: nn.Module) -> dict:
    """The checkpoint's own config.json (not v5's re-serialisation), so that only the keys we change differ."""
    if local_dir is not None:
        return json.loads((local_dir / "config.json").read_text())
    try:
        from transformers.utils import cached_file

        return json.loads(Path(cached_file(source, "config.json")).read_text())
    except Exception:  # in-memory model with no file behind it
        return model.config.to_dict()


def edited_config(config: dict, spec, count: int, dtype: torch.dtype) -> dict:
    """Copy of the original config.json with only what must change: the expert count, and the dtype if the weights
    are saved in another dtype than the original's (v5's own re-serialisation would rename keys that older readers
    and vLLM need, e.g. Qwen3-MoE's ``num_experts``)."""
    new = dict(config)
    keys = [k for k in spec.num_experts_keys if k in new] or [spec.num_experts_keys[0]]
    for key in keys:
        new[key] = count
    name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in new and new[key] != name:
            new[key] = name
    return new


def set_expert_count(config, spec, plan: MergePlan, router: str) -> None:
    """Update an in-memory config's expert count once a format that changes it has written every layer."""
    fmt = FORMATS.get(router)
    if not fmt.changes_count:
        return
    counts = plan.counts().values()
    count = max(counts) if fmt.padded else next(iter(counts))
    for key in spec.num_experts_keys:
        if hasattr(config, key):
            setattr(config, key, count)
