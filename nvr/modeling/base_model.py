"""The base model a checkpoint was trained on, recorded so its frozen weights are never refilled from another one.

A LoRA (trainable-only) or quantized checkpoint holds the adapters and heads, not the base weights: resume and
``nvr export`` reload those from ``model_name_or_path``. If that name now points at other weights (a re-downloaded
revision, a re-pointed local folder, another fine-tune saved over it), the adapter would be merged into the wrong
model without any error. Every checkpoint therefore records the content hash of each base file that loading reads
(top-level weights, their index, ``config.json`` and the tokenizer files; memoized by file identity), and loading a
checkpoint that refills the base compares them. Files loading never reads (an ``onnx/`` export added to the same
hub snapshot, a model card) do not count, so they cannot make a good checkpoint unloadable.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from nvr.utils.errors import InputError
from nvr.utils.fingerprint import file_sha256, model_folder
from nvr.utils.hashing import sha256_json

log = logging.getLogger(__name__)

BASE_KEY = "nvr_base_model"
"""Checkpoint entry: ``{"model_name_or_path", "fingerprint", "files": {name: sha256}}`` (None when not local)."""
_LOADED_FILES = re.compile(
    r"^(config\.json|.+\.safetensors|.+\.bin|.+\.(safetensors|bin)\.index\.json|tokenizer(_config)?\.json"
    r"|tokenizer\.model|special_tokens_map\.json|added_tokens\.json|vocab\.(txt|json)|merges\.txt|spiece\.model"
    r"|.+\.tiktoken)$")
"""Top-level files of a model folder that ``from_pretrained`` of the backbone and its tokenizer read."""


def base_files(model_name_or_path: str, memo_dir: str | Path | None = None) -> dict[str, str] | None:
    """``{file name: sha256}`` of the base files loading reads; None when the model is not on this machine."""
    folder = model_folder(str(model_name_or_path))
    if folder is None:
        return None
    return {p.name: file_sha256(p, memo_dir) for p in sorted(folder.iterdir())
            if p.is_file() and _LOADED_FILES.match(p.name)}


def base_model_record(model_name_or_path: str, memo_dir: str | Path | None = None) -> dict[str, Any]:
    """What a checkpoint records about its base model."""
    files = base_files(model_name_or_path, memo_dir)
    return {"model_name_or_path": str(model_name_or_path),
            "fingerprint": None if files is None else sha256_json(files), "files": files}


def check_base_model(ckpt: dict[str, Any], model_name_or_path: str, path: str | Path | None,
                     memo_dir: str | Path | None = None, key: str = "model.embedder.model_name_or_path") -> None:
    """Refuse to refill a checkpoint's base weights from a model whose files differ from the ones it trained on.

    ``ckpt`` is a Lightning checkpoint or an adapter folder's ``nvr_embedder.json``; ``key`` is the setting that
    names the base, for the hint. A record-less one (older nvr) or one whose base was not local at training time is
    loaded with a warning: there is nothing to compare.
    """
    record = ckpt.get(BASE_KEY)
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        log.warning("%s: no record of the base model's files (older nvr); the base weights are reloaded from %s "
                    "unchecked", path, model_name_or_path)
        return
    current = base_files(str(model_name_or_path), memo_dir)
    if current == record["files"]:
        return
    if current is None:
        what = "is not on this machine"
    else:
        changed = sorted(n for n in set(current) | set(record["files"]) if current.get(n) != record["files"].get(n))
        what = f"has other files now ({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''} differ)"
    raise InputError(
        f"only the trained weights (LoRA adapter / quantized) are saved here; their base model was "
        f"{record.get('model_name_or_path')!r}, but {model_name_or_path!r} {what}: these are other base weights, and "
        f"the adapter would be applied to the wrong model. Point {key} at the original base model", path)
