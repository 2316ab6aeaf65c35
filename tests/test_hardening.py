"""Bad or hostile input ends in one line before the expensive part, and no code from a model folder ever runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moemerge

from conftest import make_model


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moemerge.cli", *args], capture_output=True, text=True, timeout=300)


def _merge(model: Path, out: Path, text: Path, *extra: str) -> subprocess.CompletedProcess:
    return _cli("merge", str(model), "-o", str(out), "--num-average-groups", "4", "--calibration", str(text),
                "--n-sentences", "4", "--seq-len", "32", "--ppl", "none", "-q", *extra)


def _one_line(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def test_calibration_text_that_is_not_utf8(model_dirs, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    good = (json.dumps({"text": "first line"}) + "\n").encode()
    bad.write_bytes(good + b'{"text": "caf\xe9"}\n')
    before = bad.read_bytes()
    r = _merge(model_dirs["mixtral"], tmp_path / "out", bad)
    _one_line(r, str(bad), "not UTF-8", f"byte {len(good) + 13}")
    assert not (tmp_path / "out").exists() and bad.read_bytes() == before


def test_nan_weights_name_the_layer_and_expert(tmp_path, tokenizer, text_file):
    d = tmp_path / "nan"
    make_model("mixtral", vocab_size=len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    tensors = load_file(d / "model.safetensors")
    key = "model.layers.1.block_sparse_moe.experts.5.w2.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    r = _merge(d, tmp_path / "out", text_file)
    _one_line(r, "decoder layer 1", "expert 5", "NaN")
    assert not (tmp_path / "out").exists()


def test_infeasible_group_limit_fails_before_calibration(model_dirs, text_file, tmp_path, monkeypatch):
    from moemerge import pipeline

    def never(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(pipeline, "execute", never)
    recipe = moemerge.Recipe.build(model_path=str(model_dirs["mixtral"]), output_path=str(tmp_path / "out"),
                                   calibration=str(text_file), num_average_groups=2, dominant="random",
                                   group_limit=3, ppl=["none"])
    with pytest.raises(moemerge.MoemergeError, match=r"group_limit=3 is infeasible .* \(need group_limit >= 4\)"):
        moemerge.run(recipe, progress=False)


def test_a_model_folder_never_runs_its_own_code(tmp_path, tokenizer, text_file):
    """A folder whose config names `modeling_moemerge.py` in its auto_map, with a file of that name that writes a
    marker: merge, eval and analyze must never import it."""
    marker = tmp_path / "marker"
    d = tmp_path / "planted"
    make_model("mixtral", vocab_size=len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_moemerge.MixtralMappedConfig",
                          "AutoModelForCausalLM": "modeling_moemerge.MixtralMappedForCausalLM"}
    (d / "config.json").write_text(json.dumps(config))
    (d / "modeling_moemerge.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    results = [_merge(d, tmp_path / "out", text_file),
               _cli("eval", str(d), "--ppl", str(text_file), "--seq-len", "32", "-q"),
               _cli("analyze", str(d), "-o", str(tmp_path / "an"), "--calibration", str(text_file),
                    "--n-sentences", "2", "--seq-len", "32", "--no-importance", "-q")]
    assert not marker.exists()
    for r in results:
        _one_line(r, "modeling_moemerge.py")


def test_moemerge_formats_load_through_installed_classes(model_dirs, text_file, tmp_path):
    """A mapped checkpoint written by moemerge is evaluated without trust_remote_code (its shipped file untouched)."""
    out = tmp_path / "mapped"
    moemerge.run(moemerge.Recipe.build(model_path=str(model_dirs["qwen2_moe"]), output_path=str(out),
                                       calibration=str(text_file), num_average_groups=4, router="mapped",
                                       n_sentences=4, seq_len=32, ppl=["none"], report=False), progress=False)
    loaded = moemerge.load_model(str(out), "float32", "cpu", require_moe=False)
    assert type(loaded.model).__module__.startswith("moemerge.")
    with torch.no_grad():
        assert torch.isfinite(loaded.model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_run_killed_after_its_checkpoint_is_finished_by_the_same_command(model_dirs, text_file, tmp_path):
    """SIGKILL once the checkpoint is in place (during the lm-eval of the merged model): the same command then
    finds the complete checkpoint of the same recipe and model, keeps it, and writes the evaluation and report."""
    import os
    import signal
    import time

    out = tmp_path / "out"
    args = [sys.executable, "-m", "moemerge.cli", "merge", str(model_dirs["mixtral"]), "-o", str(out),
            "--num-average-groups", "4", "--calibration", str(text_file), "--n-sentences", "4", "--seq-len", "32",
            "--ppl", str(text_file), "--ppl-windows", "2", "--task", "bundled:tiny_cloze", "-q"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "MOEMERGE_CACHE": str(tmp_path / "cache")})
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "merge_info.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "merge_info.json").exists() and not (out / "report.md").exists()
    assert json.loads((out / "eval.json").read_text())["complete"] is False
    weights = {f.name: f.stat().st_mtime_ns for f in out.glob("*.safetensors")}
    done = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MOEMERGE_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    assert "finishing its evaluation and report" in done.stderr
    final = json.loads((out / "eval.json").read_text())
    assert final["complete"] is True and final["lm_eval"]["after"] and (out / "report.md").exists()
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("*.safetensors")} == weights  # not merged again
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr  # a finished run is not redone


def test_a_second_run_on_the_same_output_is_refused(model_dirs, text_file, tmp_path):
    import os

    out = tmp_path / "out"
    busy = tmp_path / ".out.tmp-12345678"
    busy.mkdir()
    (busy / ".moemerge-lock").write_text(f"{os.getpid()}\n")  # a live process is writing
    r = _merge(model_dirs["mixtral"], out, text_file)
    _one_line(r, "another moemerge run is writing")
    assert busy.exists() and not out.exists()


# ---- a newcomer's first hour ---------------------------------------------------------------------------------------
def test_the_cli_imports_neither_torch_nor_transformers():
    probe = "import sys, moemerge.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_merge_help_shows_defaults_and_choices():
    r = _cli("merge", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "default: hc" not in text  # presets are not defaults
    assert "default: freq" in text and "choices: " in text and "reap" in text  # --merge default, --prune choices


def test_demo_never_deletes_an_existing_folder(tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    r = _cli("demo", "-o", str(keep), "-q")
    _one_line(r, "exists", "--overwrite")
    assert (keep / "notes.txt").read_text() == "precious"


def test_bundled_model_names_work_as_model_paths(tmp_path):
    r = _cli("eval", "tiny-mixtral", "--ppl", "bundled:test", "--ppl-windows", "2", "--seq-len", "64", "-q")
    assert r.returncode == 0, r.stderr
    assert "tiny-mixtral" in r.stdout


def test_input_errors_are_answered_before_torch_loads(tmp_path):
    """A mistyped model path is refused by every command before torch, transformers or the registries load."""
    probe = ("import sys\nfrom moemerge.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
             "    pass\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    for args in (["merge", "/no/such/model", "-o", str(tmp_path / "o"), "--num-average-groups", "2"],
                 ["eval", "/no/such/model", "--ppl", "bundled:test"],
                 ["analyze", "/no/such/model", "-o", str(tmp_path / "a")],
                 ["recommend", "/no/such/model", "--num-average-groups", "2", "-o", str(tmp_path / "r.yaml")]):
        r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
        assert "neither a local folder nor a hub id" in r.stderr, (args, r.stderr)
        assert r.stdout.strip() == "[]", (args, r.stdout)


def test_no_command_replaces_a_users_file_without_overwrite(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text("precious")
    r = _cli("eval", "tiny-mixtral", "--ppl", "bundled:test", "--result-path", str(mine), "-q")
    _one_line(r, "exists", "--overwrite")
    report = tmp_path / "report"
    report.mkdir()
    (report / "notes.md").write_text("precious")
    r = _cli("analyze", "tiny-mixtral", "-o", str(report), "-q")
    _one_line(r, "exists", "--overwrite")
    recipe = tmp_path / "best.yaml"
    recipe.write_text("precious")
    r = _cli("recommend", "tiny-mixtral", "--num-average-groups", "4", "-o", str(recipe), "-q")
    _one_line(r, "exists", "--overwrite")
    (tmp_path / "best-2.yaml").write_text("precious")  # several budgets: one file per budget, each checked
    r = _cli("recommend", "tiny-mixtral", "--num-average-groups", "4,2", "-o", str(recipe), "-q")
    _one_line(r, "best-2.yaml", "--overwrite")
    assert mine.read_text() == recipe.read_text() == (report / "notes.md").read_text() == "precious"


def test_evaluation_window_defaults_to_the_models_positions_and_is_printed():
    from types import SimpleNamespace

    from moemerge.evaluate import window_length

    assert window_length(SimpleNamespace(max_position_embeddings=256)) == (256, None)
    assert window_length(SimpleNamespace(max_position_embeddings=32768)) == (2048, None)
    length, note = window_length(SimpleNamespace(max_position_embeddings=256), 2048)
    assert length == 256 and "256" in note and "2048" in note
    r = _cli("eval", "tiny-mixtral", "--ppl", "bundled:test", "--ppl-windows", "2", "-q")
    assert r.returncode == 0 and "256 tokens" in r.stderr and "2 × 256" in r.stdout, r.stderr


def test_plots_are_report_sized_with_integer_count_axes(tmp_path):
    import matplotlib.image

    from moemerge.evaluate import plots

    path = plots.experts_per_layer({0: 8, 1: 8}, {0: 3, 1: 5}, tmp_path / "e.png")
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width >= 900 and height >= 450
    fig, ax = plots._plt().subplots()
    ax.plot([0, 1], [0.0, 3.0])
    plots._integer_axis(ax.yaxis)
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_yticks())


def test_every_link_in_the_docs_resolves():
    import re

    root = Path(__file__).resolve().parents[1]
    pages = [root / "README.md", *(root / "docs").glob("*.md"), *(root / "src/moemerge/zoo/models").glob("*/README.md")]
    broken = []
    for page in pages:
        text = page.read_text()
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            target = link.split("#")[0]
            if target and not target.startswith(("http://", "https://")) and not (page.parent / target).exists():
                broken.append(f"{page.name}: {link}")
        broken += [f"{page.name}: {ref}" for ref in re.findall(r"`(?:\.\./)?shared/[^`]+`", text)]
    assert not broken, broken
