"""Evaluation: lm-eval bridge against a hand computation, perplexity against transformers' own loss, fidelity
identities, and the merge run's eval.json / report.md."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from moemerge.cli import main
from moemerge.errors import MoemergeError
from moemerge.evaluate import fidelity as fid
from moemerge.evaluate.lm_eval import BUNDLED_TASKS, TaskSpec, resolve_tasks, task_manager
from moemerge.loading import load_model

TEST_TASK = Path(__file__).parent / "data" / "tiny_mc" / "tiny_mc.yaml"  # relative data_files, 8 items


# ---- lm-eval ---------------------------------------------------------------------------------------------------
def _hand_loglik(model, tok, context: str, continuation: str) -> float:
    """sum log p(continuation | context), tokenised the way lm-eval's HFLM does (whole string, then split)."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)[0]
    targets = ids[0, len(ctx):]
    return float(logp[len(ctx) - 1:].gather(-1, targets[:, None]).sum())


def test_lm_eval_matches_hand_computation(model_dirs):
    from moemerge.evaluate.lm_eval import evaluate_tasks

    loaded = load_model(str(model_dirs["mixtral"]), "float32", "cpu")
    res = evaluate_tasks(loaded.model, loaded.tokenizer, "bundled:tiny_cloze", limit=6, log_samples=True)
    task = res.tasks["tiny_cloze"]
    assert task.n == 6 and task.acc is not None and task.acc_norm is not None
    assert task.acc_stderr is not None and task.acc_norm_stderr is not None
    samples = res.samples["tiny_cloze"]
    hand_acc, hand_norm = [], []
    for s in samples:
        doc = s["doc"]
        lls = [_hand_loglik(loaded.model, loaded.tokenizer, doc["context"], " " + c) for c in doc["choices"]]
        assert lls == pytest.approx([r[0] for r in s["filtered_resps"]], abs=1e-3)
        hand_acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["label"]))
        norm = [ll / len(" " + c) for ll, c in zip(lls, doc["choices"])]  # acc_norm: per byte of the choice
        hand_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == doc["label"]))
        assert hand_acc[-1] == s["acc"] and hand_norm[-1] == s["acc_norm"]
    assert task.acc == pytest.approx(sum(hand_acc) / len(hand_acc))
    assert task.acc_norm == pytest.approx(sum(hand_norm) / len(hand_norm))
    assert set(res.to_json()["tasks"]["tiny_cloze"]) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}


def test_task_resolution(tmp_path):
    spec = resolve_tasks("bundled:tiny_cloze")
    files = spec.tasks[0]["dataset_kwargs"]["data_files"]["test"]
    assert files == str(BUNDLED_TASKS / "tiny_cloze" / "tiny_cloze.jsonl") and not spec.needs_defaults
    named = resolve_tasks("winogrande, arc_easy")
    assert named.tasks == ["winogrande", "arc_easy"] and named.needs_defaults
    with pytest.raises(MoemergeError, match="unknown bundled task"):
        resolve_tasks("bundled:nope")
    with pytest.raises(MoemergeError, match="does not exist"):
        resolve_tasks(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: nothere.jsonl\n")
    with pytest.raises(MoemergeError, match="data file .* does not exist"):
        resolve_tasks(str(bad))
    with pytest.raises(MoemergeError, match="unknown lm-eval task 'no_such_task'"):
        task_manager(TaskSpec(tasks=["no_such_task"]))


def _function_task(folder):
    """A task YAML with a ``!function`` tag (goes through lm-eval's include_path) over the bundled items."""
    folder.mkdir()
    (folder / "utils.py").write_text("def keep(dataset):\n    return dataset.select(range(4))\n")
    data = BUNDLED_TASKS / "tiny_cloze" / "tiny_cloze.jsonl"
    (folder / "fn_task.yaml").write_text(
        f"task: fn_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "process_docs: !function utils.keep\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
        "  - metric: acc_norm\n")
    (folder / "snippet.yaml").write_text("dataset_path: json\n")  # not a task: skipped in a folder
    return folder


def test_eval_cli_runs_a_task_folder_without_ppl(model_dirs, tmp_path):
    folder = _function_task(tmp_path / "tasks")
    spec = resolve_tasks(str(folder))
    assert spec.tasks == ["fn_task"] and spec.include_paths == [str(folder)]
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["eval", str(model_dirs["qwen2_moe"]), "--task", str(folder), "--result-path",
                                  str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert "acc_norm" in r.output
    data = json.loads(out.read_text())
    assert data["lm_eval"]["tasks"]["fn_task"]["n"] == 4 and data["perplexity"] == {}
    r = CliRunner().invoke(main, ["eval", str(model_dirs["qwen2_moe"])])
    assert r.exit_code == 2 and "nothing to evaluate" in r.output


# ---- perplexity ------------------------------------------------------------------------------------------------
def test_eval_perplexity_equals_transformers_loss(model_dirs, text_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moemerge.data import load_text

    out = tmp_path / "ppl.json"
    r = CliRunner().invoke(main, ["eval", str(model_dirs["mixtral"]), "--ppl", str(text_file), "--seq-len", "32",
                                  "--ppl-windows", "6", "--dtype", "float32", "--result-path", str(out), "-q"])
    assert r.exit_code == 0, r.output
    ours = json.loads(out.read_text())["perplexity"][str(text_file)]

    model = AutoModelForCausalLM.from_pretrained(model_dirs["mixtral"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dirs["mixtral"])
    src = load_text(str(text_file))
    ids = tok(src.separator.join(src.docs), add_special_tokens=False)["input_ids"]
    total = len(ids) // 32
    losses = []
    with torch.no_grad():
        for j in range(6):  # 6 of the non-overlapping windows of 32 tokens, evenly spaced, each scored on its own
            w = j * total // 6
            window = torch.tensor([ids[w * 32:(w + 1) * 32]])
            losses.append(model(input_ids=window, labels=window).loss.item())
    direct = math.exp(sum(losses) / len(losses))  # equal-length windows: mean of means = mean over all tokens
    assert ours == pytest.approx(direct, rel=1e-4)


# ---- fidelity --------------------------------------------------------------------------------------------------
def test_kl_and_agreement_closed_form():
    p = torch.tensor([[0.5, 0.25, 0.25]]).log()
    q = torch.tensor([[0.25, 0.5, 0.25]]).log()
    kl, top1 = fid.kl_and_agreement(p, q)
    assert kl == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(0.5))
    assert top1 == 0.0
    assert fid.kl_and_agreement(p, p) == (0.0, 1.0)


def test_fidelity_of_a_model_with_itself_and_after_merging(model_dirs, text_file):
    from moemerge.evaluate import eval_texts
    from moemerge.pipeline import merge_model
    from moemerge.recipe import Recipe

    loaded = load_model(str(model_dirs["mixtral"]), "float32", "cpu")
    wins = eval_texts(loaded.tokenizer, [str(text_file)], 32, 4)[0].windows
    ref = fid.reference(loaded.model, wins, prompts=2, prompt_tokens=8, max_new_tokens=6)
    same = fid.compare(loaded.model, ref, loaded.tokenizer)
    assert same["kl"] == 0.0 and same["top1"] == 1.0
    assert all(g["original"] == g["merged"] for g in same["generations"])

    kls = []
    for groups in (6, 2):  # fewer experts left -> further from the original
        model = load_model(str(model_dirs["mixtral"]), "float32", "cpu")
        recipe = Recipe.build(calibration=str(text_file), n_sentences=4, seq_len=32, num_average_groups=groups,
                              cache=False)
        merge_model(model, recipe, progress=False)
        got = fid.compare(model.model, ref, model.tokenizer)
        assert got["kl"] > 0 and got["top1"] < 1
        kls.append(got)
    assert kls[1]["kl"] > kls[0]["kl"] and kls[1]["top1"] <= kls[0]["top1"]


def test_fidelity_windows_respect_the_memory_cap():
    w = torch.zeros(10, 65, dtype=torch.long)
    assert fid.fidelity_windows(w, vocab_size=100, count=8).shape == (8, 65)
    assert fid.fidelity_windows(w, vocab_size=100, count=8, max_elements=64 * 100 * 3).shape == (3, 65)
    assert fid.fidelity_windows(w, vocab_size=100, count=8, max_elements=1000).shape == (1, 11)


# ---- merge run: eval.json and report.md ----------------------------------------------------------------------
def test_merge_writes_eval_json_and_report_with_pictures(model_dirs, text_file, tmp_path):
    from moemerge.pipeline import run
    from moemerge.recipe import Recipe

    out = tmp_path / "merged"
    recipe = Recipe.build(model_path=str(model_dirs["qwen2_moe"]), output_path=str(out),
                          calibration=str(text_file), n_sentences=4, seq_len=32, num_average_groups=4,
                          ppl=[str(text_file)], ppl_windows=3, task=str(TEST_TASK))
    result = run(recipe, progress=False)
    summary = json.loads((out / "eval.json").read_text())
    assert summary["fidelity"]["kl"] > 0 and 0 <= summary["fidelity"]["top1"] <= 1
    lm = summary["lm_eval"]
    assert lm["before"]["tasks"]["tiny_mc"]["n"] == 8 and lm["after"]["tasks"]["tiny_mc"]["acc"] is not None
    page = out / "report.md"
    assert result.report_path == page and page.is_file()
    text = page.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all(not l.startswith("/") and (out / l).is_file() for l in links)
    for heading in ("## Recipe", "## Groups per layer", "## Before / after", "## Fidelity", "## lm-eval",
                    "## Timings"):
        assert heading in text
    assert "num_average_groups: 4" in text


def test_spread_windows_cover_the_whole_text():
    from moemerge.evaluate import spread_windows

    w = torch.arange(20).view(10, 2)
    assert spread_windows(w, None) is w and spread_windows(w, 10) is w and spread_windows(w, 12) is w
    picked = spread_windows(w, 4)[:, 0] // 2
    assert picked.tolist() == [0, 2, 5, 7]  # from the first, evenly spaced, reaching the last part
