"""The base model a checkpoint was trained on, recorded so its frozen weights are never refilled from another one.

A LoRA (trainable-only) or quantized checkpoint holds the adapters and heads, not the base weights: resume and
``nvr export`` reload those from ``model_name_or_path``. If that name now points at other weights (a re-downloaded
revision, a re-pointed local folder, another fine-tune saved over it), the adapter would be merged into the wrong
model without any error. Every checkpoint therefore records the base model's content fingerprint
(:func:`nvr.utils.fingerprint.model_fingerprint`: every file of its folder, memoized by file identity), and loading
a checkpoint that refills the base checks it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from nvr.utils.errors import InputError
from nvr.utils.fingerprint import model_fingerprint

log = logging.getLogger(__name__)

BASE_KEY = "nvr_base_model"
"""Checkpoint entry: ``{"model_name_or_path": ..., "fingerprint": ...}`` of the base model (None when not local)."""


def base_model_record(model_name_or_path: str, memo_dir: str | Path | None = None) -> dict[str, Any]:
    """What a checkpoint records about its base model (the fingerprint is None when the model is not local)."""
    return {"model_name_or_path": str(model_name_or_path),
            "fingerprint": model_fingerprint(str(model_name_or_path), memo_dir)}


def check_base_model(ckpt: dict[str, Any], model_name_or_path: str, path: str | Path | None,
                     memo_dir: str | Path | None = None, key: str = "model.embedder.model_name_or_path") -> None:
    """Refuse to refill a checkpoint's base weights from a model whose content differs from the one it trained on.

    ``ckpt`` is a Lightning checkpoint or an adapter folder's ``nvr_embedder.json``; ``key`` is the setting that
    names the base, for the hint. A record-less one (older nvr) or one whose base was not local at training time is
    loaded with a warning: there is nothing to compare.
    """
    record = ckpt.get(BASE_KEY)
    if not isinstance(record, dict) or not record.get("fingerprint"):
        log.warning("%s: no record of the base model's fingerprint (older nvr); the base weights are "
                    "reloaded from %s unchecked", path, model_name_or_path)
        return
    current = model_fingerprint(str(model_name_or_path), memo_dir)
    if current == record["fingerprint"]:
        return
    now = "is not on this machine" if current is None else f"now has fingerprint {current[:12]}"
    raise InputError(
        f"only the trained weights (LoRA adapter / quantized) are saved here; their base model "
        f"{record.get('model_name_or_path')!r} had fingerprint {str(record['fingerprint'])[:12]} at training time, "
        f"but {model_name_or_path!r} {now}: these are other base weights, and the adapter would be applied to the "
        f"wrong model. Point {key} at the original base model", path)
