"""The one recipe object shared by the CLI, the Python API, YAML files and ``merge_info.json``.

Option names are those of the HC-SMoE argument document (``num_average_groups``, ``n_sentences``,
``train_batch_size``, ``dominant``, ``similarity_base``, ``cluster``, ``linkage``, ``merge``, ...). Method-valued
options are checked against the registries, so a new method registered anywhere is accepted here with no edit.
The CLI generates one ``--option`` per field from this class (dashes or underscores), with the field's description
as its one-line help.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import MoemergeError


def _choices(registry_name: str) -> list[str]:
    """Names registered for a method kind (imported lazily: registries fill up as their modules import)."""
    from . import methods

    return methods.REGISTRIES[registry_name].names()


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / a number of bytes -> bytes (units as in ``save_pretrained``)."""
    raw = str(text).strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number):]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"{text!r} is not a size (e.g. 5GB, 500MB, 2GiB)") from None
    if value < 1:
        raise ValueError(f"size {text!r} must be positive")
    return int(value)


#: Calibration tokens by default: HC-SMoE's 32 windows of 2048 (arXiv 2410.08589). The amount of text is what the
#: statistics and the fitted merges learn from, so a model with shorter windows gets more of them, not fewer tokens.
#: Measured on the bundled tiny-mixtral (256 positions; ``docs/quality.md``): 32 → 128 → 256 windows of 256 took the
#: fitted, block-fitted merges from ×1.319 to ×1.234 to ×1.228 at 75 % fewer experts, and from ×1.166 to ×1.100 to
#: ×1.087 written compact at 50 %.
CALIBRATION_TOKENS = 32 * 2048


def default_window_count(seq_len: int) -> int:
    """``n_sentences`` when the recipe leaves it unset: 32 windows, or as many as hold :data:`CALIBRATION_TOKENS`
    when windows are shorter than 2048 tokens."""
    return max(32, -(-CALIBRATION_TOKENS // seq_len))


class Recipe(BaseModel):
    """Every option of a merge run. Defaults reproduce the HC-SMoE paper (expert-output similarity, hierarchical
    clustering with average linkage, frequency-weighted merging, router kept)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    # ---- model and output -------------------------------------------------------------------------------------
    model_path: str | None = Field(None, description="Model folder or hub id (the MODEL argument sets it too).")
    output_path: str | None = Field(None, description="Folder to write the merged checkpoint to (created).")
    result_path: str | None = Field(None, description="JSON file for evaluation results (default OUTPUT/eval.json).")
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        "auto", description="Load dtype; merging is done in fp32 and cast back once.")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto (cuda when available).")
    device_map: str | None = Field(None, description="from_pretrained device_map, e.g. auto for several GPUs.")

    # ---- calibration ------------------------------------------------------------------------------------------
    calibration: str | None = Field(
        None, description="Calibration text: .jsonl/.txt file or folder, bundled[:split], c4, wikitext2 "
                          "(default: c4 online, bundled offline).")
    n_sentences: int | None = Field(
        None, ge=1, description="Number of calibration windows of seq_len tokens (default: 32, or more when windows "
                                "are shorter than 2048 tokens, so that they hold HC-SMoE's 65,536 tokens).")
    seq_len: int | None = Field(
        None, ge=2, description="Tokens per calibration window (default: min(2048, model's max positions)).")
    self_calibration: float = Field(
        0.0, ge=0, le=1, description="Share of the calibration windows sampled from the model itself (temperature 1, "
                                     "in chains continuing its own documents from its start token) instead of cut "
                                     "from the calibration text: a guard when "
                                     "the text of use is unlike the calibration text; 1 needs no text. Loads the "
                                     "whole model once to sample.")
    train_batch_size: int = Field(2, ge=1, description="Calibration windows per forward pass.")
    seed: int = Field(0, description="Seed for window sampling, k-means and random grouping.")
    cache: bool = Field(True, description="Reuse/store calibration statistics in the cache ($MOEMERGE_CACHE).")

    # ---- grouping ---------------------------------------------------------------------------------------------
    num_average_groups: int | None = Field(
        None, ge=1, description="Experts (groups) left per MoE layer on average; default: keep all.")
    start_layer: int = Field(0, ge=0, description="MoE layers before this index are left untouched.")
    dominant: str = Field("no", description="Dominant-expert choice: no (clustering), frequency, random.")
    similarity_base: str = Field("expert-output", description="Feature compared when grouping experts.")
    cluster: str = Field("hierarchical", description="Clustering method when dominant=no.")
    linkage: str = Field("average", description="Hierarchical linkage: single, complete, average, ward.")
    random_start_center: bool = Field(False, description="k-means: draw the initial centres at random.")

    # ---- merging ----------------------------------------------------------------------------------------------
    group_limit: int | None = Field(None, ge=1, description="Largest number of experts in one group.")
    dynamic_group: bool = Field(False, description="Non-uniform hierarchical clustering with the per-layer counts "
                                                   "of dominant=frequency.")
    hierarchical_stopping_metric: str | None = Field(
        None, description="Non-uniform hierarchical clustering over all layers, stopped at one global distance "
                          "threshold that meets the expert budget (e.g. 'distance').")
    overlap_metric: Literal["cosine", "kl-divergence", "wasserstein"] = Field(
        "cosine", description="Single-shot grouping on expert outputs: overlap measure.")
    multi_layer: int = Field(1, ge=1, description="Sub-MoE adaptive allocation: layers per joint group "
                                                  "(1 = uniform per layer).")
    prune: str = Field("no", description="Pruning criterion: keep the best num_average_groups experts, drop the rest.")

    # ---- merging ----------------------------------------------------------------------------------------------
    merge: str = Field("freq", description="Merging method (no = keep the original experts).")
    mode: str = Field("normal", description="Mode of the merge method (zipit/fix-dom-same: normal, "
                                            "activation-with-router-logits, input-weight, all; weighted: 'x,y').")
    ingredient: Literal["act", "weight", "act+weight"] = Field(
        "act", description="Feature matched by zipit / fix-dom-same.")
    data_limit: int | None = Field(None, ge=1, description="Largest number of tokens kept for zipit / fix-dom-same.")
    fit_scope: Literal["down", "expert"] = Field(
        "expert", description="merge=fit: what is fitted to the group's routed output: down (the down projection) "
                              "or expert (gate and up too, then down).")
    fit_held_out: float = Field(0.25, ge=0, lt=1, description="merge=fit and router_fit: share of calibration "
                                                              "windows held out to choose damping, the fit and when "
                                                              "to stop (0: fixed damping).")
    partition: int = Field(1, ge=1, description="Process a layer's experts in this many parts (memory).")
    rank_ratio: float | None = Field(None, gt=0, le=1, description="Sub-MoE†: keep this share of the merged "
                                                                   "experts' rank (low-rank factors).")
    whiten: bool = Field(False, description="Sub-MoE†: whiten by each expert's input covariance before truncating.")
    sequential: bool = Field(False, description="Calibrate and merge layer by layer on the already-merged model.")

    # ---- router and checkpoint --------------------------------------------------------------------------------
    router: str = Field("keep", validation_alias=AliasChoices("router", "format"),
                        description="Checkpoint format / router handling (alias --format): keep = all router rows, "
                                    "slots share merged experts (exact); collapse = one expert and row per group.")
    router_adapt: str = Field("fit", description="How a collapsed router row is made from its group's rows (fit: "
                                                 "least squares to the members' log-sum-exp; measured best).")
    router_fit: bool = Field(False, description="Refit the router (collapse/compact or mapped), then the merged "
                                                "experts' down projections under it, on calibration tokens.")
    router_fit_rounds: int = Field(3, ge=0, le=20, description="router_fit: expert/router rounds after the first "
                                                               "router fit, stopped early by held-out windows "
                                                               "(0: router only).")
    block_fit_steps: int = Field(0, ge=0, le=100000, description="router_fit: then up to this many Adam steps on "
                                                                 "the whole written block (router, merged experts' "
                                                                 "gate/up and down), stopped by held-out windows "
                                                                 "(0: off; costly at real sizes without a GPU).")
    error_feedback: bool = Field(False, description="router_fit: fit each written block on the merged model's own "
                                                    "inputs (earlier layers already merged), to what the original "
                                                    "model's hidden state needs there, so that each layer corrects "
                                                    "the error the layers before it left.")
    overwrite: bool = Field(False, description="Replace output_path if it exists.")
    max_shard_size: str = Field("5GB", description="Largest output shard (e.g. 5GB, 500MB), as save_pretrained's.")

    # ---- evaluation -------------------------------------------------------------------------------------------
    ppl: list[str] | None = Field(
        None, description="Perplexity texts (files, bundled:test, wikitext2, ptb, c4); default bundled:test "
                          "offline, wikitext2 online; 'none' skips.")
    ppl_windows: int | None = Field(None, ge=1,
                                    description="Evaluate only N windows of each text, evenly spaced over it.")
    eval_seq_len: int | None = Field(None, ge=2, description="Window length for perplexity (default: seq_len).")
    eval_batch_size: int = Field(8, ge=1, description="Batch size for evaluation.")
    task: str | None = Field(None, description="Comma-separated lm-eval tasks to run on the merged model.")
    num_fewshot: int = Field(0, ge=0, description="Few-shot examples for lm-eval tasks.")
    fidelity: bool = Field(True, description="Measure KL(original || merged) and top-1 agreement on the ppl text.")
    report: bool = Field(True, description="Write report.md with plots next to the checkpoint.")

    # ---- validation -------------------------------------------------------------------------------------------
    @field_validator("dominant", "similarity_base", "cluster", "linkage", "merge", "router", "router_adapt", "prune")
    @classmethod
    def _known(cls, value: str, info) -> str:
        valid = _choices(info.field_name)
        if value not in valid:
            raise ValueError(f"unknown {info.field_name} {value!r}; valid choices: {', '.join(valid)}")
        return value

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        parse_size(value)
        return value

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        if "linkage" in self.explicit() and self.cluster != "hierarchical":
            raise ValueError(f"linkage only applies to cluster=hierarchical (cluster is {self.cluster!r})")
        if self.router_fit and self.router not in ("collapse", "compact", "mapped"):
            raise ValueError(f"router_fit refits the router and merged experts of router=collapse (compact) or "
                             f"mapped checkpoints (got {self.router!r})")
        if self.random_start_center and self.cluster != "kmeans":
            raise ValueError("random_start_center only applies to cluster=kmeans")
        from .methods import check_recipe  # the rules live with the methods; methods imports every registry

        check_recipe(self)
        return self

    def explicit(self) -> set[str]:
        """Options given with a value other than their default (giving the default explicitly changes nothing, so
        a fully resolved recipe, as ``merge_info.json`` stores it, validates like the options it came from)."""
        return {name for name in self.model_fields_set
                if getattr(self, name) != type(self).model_fields[name].default}

    # ---- I/O --------------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, base: dict | None = None, **overrides: Any) -> Recipe:
        """Validate a dict of options (keys with dashes or underscores) into a recipe, with one-line errors."""
        data = {k.replace("-", "_"): v for k, v in {**(base or {}), **overrides}.items() if v is not None}
        try:
            return cls(**data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "recipe"
            msg = err["msg"].removeprefix("Value error, ")
            raise MoemergeError(f"{where}: {msg}" if err["type"] != "extra_forbidden"
                                else f"unknown option {where!r}") from None

    @classmethod
    def load(cls, spec: str | Path, **overrides: Any) -> Recipe:
        """A recipe from a YAML file, a checkpoint's ``merge_info.json`` (its resolved recipe) or a named preset
        (``hc-smoe``, ...), with overrides on top."""
        from .methods import PRESETS

        path = Path(spec)
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise MoemergeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
            if not isinstance(data, dict):
                raise MoemergeError(f"{path}: a recipe must be a mapping of option: value")
            if isinstance(data.get("moemerge_recipe"), dict):  # a checkpoint's merge_info.json
                data = data["moemerge_recipe"]
        elif str(spec) in PRESETS:
            data = dict(PRESETS.get(str(spec)))
        else:
            raise MoemergeError(f"recipe {str(spec)!r} is neither a file nor a preset ({', '.join(PRESETS)})")
        return cls.build(data, **overrides)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_defaults=True), sort_keys=False)
