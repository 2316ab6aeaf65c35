"""Text in, token windows out: calibration and evaluation data.

Documents are concatenated (joined by a blank line) and tokenized once, then cut into non-overlapping windows of
``seq_len`` tokens. A text shorter than one window is an error: we never pad or repeat text to length (the student's
Sub-MoE re-implementation tiled short WikiText paragraphs, which biases every statistic).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MoemergeError

LOG = logging.getLogger(__name__)

# Datasets the papers calibrate and evaluate on, by the names users type. Each entry: (datasets.load_dataset args,
# split, text column, separator). Only reachable online; the bundled corpus covers offline use.
NAMED_DATASETS: dict[str, tuple[tuple, dict, str, str, str]] = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {}, "test", "text", "\n\n"),
    "wikitext2-train": (("wikitext", "wikitext-2-raw-v1"), {}, "train", "text", "\n\n"),
    "ptb": (("ptb_text_only", "penn_treebank"), {}, "test", "sentence", " "),
    "c4": (("allenai/c4",), {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}},
           "validation", "text", "\n\n"),
    "c4-train": (("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}},
                 "train", "text", "\n\n"),
}
NAMED_DATASETS["wikitext"] = NAMED_DATASETS["wikitext2"]


@dataclass
class TextSource:
    """Documents and a human-readable description of where they came from (printed and stored in merge_info)."""

    docs: list[str]
    description: str
    separator: str = "\n\n"


def bundled_split(split: str) -> Path:
    from .zoo import corpus_path

    return corpus_path(split)


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub can be reached (never true in tests, which set HF_HUB_OFFLINE)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_text(spec: str | os.PathLike, max_docs: int | None = None) -> TextSource:
    """Read documents from a ``.jsonl`` (``{"text": ...}`` per line), a ``.txt`` file, a folder of those, the bundled
    corpus (``bundled``, ``bundled:validation``, ...) or a named dataset (``c4``, ``wikitext2``, ``ptb``).
    """
    spec = str(spec)
    if spec == "bundled" or spec.startswith("bundled:"):
        split = spec.split(":", 1)[1] if ":" in spec else "train"
        src = _read_local(bundled_split(split), max_docs)
        return TextSource(src.docs, f"bundled corpus ({split} split)")
    path = Path(spec).expanduser()
    if path.exists():
        return _read_local(path, max_docs)
    if spec in NAMED_DATASETS:
        return _read_named(spec, max_docs)
    raise MoemergeError(
        f"text source {spec!r} is not a file, a folder, 'bundled[:split]' or a dataset name "
        f"({', '.join(sorted(NAMED_DATASETS))})"
    )


def _decode(raw: bytes, f: Path, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MoemergeError(f"{f}: not UTF-8 text at byte {offset + exc.start} ({raw[exc.start:exc.start + 4]!r}); "
                            f"convert the file to UTF-8 (e.g. iconv -t utf-8)") from None


def _read_local(path: Path, max_docs: int | None) -> TextSource:
    files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".txt")) if path.is_dir() else [path]
    docs: list[str] = []
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, "rb") as fh:
                offset = 0
                for lineno, raw in enumerate(fh, 1):
                    line = _decode(raw, f, offset)
                    offset += len(raw)
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise MoemergeError(f"{f}:{lineno}: expected a JSON object with a 'text' field") from None
                    if text.strip():
                        docs.append(text)
        elif f.suffix == ".txt" or not path.is_dir():
            text = _decode(f.read_bytes(), f, 0)
            if text.strip():
                docs.append(text)
        if max_docs and len(docs) >= max_docs:
            docs = docs[:max_docs]
            break
    if not docs:
        raise MoemergeError(f"no text found in {path}")
    return TextSource(docs, str(path))


def _read_named(name: str, max_docs: int | None) -> TextSource:
    args, kwargs, split, column, sep = NAMED_DATASETS[name]
    try:
        import datasets

        ds = datasets.load_dataset(*args, split=split, **kwargs)
    except Exception as exc:  # datasets raises many types when offline
        raise MoemergeError(f"cannot load dataset {name!r} (offline?): {str(exc).splitlines()[0]}") from None
    docs = [t for t in ds[column][: max_docs or None] if t and t.strip()]
    if not docs:
        raise MoemergeError(f"dataset {name!r} has no text")
    return TextSource(docs, f"{name} ({'/'.join(args)}, {split})", separator=sep)


def tokenize(tokenizer, source: TextSource) -> torch.Tensor:
    """All documents joined by the source's separator, as one 1-D tensor of token ids (no special tokens)."""
    text = source.separator.join(source.docs)
    # verbose=False: the text is meant to be longer than the model's context (it is cut into windows next), so the
    # tokenizer's "sequence length is longer than the specified maximum" warning would only mislead
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int, count: int | None = None, seed: int | None = None,
            what: str = "text") -> torch.Tensor:
    """Non-overlapping ``[N, seq_len]`` windows of a token stream.

    ``count=None`` keeps all windows in order (perplexity); otherwise ``count`` windows drawn without replacement
    with ``seed`` (calibration), in stream order. Asking for more windows than the text holds keeps them all and
    logs it.
    """
    if seq_len < 2:
        raise MoemergeError(f"seq_len must be at least 2, got {seq_len}")
    n = ids.numel() // seq_len
    if n == 0:
        raise MoemergeError(f"{what} has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    all_windows = ids[: n * seq_len].view(n, seq_len)
    if count is None or count >= n:
        if count is not None and count > n:
            LOG.warning("%s holds only %d windows of %d tokens; using all of them (asked for %d)", what, n,
                        seq_len, count)
        return all_windows
    g = torch.Generator().manual_seed(seed or 0)
    pick = torch.randperm(n, generator=g)[:count].sort().values
    return all_windows[pick]


def default_calibration() -> str:
    """C4 when the hub is reachable (the HC-SMoE paper's choice), the bundled corpus otherwise."""
    return "c4-train" if hub_reachable() else "bundled"
