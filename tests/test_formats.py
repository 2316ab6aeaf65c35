"""Checkpoint formats: mapped / lowrank (shipped modeling code), compact / padded (stock), router adaptation."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from moemerge.errors import MoemergeError
from moemerge.families import moe_layers
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


def make_plan(groups: dict[int, list[list[int]]], num_experts: int = 8) -> MergePlan:
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
    check_plan(plan, fmt, m.config.num_experts_per_tok)
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
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("groups", [UNIFORM, NON_UNIFORM], ids=["uniform", "non-uniform"])
def test_mapped_equals_keep_with_fewer_parameters(family, groups, ids):
    model = make_model(family)
    plan = make_plan(groups)
    keep, mapped = merged_copy(model, plan, "keep"), merged_copy(model, plan, "mapped")
    assert torch.allclose(logits(keep, ids), logits(mapped, ids), atol=1e-5)
    assert count_parameters(mapped) < count_parameters(keep)
    for layer in moe_layers(mapped):
        assert layer.experts.gate_up_proj.shape[0] == plan.layers[layer.index].num_groups
        assert layer.router.weight.shape[0] == 8  # routing over the original rows


@pytest.mark.parametrize("family", FAMILIES)
def test_mapped_saves_reloads_with_remote_code(family, ids, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model(family, vocab_size=len(tokenizer))
    original = json.loads(model.config.to_json_string())
    plan = make_plan(NON_UNIFORM)
    mapped = merged_copy(model, plan, "mapped")
    out = tmp_path / "mapped"
    report = save_checkpoint(mapped, tokenizer, out, original, {})
    assert not report.missing_keys and not report.unexpected_keys and report.max_logit_diff < 1e-5
    cfg = json.loads((out / "config.json").read_text())
    assert (out / "modeling_moemerge.py").exists() and cfg["model_type"].endswith("_mapped")
    changed = {k for k in set(cfg) | set(original) if cfg.get(k) != original.get(k)}
    assert changed <= {"model_type", "architectures", "auto_map", "expert_map", "transformers_version"}
    assert cfg["expert_map"]["1"] == [0, 0, 0, 0, 1, 1, 2, 2]
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    ids_layer1 = {k.split(".experts.")[1].split(".")[0] for k in keys if "layers.1." in k and ".experts." in k}
    assert ids_layer1 == {"0", "1", "2"}  # per-expert hub names, contiguous ids
    if family == "qwen2_moe":  # shared experts untouched
        for name, p in model.named_parameters():
            if "shared_expert" in name:
                assert torch.equal(p, reloaded.get_parameter(name)), name
    assert torch.allclose(logits(reloaded, ids % len(tokenizer)), logits(mapped, ids % len(tokenizer)), atol=1e-5)


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
