"""Exact routing for every routing kind, and group-limited routing saved with fewer experts.

* the family's routing function (:meth:`FamilySpec.route`) equals a direct call of the family's own router, for
  every registered family and for group-limited configurations;
* routing interventions, router refit and ``router_adapt`` fit / kl on sigmoid, group-limited routers (DeepSeek-V3);
* a DeepSeek-V3-style model with 16 experts in ``n_group = 4`` routing groups (``topk_group = 2``) goes 16 → 8 experts
  compact and pruned, reloads in stock transformers with the merged model's logits, and its saved router still routes
  every token inside its chosen groups; infeasible budgets are refused in one line before any weight is read.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import moemerge
from moemerge.errors import MoemergeError
from moemerge.evaluate.interventions import intervene
from moemerge.families import FAMILIES, REFUSED, family_of, moe_layers, tiny_model
from moemerge.save.formats import adapt_rows
from moemerge.save.router_fit import routing_kl

GROUPED = {"n_routed_experts": 16, "n_group": 4, "topk_group": 2}  # DeepSeek-V3 / Kimi-K2 / GLM-4.5 style
CASES = [(name, {}) for name in FAMILIES.names()] + [
    ("deepseek_v3", GROUPED), ("deepseek_v3", {**GROUPED, "norm_topk_prob": False, "num_experts_per_tok": 4}),
    ("deepseek_v2", {**GROUPED, "topk_method": "group_limited_greedy"}), ("glm4_moe", GROUPED), ("dots1", GROUPED),
]


def _own_routing(layer, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """The router logits and the ``(indices, weights)`` the block itself handed to its experts."""
    got: dict[str, torch.Tensor] = {}
    h1 = layer.router.register_forward_hook(lambda m, a, o: got.__setitem__("logits", o[0]))
    h2 = layer.experts.register_forward_pre_hook(lambda m, a: got.update(index=a[1], weights=a[2]))
    try:
        with torch.no_grad():
            layer.block(hidden)
    finally:
        h1.remove()
        h2.remove()
    return got


@pytest.mark.parametrize("family,overrides", CASES, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in CASES])
def test_routing_equals_the_family_router(family, overrides):
    model = tiny_model(family, 300, **overrides)
    spec = family_of(model.config)
    for layer in moe_layers(model):
        hidden = torch.randn(1, 64, model.config.hidden_size, generator=torch.Generator().manual_seed(layer.index))
        own = _own_routing(layer, hidden)
        weights, index = spec.route(own["logits"], model.config, layer.choice_bias)
        assert torch.equal(index, own["index"])  # same experts, in the same order
        torch.testing.assert_close(weights, own["weights"].float(), atol=1e-6, rtol=0)
        # and from the router's rows directly (what refit / fit / interventions feed it)
        logits = hidden.reshape(-1, hidden.shape[-1]).float() @ layer.router_weight.float().T
        w2, i2 = layer.route(logits, model.config)
        assert torch.equal(i2, own["index"])
        torch.testing.assert_close(w2, own["weights"].float(), atol=1e-6, rtol=0)


def _chosen(model, ids) -> dict[int, torch.Tensor]:
    seen, handles = {}, []
    for layer in moe_layers(model):
        handles.append(layer.experts.register_forward_pre_hook(
            lambda m, a, li=layer.index: seen.__setitem__(li, a[1].clone())))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for h in handles:
        h.remove()
    return seen, logits


def test_interventions_on_a_sigmoid_group_limited_router():
    model = tiny_model("deepseek_v3", 300, **GROUPED)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    base, base_logits = _chosen(model, ids)
    favourite = int(base[1].flatten().mode().values)
    with intervene(model, mask={1: [favourite]}):
        routed, logits = _chosen(model, ids)
    assert favourite not in routed[1].unique().tolist()
    assert not torch.allclose(logits, base_logits)
    with intervene(model, force={2: [3, 9]}):  # two experts in two different routing groups
        routed, _ = _chosen(model, ids)
    assert set(routed[2].unique().tolist()) <= {3, 9}
    assert torch.equal(routed[1], base[1])
    _, after = _chosen(model, ids)
    assert torch.equal(after, base_logits)


def test_fitted_router_rows_for_sigmoid_scores():
    torch.manual_seed(0)
    weight = torch.randn(8, 16) * 0.5
    x = torch.randn(500, 16)
    slots = [[0, 1], [2, 3, 4], [5], [6, 7]]
    kls = {name: routing_kl(weight, slots, adapt_rows(name, weight, slots, torch.ones(8), x, "sigmoid"), x,
                            "sigmoid") for name in ("mean", "fit", "kl")}
    assert kls["kl"] <= kls["fit"] + 1e-9 and kls["kl"] < 0.8 * kls["mean"]


# ---- group-limited routing saved with fewer experts ----------------------------------------------------------------
@pytest.fixture(scope="module")
def grouped_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("deepseek-v3-grouped")
    tiny_model("deepseek_v3", len(tokenizer), **GROUPED).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def _recipe(d, text_file, out, **kw):
    return moemerge.Recipe.build(dict(model_path=str(d), output_path=str(out), calibration=str(text_file),
                                      seq_len=32, n_sentences=6, ppl=["none"], dtype="float32", fidelity=False,
                                      report=False), **kw)


def _groups_respected(model, ids) -> None:
    """Every token's experts lie in the ``topk_group`` routing groups with the best group scores."""
    cfg = model.config
    for layer in moe_layers(model):
        hidden = model.model.embed_tokens(ids).reshape(-1, cfg.hidden_size)  # any hidden states will do
        own = _own_routing(layer, hidden[None])
        scores = own["logits"].sigmoid() + layer.choice_bias
        size = scores.shape[1] // cfg.n_group
        best = scores.view(-1, cfg.n_group, size).topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group, -1).indices
        for t in range(scores.shape[0]):
            assert set((own["index"][t] // size).tolist()) <= set(best[t].tolist())


@pytest.mark.parametrize("how", ["compact", "prune"])
def test_grouped_model_halves_compact_and_pruned(grouped_dir, text_file, tmp_path, tokenizer, how):
    out = tmp_path / how
    kw = dict(num_average_groups=8, router="compact")
    recipe = _recipe(grouped_dir, text_file, out, **kw) if how == "compact" else \
        moemerge.Recipe.load("reap", **_recipe(grouped_dir, text_file, out, **kw).model_dump(exclude_defaults=True))
    loaded = moemerge.load_model(str(grouped_dir), dtype="float32", device="cpu")
    result = moemerge.merge_model(loaded, recipe, progress=False)
    for plan in result.plan.layers.values():  # two groups (or kept experts) in each routing group of 4
        assert [g[0] // 4 for g in plan.groups] == [0, 0, 1, 1, 2, 2, 3, 3]
        assert all(len({e // 4 for e in g}) == 1 for g in plan.groups)
        assert bool(plan.dropped) == (how == "prune")
    moemerge.save_checkpoint(loaded.model, tokenizer, out, json.loads((grouped_dir / "config.json").read_text()))
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"]) == (8, 4, 2)
    ids = tokenizer("def fibonacci(n): And God said, Let there be light", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - loaded.model(input_ids=ids).logits).abs().max()
    assert diff <= 1e-5
    for layer in moe_layers(reloaded):
        assert layer.router.weight.shape[0] == 8 and layer.choice_bias.shape == (8,)
    _groups_respected(reloaded, ids)


def test_grouped_model_streamed_run_and_router_adapt(grouped_dir, text_file, tmp_path):
    result = moemerge.run(_recipe(grouped_dir, text_file, tmp_path / "o", num_average_groups=12, router="compact",
                                  router_adapt="kl", router_fit=True), progress=False)
    assert result.saved.max_logit_diff <= 1e-5 and result.plan.counts() == {1: 12, 2: 12}
    assert set(result.router_fit) == {1, 2}


def test_infeasible_grouped_budget_is_refused_before_reading_layer_weights(grouped_dir, text_file, tmp_path,
                                                                          monkeypatch):
    from moemerge.execute.weights import Shard

    read: list[str] = []  # the trunk (embeddings, norm, head) is read when the checkpoint opens; no layer may be
    original = Shard.read
    monkeypatch.setattr(Shard, "read", lambda self, key: read.append(key) or original(self, key))
    for target, near in ((6, "nearest valid: 8 "), (10, "nearest valid: 8, 12 ")):
        with pytest.raises(MoemergeError, match="n_group=4") as err:
            moemerge.run(_recipe(grouped_dir, text_file, tmp_path / "o", num_average_groups=target,
                                 router="compact"), progress=False)
        message = str(err.value)
        assert "\n" not in message and near in message and "(all valid: 8, 12, 16)" in message
        assert not (tmp_path / "o").exists()
    with pytest.raises(MoemergeError, match="dominant=frequency"):
        moemerge.run(_recipe(grouped_dir, text_file, tmp_path / "o", num_average_groups=8, router="compact",
                             dominant="frequency"), progress=False)
    with pytest.raises(MoemergeError, match="padded"):
        moemerge.run(_recipe(grouped_dir, text_file, tmp_path / "o", num_average_groups=8, router="padded"),
                     progress=False)
    assert read and not [k for k in read if ".layers." in k]


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refused_families_name_their_reason_in_one_line(model_type):
    from types import SimpleNamespace

    with pytest.raises(MoemergeError) as err:
        family_of(SimpleNamespace(model_type=model_type))
    assert str(err.value) == f"model_type {model_type!r} is not supported: {REFUSED[model_type]}"


def test_a_refused_checkpoint_fails_before_reading_weights(tmp_path, text_file):
    from transformers import GptOssConfig

    d = tmp_path / "gpt-oss"
    d.mkdir()
    GptOssConfig(num_hidden_layers=1, hidden_size=32).save_pretrained(d)  # a config and no weights at all
    with pytest.raises(MoemergeError, match="gpt_oss.*biases"):
        moemerge.run(_recipe(d, text_file, tmp_path / "o", num_average_groups=4), progress=False)
