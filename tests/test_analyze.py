"""``moemerge analyze``, routing interventions and the router-entropy statistic."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from moemerge.cli import main
from moemerge.errors import MoemergeError
from moemerge.evaluate.analyze import cosine_matrix, imbalance
from moemerge.evaluate.interventions import expert_importance, intervene, parse_selection
from moemerge.families import moe_layers

from conftest import make_model


def _png_shape(path) -> tuple[int, ...]:
    import matplotlib.image

    return matplotlib.image.imread(path).shape


def _links(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def _routed(model, ids) -> dict[int, torch.Tensor]:
    """top_k_index each MoE block handed to its experts."""
    seen, handles = {}, []
    for layer in moe_layers(model):
        def hook(module, args, li=layer.index):
            seen[li] = args[1].clone()
        handles.append(layer.experts.register_forward_pre_hook(hook))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for h in handles:
        h.remove()
    return seen, logits


# ---- pure helpers ----------------------------------------------------------------------------------------------
def test_helpers():
    assert imbalance(np.full(8, 0.25)) == 0.0
    assert imbalance(np.array([0.5, 0.0])) == pytest.approx(1.0)
    c = cosine_matrix(np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 0.0]]))
    assert np.allclose(c[:3, :3], [[1, 1, 0], [1, 1, 0], [0, 0, 1]]) and (c[3] == 0).all()
    assert parse_selection(["0:3,5", "1:2"]) == {0: [3, 5], 1: [2]}
    assert parse_selection("all:1;0:2", layers=[0, 1]) == {0: [1, 2], 1: [1]}
    with pytest.raises(MoemergeError, match="bad expert selection"):
        parse_selection("0-3")


# ---- interventions ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_mask_and_force_change_routing_and_leave_no_trace(family):
    model = make_model(family)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    base_idx, base_logits = _routed(model, ids)
    with intervene(model, mask={0: [base_idx[0][0, 0].item()]}):  # an expert token 0 really used
        idx, logits = _routed(model, ids)
    assert base_idx[0][0, 0].item() not in idx[0].unique().tolist()
    assert not torch.allclose(logits, base_logits)
    k = base_idx[0].shape[1]
    chosen = list(range(k))
    with intervene(model, force={1: chosen}):
        idx, _ = _routed(model, ids)
    assert set(idx[1].unique().tolist()) <= set(chosen)
    assert torch.equal(idx[0], base_idx[0])  # layer 0 runs before the forced layer 1: untouched
    with intervene(model):  # nothing asked: exactly the model
        _, same = _routed(model, ids)
    assert torch.equal(same, base_logits)
    _, after = _routed(model, ids)
    assert torch.equal(after, base_logits)  # hooks removed
    with pytest.raises(MoemergeError, match="no expert to route to"):
        with intervene(model, mask={0: list(range(8))}):
            pass
    with pytest.raises(MoemergeError, match="not an MoE layer"):
        with intervene(model, mask={7: [0]}):
            pass


def test_unused_expert_has_zero_importance():
    # Mixtral renormalises its top-k weights, so masking an expert outside every token's top-k changes nothing
    model = make_model("mixtral")
    wins = torch.randint(0, 300, (1, 4), generator=torch.Generator().manual_seed(1))
    routed, _ = _routed(model, wins)
    unused = sorted(set(range(8)) - set(routed[0].unique().tolist()))
    assert unused  # 4 tokens x top-2 leave some of the 8 experts unused
    base, imp = expert_importance(model, wins, layers=[0])
    assert list(imp) == [0] and len(imp[0]) == 8
    for e in unused:
        assert imp[0][e] == pytest.approx(0.0, abs=1e-6)
    assert max(abs(x) for x in imp[0]) > 1e-4


# ---- router entropy --------------------------------------------------------------------------------------------
def test_router_entropy_statistic(tmp_path, tokenizer, text_file):
    from moemerge.calibrate import CalibrationSettings
    from moemerge.loading import load_model
    from moemerge.pipeline import calibrate

    model = make_model("mixtral", vocab_size=len(tokenizer))
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.weight.zero_()  # uniform router: entropy is exactly log E
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), "float32", "cpu")
    stats = calibrate(loaded, CalibrationSettings(str(text_file), 2, 32, 2, 0, False), ["router_entropy"],
                      progress=False)
    for li in stats.layers:
        s = stats.get(li, "router_entropy")
        assert float(s["sum"] / s["tokens"]) == pytest.approx(math.log(8))


# ---- the command -----------------------------------------------------------------------------------------------
def test_analyze_command_writes_pictures_and_report(model_dirs, text_file, tmp_path):
    out = tmp_path / "analysis"
    r = CliRunner().invoke(main, ["analyze", str(model_dirs["qwen2_moe"]), "-o", str(out), "--calibration",
                                  str(text_file), "--n-sentences", "4", "--seq-len", "32", "--text", str(text_file),
                                  "--windows", "2", "--mask", "0:1,2", "-q"])
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output and "report:" in r.output
    md = (out / "analysis.md").read_text()
    links = _links(md)
    expected = {"frequency.png", "entropy.png", "imbalance.png", "importance.png", "similarity_router-logits.png",
                "similarity_weight.png", "similarity_expert-output.png"}
    assert expected <= set(links)
    for name in links:
        h, w = _png_shape(out / name)[:2]
        assert h >= 150 and w >= 300
    data = json.loads((out / "analysis.json").read_text())["model"]
    layer0 = data["layers"]["0"]
    assert sum(layer0["frequency"]) == pytest.approx(4)  # top-4: each token counts in four experts
    assert np.allclose(np.diag(layer0["similarity"]["weight"]), 1)
    assert 0 < layer0["entropy"] <= math.log(8) + 1e-9
    assert len(layer0["importance"]) == 8 and data["interventions"][0]["mask"] == {"0": [1, 2]}


def test_analyze_a_merged_checkpoint_against_its_original(model_dirs, text_file, tmp_path):
    from moemerge.pipeline import run
    from moemerge.recipe import Recipe

    merged = tmp_path / "merged"
    run(Recipe.build(model_path=str(model_dirs["mixtral"]), output_path=str(merged), calibration=str(text_file),
                     n_sentences=4, seq_len=32, num_average_groups=4, ppl=["none"], fidelity=False, report=False),
        progress=False)
    out = tmp_path / "cmp"
    r = CliRunner().invoke(main, ["analyze", str(merged), "--compare", str(model_dirs["mixtral"]), "-o", str(out),
                                  "--calibration", str(text_file), "--n-sentences", "4", "--seq-len", "32",
                                  "--no-importance", "--similarity", "weight", "-q"])
    assert r.exit_code == 0, r.output
    md = (out / "analysis.md").read_text()
    assert "merged by moemerge" in md and "compared with" in md
    links = _links(md)
    assert {"cluster_sizes.png", "similarity_weight.png", "similarity_weight_compare.png"} <= set(links)
    for name in links:
        assert _png_shape(out / name)[0] >= 150
    data = json.loads((out / "analysis.json").read_text())
    groups = data["model"]["layers"]["0"]["groups"]
    assert len(groups) == 4
    # router=keep: slots of one group hold the same merged expert, so their weights are identical (cosine 1)
    sim = np.array(data["model"]["layers"]["0"]["similarity"]["weight"])
    for g in groups:
        assert np.allclose(sim[np.ix_(g, g)], 1)
