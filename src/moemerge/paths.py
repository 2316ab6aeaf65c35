"""Model arguments, checked without importing torch or transformers, so that a mistyped path is answered at once.

A model argument is a local checkpoint folder, a bundled model's name (``tiny-mixtral``: it works wherever a folder
does) or a hub id ``owner/name``; anything else is refused before the heavy libraries load.
"""

from __future__ import annotations

from pathlib import Path

from .errors import MoemergeError


def local_path(source: str) -> Path:
    """A model argument as a path: a bundled model's name resolves to its folder in the package."""
    from . import zoo

    return zoo.model_path(source) if source in zoo.MODELS else Path(source).expanduser()


def looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def model_folder(source: str) -> Path | None:
    """The local folder of a model argument (``None`` for a hub id), or a one-line error."""
    path = local_path(source)
    if path.exists():
        if not (path / "config.json").is_file():
            raise MoemergeError(f"model folder {source!r} has no config.json")
        return path
    if looks_like_hub_id(source):
        return None
    raise MoemergeError(f"model {source!r} is neither a local folder nor a hub id (owner/name)")
