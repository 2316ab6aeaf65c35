"""Stage 4, save: put merged experts into the model, adapt the router, write a checkpoint that loads in stock
transformers, and prove it by reloading."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import MoemergeError
from ..families import family_of
from ..group.plan import MergePlan
from .formats import FORMATS, ROUTER_ADAPT, check_plan
from .mapped import check_expert_ids, remote_config

__all__ = ["FORMATS", "ROUTER_ADAPT", "check_plan", "apply_plan", "SaveReport", "save_checkpoint",
           "prepare_output", "count_parameters", "original_config", "router_statistics", "router_adapt_for"]


def router_adapt_for(recipe, spec) -> str:
    """The router adaptation actually used: fitted rows approximate a softmax, so sigmoid-scored routers
    (DeepSeek-V3) get the mean row."""
    return recipe.router_adapt if spec.scoring == "softmax" else "mean"


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
    from ..families import moe_layers

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
    if fmt.changes_count:
        count = max(counts.values()) if fmt.padded else next(iter(counts.values()))
        for key in spec.num_experts_keys:
            if hasattr(model.config, key):
                setattr(model.config, key, count)


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


def _edited_config(config: dict, model: nn.Module) -> dict:
    """Copy of the original config with only what must change: the expert count, and the dtype if the weights are
    saved in another dtype than the original's."""
    spec = family_of(model.config)
    new = dict(config)
    count = spec.num_experts(model.config)
    keys = [k for k in spec.num_experts_keys if k in new] or [spec.num_experts_keys[0]]
    for key in keys:
        new[key] = count
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in new and new[key] != dtype:
            new[key] = dtype
    return new


def _saved_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            keys.extend(handle.keys())
    return keys


def save_checkpoint(model: nn.Module, tokenizer, out: Path, config: dict, merge_info: dict,
                    probe: torch.Tensor, overwrite: bool = False, extra_files: dict[str, str] | None = None
                    ) -> SaveReport:
    """Write ``model`` to ``out`` atomically and verify the reload.

    Writes into a hidden temporary folder beside ``out``, reloads it with stock ``AutoModelForCausalLM`` (no
    missing, unexpected or mismatched keys allowed; logits on ``probe`` must match the in-memory model), and only
    then renames it to ``out``. On any failure nothing is left behind.
    """
    from transformers import AutoModelForCausalLM

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # Reverting only the conversions used at load time would write fused keys for a fused checkpoint; without
        # this attribute transformers reverts the family's full mapping: per-expert hub names, ids 0..E'-1.
        if hasattr(model, "_weight_conversions"):
            del model._weight_conversions
        model.save_pretrained(tmp)
        new_config = _edited_config(config, model)
        remote = remote_config(model, new_config)  # mapped/lowrank: ship the modeling code, custom model_type
        if remote is not None:
            new_config, code = remote
            extra_files = {**(extra_files or {}), **code}
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2))
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / "merge_info.json").write_text(json.dumps(merge_info, indent=2, default=str))

        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        check_expert_ids(_saved_keys(tmp))
        reloaded, info = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, output_loading_info=True,
                                                              trust_remote_code=remote is not None)
        missing, unexpected = list(info["missing_keys"]), list(info["unexpected_keys"])
        mismatched = list(info.get("mismatched_keys", []))
        if missing or unexpected or mismatched:
            raise MoemergeError(f"saved checkpoint does not reload cleanly: missing={missing[:3]} "
                                f"unexpected={unexpected[:3]} mismatched={mismatched[:3]}")
        with torch.no_grad():
            a = model(input_ids=probe.to(device)).logits.float().cpu()
            b = reloaded.to(device).eval()(input_ids=probe.to(device)).logits.float().cpu()
        diff = (a - b).abs().max().item()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        if diff > tol * max(1.0, a.abs().max().item()):
            raise MoemergeError(f"reloaded checkpoint gives different logits (max diff {diff:.3g})")
        params = count_parameters(reloaded)
        del reloaded
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SaveReport(out, params, folder_bytes(out), diff, missing, unexpected)
