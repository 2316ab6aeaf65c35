"""Shared fixtures: tiny random MoE models built in memory (one per family), a tiny tokenizer, and local text.

Nothing here downloads anything: tests run with the hub switched off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Under pytest-xdist (`-n 2`, the README's command) each worker gets one thread: two workers share the 2 cores
# instead of four threads fighting over them. Alone, the tests use 2 threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

TEXT = [
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness "
    "was upon the face of the deep.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "The json module exposes an API familiar to users of the standard library marshal and pickle modules.",
    "import os\nimport sys\n\nclass Config(dict):\n    def __getattr__(self, name):\n        return self[name]\n",
    "And God said, Let there be light: and there was light. And God saw the light, that it was good.",
] * 20


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["MOEMERGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def make_model(family: str, vocab_size: int = 300, seed: int = 0, **overrides):
    """A tiny random MoE model of the family (fp32, eval mode), from the family registry's tiny config."""
    from moemerge.families import tiny_model

    return tiny_model(family, vocab_size, seed, **overrides)


FAMILIES = ["mixtral", "qwen2_moe"]  # the families of the bundled models, for the end-to-end tests


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Each family saved as a local checkpoint folder with its tokenizer."""
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(f"tiny-{family}")
        make_model(family, vocab_size=len(tokenizer)).save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[family] = d
    return out


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "calib.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    return p
