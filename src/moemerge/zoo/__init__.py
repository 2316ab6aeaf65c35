"""The bundled default: a small text corpus and tiny MoE checkpoints trained on it (``scripts/train_zoo.py``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import MoemergeError

ROOT = Path(__file__).resolve().parent
MODELS = {"tiny-mixtral": "Mixtral-style, 8 experts, top-2, trained from scratch",
          "tiny-qwen-moe": "Qwen1.5-MoE-style, 16 fine-grained experts, top-4, shared expert, upcycled"}
# Upcycled like Qwen1.5-MoE (and, reportedly, Mixtral): the representative case. tiny-mixtral, trained from scratch,
# is the adversarial one for weight averaging (its experts share no neuron order).
DEFAULT_MODEL = "tiny-qwen-moe"


def model_path(name: str = DEFAULT_MODEL) -> Path:
    if name not in MODELS:
        raise MoemergeError(f"unknown bundled model {name!r}; valid choices: {', '.join(MODELS)}")
    return ROOT / "models" / name


def corpus_path(split: str = "train") -> Path:
    if split not in ("train", "validation", "test"):
        raise MoemergeError(f"unknown corpus split {split!r}; valid choices: train, validation, test")
    return ROOT / "data" / "corpus" / f"{split}.jsonl"
