"""Checkpoint formats: mapped / lowrank (shipped modeling code), compact / padded (stock), router adaptation."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from moemerge.errors import MoemergeError
from moemerge.families import FAMILIES as REGISTRY
from moemerge.families import family_of, moe_layers
from moemerge.group.plan import LayerPlan, MergePlan
from moemerge.merge import MergedLayer
from moemerge.pipeline import save_checkpoint
from moemerge.save import apply_plan, check_plan, count_parameters
from moemerge.save.formats import adapt_rows
from moemerge.save.mapped import check_expert_ids, exact_factors
from moemerge.save.remote.modeling_moemerge import combine_weights
from moemerge.save.router_fit import exact_group_probs, fit_centered_rows, fit_rows, routing_kl, split_slots

from conftest import make_model

FAMILIES = ["mixtral", "qwen2_moe"]
UNIFORM = {0: [[0, 3], [1], [2, 5, 6], [4, 7]], 1: [[0, 1], [2, 3], [4, 5], [6, 7]]}
NON_UNIFORM = {0: [[0, 3], [1], [2, 5, 6], [4], [7]], 1: [[0, 1, 2, 3], [4, 5], [6, 7]]}


def make_plan(groups: dict[int, list[list[int]]], num_experts: int = 8, model=None) -> MergePlan:
    """A plan from groups per layer; with ``model``, the k-th entry goes to the model's k-th MoE layer (DeepSeek-style
    families start with a dense layer)."""
    if model is not None:
        indices = [layer.index for layer in moe_layers(model)]
        groups = {indices[k]: g for k, g in enumerate(groups.values())}
    return MergePlan({li: LayerPlan(li, num_experts, g, [m[0] for m in g]) for li, g in groups.items()})


def average_merge(model, plan: MergePlan) -> dict[int, MergedLayer]:
    """Plain average of each group's experts (the merge method does not matter for the formats)."""
    out = {}
    for layer in moe_layers(model):
        gu, dn = layer.expert_weights()
        groups = plan.layers[layer.index].groups
        out[layer.index] = MergedLayer(torch.stack([gu[g].mean(0) for g in groups]),
                                       torch.stack([dn[g].mean(0) for g in groups]))
    return out


def merged_copy(model, plan, fmt, merged=None, adapt="mean", stats=None):
    m = copy.deepcopy(model)
    merged = merged or average_merge(model, plan)
    freqs = {li: torch.linspace(1.0, 0.2, 8) for li in plan.layers}
    check_plan(plan, fmt, family_of(m.config).top_k(m.config))
    with torch.no_grad():
        apply_plan(m, plan, merged, freqs, fmt, adapt, stats=stats)
    return m


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ids():
    return torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(0))


# ---- pure functions ----------------------------------------------------------------------------------------------
def test_combine_weights_adds_slots_of_one_merged_expert():
    index = torch.tensor([[0, 3], [1, 2], [3, 0]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    expert_map = torch.tensor([0, 1, 1, 0])
    dense, hit = combine_weights(index, weights, expert_map, 2)
    assert torch.allclose(dense, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    assert hit.tolist() == [[True, False], [False, True], [True, False]]


def test_split_slots_keeps_singletons_exact_and_covers_rows():
    slots, owner = split_slots([[0, 1, 2], [3], [4, 5]], torch.tensor([.1, .5, .2, .3, .9, .1]), 5)
    assert len(slots) == 5 and sorted(e for s in slots for e in s) == list(range(6))
    assert all(owner[i] == next(g for g, m in enumerate([[0, 1, 2], [3], [4, 5]]) if s[0] in m)
               for i, s in enumerate(slots))
    with pytest.raises(MoemergeError, match="dead slot"):
        split_slots([[0], [1]], torch.ones(2), 3)


def test_check_expert_ids_rejects_gaps():
    check_expert_ids(["m.layers.0.mlp.experts.0.w1.weight", "m.layers.0.mlp.experts.1.w1.weight"])
    with pytest.raises(MoemergeError, match="contiguous"):
        check_expert_ids(["m.layers.0.mlp.experts.0.w1.weight", "m.layers.0.mlp.experts.2.w1.weight"])


def test_adapt_rows_copies_singletons_and_fit_reproduces_log_mass():
    torch.manual_seed(0)
    weight, x = torch.randn(6, 16), torch.randn(500, 16)
    assert torch.equal(adapt_rows("fit", weight, [[2], [0], [5]], torch.ones(6), x), weight[[2, 0, 5]].double())
    slots = [[0, 1], [2, 3, 4], [5]]
    kls = {name: routing_kl(weight, slots, adapt_rows(name, weight, slots, torch.ones(6), x), x)
           for name in ("mean", "fit", "kl")}
    assert kls["fit"] < kls["mean"] and kls["kl"] <= kls["fit"]
    pairs = [[0, 1], [2, 3], [4, 5]]  # no singleton (fit copies those): centring the targets changes nothing
    assert abs(routing_kl(weight, pairs, fit_centered_rows(weight, pairs, torch.ones(6), x), x)
               - routing_kl(weight, pairs, fit_rows(weight, pairs, torch.ones(6), x), x)) < 1e-9
    assert torch.allclose(exact_group_probs(weight, slots, x).sum(1), torch.ones(500, dtype=torch.float64))


def test_exact_factors_multiply_back():
    m = torch.randn(12, 7, dtype=torch.float64)
    a, b = exact_factors(m)
    assert torch.allclose(a @ b, m)


# ---- mapped ------------------------------------------------------------------------------------------------------
# Every registered family, plus DeepSeek-V3 with group-limited routing (4 routing groups of 2, best 2 groups chosen):
# mapped keeps all router rows, so the groups are untouched whatever the merge groups straddle.
MAPPED_CASES = {**{name: {} for name in REGISTRY.names()}, "deepseek_v3-grouped": {"n_group": 4, "topk_group": 2}}
REMOTE_CASES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3-grouped", "hunyuan_v1_moe", "granitemoeshared"]


def case_model(case: str, **kw):
    return make_model(case.split("-")[0], **MAPPED_CASES[case], **kw)


@pytest.mark.parametrize("case", list(MAPPED_CASES))
@pytest.mark.parametrize("groups", [UNIFORM, NON_UNIFORM], ids=["uniform", "non-uniform"])
def test_mapped_equals_keep_with_fewer_parameters(case, groups, ids):
    model = case_model(case)
    plan = make_plan(groups, model=model)
    keep, mapped = merged_copy(model, plan, "keep"), merged_copy(model, plan, "mapped")
    assert torch.allclose(logits(keep, ids), logits(mapped, ids), atol=1e-5)
    assert count_parameters(mapped) < count_parameters(keep)
    for layer in moe_layers(mapped):
        assert layer.experts.gate_up_proj.shape[0] == plan.layers[layer.index].num_groups
        assert layer.router_weight.shape[0] == 8  # routing over the original rows
        assert layer.choice_bias is None or layer.choice_bias.numel() == 8


def save_mapped(case: str, tokenizer, out):
    """A non-uniform mapped merge of ``case``'s tiny model saved to ``out``: ``(model, merged model, plan)``."""
    model = case_model(case, vocab_size=len(tokenizer))
    plan = make_plan(NON_UNIFORM, model=model)
    mapped = merged_copy(model, plan, "mapped")
    report = save_checkpoint(mapped, tokenizer, out, json.loads(model.config.to_json_string()), {})
    assert not report.missing_keys and not report.unexpected_keys and report.max_logit_diff < 1e-5
    return model, mapped, plan


@pytest.mark.parametrize("case", REMOTE_CASES)
def test_mapped_saves_and_reloads(case, ids, tokenizer, tmp_path):
    """Through moemerge's registered classes: zero missing or unexpected keys, per-expert hub names with ids
    0..E'-1, the original config plus the mapped keys only, shared experts and (group-limited) routing untouched."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "mapped"
    model, mapped, plan = save_mapped(case, tokenizer, out)
    spec = family_of(model.config)
    original = json.loads(model.config.to_json_string())
    second = sorted(plan.layers)[1]
    cfg = json.loads((out / "config.json").read_text())
    assert (out / "modeling_moemerge.py").exists() and cfg["model_type"] == original["model_type"] + "_mapped"
    changed = {k for k in set(cfg) | set(original) if cfg.get(k) != original.get(k)}
    assert changed <= {"model_type", "architectures", "auto_map", "expert_map", "transformers_version"}
    assert cfg["expert_map"][str(second)] == [0, 0, 0, 0, 1, 1, 2, 2]
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(reloaded).__name__ == cfg["architectures"][0] == cfg["auto_map"]["AutoModelForCausalLM"].split(".")[1]
    assert not info["missing_keys"] and not info["unexpected_keys"]
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    per_expert = {k.split(".experts.")[1].split(".")[0] for k in keys
                  if f"layers.{second}." in k and re.search(r"\.experts\.\d+\.", k)}
    # Granite's hub names are fused (input_linear / output_linear [E', ...]): no per-expert keys to number
    assert per_expert == ({"0", "1", "2"} if spec.name not in ("granitemoe", "granitemoeshared") else set())
    for layer in spec.moe_layers(model):  # shared experts untouched
        for attr in spec.shared_attrs:
            for name, p in getattr(layer.block, attr).named_parameters():
                full = f"model.layers.{layer.index}.{spec.block_attr}.{attr}.{name}"
                assert torch.equal(p, reloaded.get_parameter(full)), full
    if case == "deepseek_v3-grouped":  # group-limited routing untouched: all rows and biases, same n_group
        assert (reloaded.config.n_group, reloaded.config.topk_group) == (4, 2)
        assert all(v.router_weight.shape[0] == 8 and v.choice_bias.numel() == 8 for v in spec.moe_layers(reloaded))
    v = ids % len(tokenizer)
    assert torch.allclose(logits(reloaded, v), logits(mapped, v), atol=1e-5)


TRUST_REMOTE_CODE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
out = {}
for folder in sys.argv[1:]:
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    with torch.no_grad():
        got = model(input_ids=torch.load(folder + "/ids.pt")).logits
    out[folder] = {"module": type(model).__module__, "name": type(model).__name__,
                   "bad_keys": sorted(info["missing_keys"]) + sorted(info["unexpected_keys"]),
                   "diff": float((got - torch.load(folder + "/want.pt")).abs().max())}
out["moemerge imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "moemerge")
print(json.dumps(out))
"""


def test_shipped_file_loads_with_trust_remote_code(ids, tokenizer, tmp_path):
    """Outside moemerge: a fresh process that never imports moemerge loads mapped checkpoints of new families with
    ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``, i.e. by running the shipped file (in
    moemerge's own process the registered classes would win), and gets the merged model's logits."""
    import os
    import subprocess
    import sys

    folders = {}
    for case in ("qwen3_moe", "deepseek_v3-grouped", "granitemoeshared", "ernie4_5_moe"):
        out = tmp_path / case
        _, mapped, _ = save_mapped(case, tokenizer, out)
        v = ids % len(tokenizer)
        torch.save(v, out / "ids.pt")
        torch.save(logits(mapped, v), out / "want.pt")
        folders[str(out)] = json.loads((out / "config.json").read_text())["architectures"][0]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ""}  # the installed moemerge may be importable; the check below says it was not imported
    proc = subprocess.run([sys.executable, "-c", TRUST_REMOTE_CODE, *folders], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("moemerge imported") == []
    for folder, arch in folders.items():
        got = result[folder]
        assert got["module"].startswith("transformers_modules") and got["name"] == arch, got
        assert got["bad_keys"] == [] and got["diff"] < 1e-5, got


def test_shipped_file_imports_torch_and_transformers_only():
    import ast

    from moemerge.save.mapped import REMOTE_DIR, REMOTE_FILE

    tree = ast.parse((REMOTE_DIR / REMOTE_FILE).read_text())
    roots = {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    roots |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert roots <= {"__future__", "inspect", "torch", "transformers"}, roots


def _stock_experts(num_experts: int = 8, hidden: int = 16, inter: int = 12):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    torch.manual_seed(0)
    experts = MixtralExperts(MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts))
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return experts


def _with_bias(experts):
    experts.has_bias = True
    e, i2, h = experts.gate_up_proj.shape
    experts.gate_up_proj_bias = torch.nn.Parameter(torch.randn(e, i2) * 0.2)
    experts.down_proj_bias = torch.nn.Parameter(torch.randn(e, h) * 0.2)
    return experts


def test_mapped_experts_carry_the_stock_biases():
    """A family whose experts have biases (none of the registered ones; gpt-oss's would): the mapped experts carry
    ``gate_up_proj_bias`` / ``down_proj_bias`` per merged expert and give what the stock biased experts give with
    every slot holding its merged expert (``keep``); low-rank factors with exact products too."""
    from transformers.integrations.moe import batched_mm_experts_forward

    from moemerge.save.remote.modeling_moemerge import mapped_experts

    expert_map = [0, 2, 1, 0, 2, 2, 1, 0]
    stock = _with_bias(_stock_experts())
    mapped = mapped_experts(expert_map, stock)
    assert mapped.has_bias and mapped.gate_up_proj_bias.shape == (3, 24) and mapped.down_proj_bias.shape == (3, 16)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            getattr(mapped, name).normal_(0, 0.2)
            getattr(stock, name).copy_(getattr(mapped, name)[expert_map])  # keep: every slot its merged expert
    h = torch.randn(40, 16)
    weights, index = torch.softmax(torch.randn(40, 8), -1).topk(3, dim=-1)
    with torch.no_grad():
        want = batched_mm_experts_forward(stock, h, index, weights)
        assert torch.allclose(mapped(h, index, weights), want, atol=1e-5)
        inter = mapped.down_proj.shape[2]
        dense = {"gate": mapped.gate_up_proj[:, :inter], "up": mapped.gate_up_proj[:, inter:],
                 "down": mapped.down_proj}
        ranks = {name: min(m.shape[1:]) for name, m in dense.items()}
        low = mapped_experts(expert_map, stock, ranks)
        low.gate_up_proj_bias.copy_(mapped.gate_up_proj_bias)
        low.down_proj_bias.copy_(mapped.down_proj_bias)
        for name, m in dense.items():
            pairs = [exact_factors(m[g]) for g in range(3)]
            getattr(low, f"{name}_a").copy_(torch.stack([a for a, _ in pairs]))
            getattr(low, f"{name}_b").copy_(torch.stack([b for _, b in pairs]))
        assert torch.allclose(low(h, index, weights), want, atol=1e-5)


def _custom_gate(experts):
    class ClampedExperts(type(experts)):
        def _apply_gate(self, gate_up_out):
            gate, up = gate_up_out.chunk(2, dim=-1)
            return self.act_fn(gate.clamp(max=7.0)) * up

    experts.__class__ = ClampedExperts
    return experts


def _other_call(experts):
    class RoutingExperts(type(experts)):
        def forward(self, hidden_states, router_logits):  # computes its own routing: no top-k to map
            return hidden_states

    experts.__class__ = RoutingExperts
    return experts


@pytest.mark.parametrize("change,reason", [
    (lambda e: setattr(e, "is_transposed", True) or e, "transposed"),
    (lambda e: setattr(e, "is_concatenated", False) or e, "interleave"),
    (lambda e: setattr(e, "has_post_expert_norm", True) or e, "norm after each expert"),
    (_custom_gate, "own gate function"),
    (_other_call, "called as experts"),
    (_with_bias, "biases"),
], ids=["transposed", "interleaved", "post-norm", "custom-gate", "signature", "bias"])
def test_unmappable_experts_are_refused_in_one_line(change, reason):
    from moemerge.save.mapped import check_family

    check_family("mixtral", "mapped", _stock_experts())  # the stock module maps
    with pytest.raises(MoemergeError, match=reason) as err:
        check_family("mixtral", "mapped", change(_stock_experts()))
    assert "\n" not in str(err.value) and "--format keep, compact or padded" in str(err.value)


# ---- lowrank -----------------------------------------------------------------------------------------------------
def svd_factors(matrix: torch.Tensor, rank: int):
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return (u[:, :rank] * s[:rank]), vh[:rank]


@pytest.mark.parametrize("family", FAMILIES)
def test_lowrank_matches_dense_product_and_reloads(family, ids, tokenizer, tmp_path):
    model = make_model(family, vocab_size=len(tokenizer))
    plan = make_plan(UNIFORM)
    merged = average_merge(model, plan)
    low = {}
    for li, ml in merged.items():
        inter = ml.down.shape[2]
        factors = [{"gate": svd_factors(ml.gate_up[g, :inter], 6), "up": svd_factors(ml.gate_up[g, inter:], 6 + g),
                    "down": svd_factors(ml.down[g], 5)} if g != 1 else None for g in range(ml.gate_up.shape[0])]
        dense_gu = torch.stack([torch.cat([f["gate"][0] @ f["gate"][1], f["up"][0] @ f["up"][1]]) if f else
                                ml.gate_up[g] for g, f in enumerate(factors)])
        dense_dn = torch.stack([f["down"][0] @ f["down"][1] if f else ml.down[g] for g, f in enumerate(factors)])
        low[li] = (MergedLayer(dense_gu, dense_dn, factors))
    lowrank = merged_copy(model, plan, "lowrank", merged=low)
    reference = merged_copy(model, plan, "mapped", merged={li: MergedLayer(m.gate_up, m.down) for li, m in low.items()})
    v = ids % len(tokenizer)
    assert torch.allclose(logits(lowrank, v), logits(reference, v), atol=1e-4)
    report = save_checkpoint(lowrank, tokenizer, tmp_path / "low", model.config.to_dict(), {})
    assert not report.missing_keys and not report.unexpected_keys
    cfg = json.loads((tmp_path / "low" / "config.json").read_text())
    assert cfg["expert_ranks"]["0"]["up"] >= 9 and "expert_map" in cfg


def test_lowrank_without_factors_is_refused():
    model = make_model("mixtral")
    with pytest.raises(MoemergeError, match="low-rank factors"):
        merged_copy(model, make_plan(UNIFORM), "lowrank")


# ---- compact / padded (stock) ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_compact_and_collapse_reload_in_stock_transformers(family, ids, tokenizer, tmp_path):
    model = make_model(family, vocab_size=len(tokenizer))
    v = ids % len(tokenizer)
    compact = merged_copy(model, make_plan(UNIFORM), "compact")
    collapse = merged_copy(model, make_plan(UNIFORM), "collapse")
    assert torch.equal(logits(compact, v), logits(collapse, v))
    report = save_checkpoint(compact, tokenizer, tmp_path / "c", model.config.to_dict(), {})
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["model_type"] == family and not report.missing_keys
    assert cfg["num_local_experts" if family == "mixtral" else "num_experts"] == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_reproduces_keep_and_loads_stock(family, ids, tokenizer, tmp_path):
    model = make_model(family, vocab_size=len(tokenizer))
    v = ids % len(tokenizer)
    # Largest layer untouched (8 experts): the merged layer gets 8 slots, one original row each -> exact.
    plan = make_plan({0: [[e] for e in range(8)], 1: [[0, 1, 2, 3], [4, 5], [6, 7]]})
    keep, padded = merged_copy(model, plan, "keep"), merged_copy(model, plan, "padded")
    assert torch.allclose(logits(keep, v), logits(padded, v), atol=1e-5)
    # Non-uniform merged layers (5 and 3 groups): padded to 5 slots, loads in stock transformers.
    plan = make_plan(NON_UNIFORM)
    padded = merged_copy(model, plan, "padded")
    assert [layer.num_experts for layer in moe_layers(padded)] == [5, 5]
    report = save_checkpoint(padded, tokenizer, tmp_path / "p", model.config.to_dict(), {})
    assert not report.missing_keys and not report.unexpected_keys
    with pytest.raises(MoemergeError, match="padded"):
        check_plan(plan, "compact", 2)


# ---- end to end --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,adapt", [("mapped", "mean"), ("compact", "fit")])
def test_pipeline_writes_format(fmt, adapt, model_dirs, text_file, tmp_path):
    from moemerge.pipeline import run
    from moemerge.recipe import Recipe

    out = tmp_path / fmt
    result = run(Recipe.build(model_path=str(model_dirs["mixtral"]), output_path=str(out), calibration=str(text_file),
                              n_sentences=4, seq_len=32, num_average_groups=4, router=fmt, router_adapt=adapt,
                              ppl=["none"], fidelity=False, report=False), progress=False)
    assert result.saved is not None and result.parameters_after < result.parameters_before
    assert ("auto_map" in json.loads((out / "config.json").read_text())) == (fmt == "mapped")
