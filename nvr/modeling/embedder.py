"""One Embedder for teachers, training and evaluation: backbone + pooling head (+ L2 normalization).

Saved folder layout (``save_pretrained``), which is also the root of an export:
  nvr_embedder.json                          EmbedderConfig + how the backbone is stored
  config.json + model.safetensors            full backbone (AutoModel loads the folder), or
  adapter_config.json + adapter_model.*      a LoRA adapter over ``model_name_or_path``
  tokenizer files
  pooler.safetensors                         latent-attention head weights (only when it has parameters)
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nvr.modeling.backbone import TORCH_DTYPES, is_peft_model, load_backbone, load_tokenizer, position_limit
from nvr.modeling.base_model import BASE_KEY, base_model_record, check_base_model
from nvr.modeling.config import EmbedderConfig
from nvr.modeling.latent_attention import LatentAttentionPooling
from nvr.modeling.pooling import ClsPooling, LastTokenPooling, MeanPooling
from nvr.modeling.tokenization import tokenize
from nvr.utils.atomic import atomic_dir, write_json_atomic
from nvr.utils.errors import InputError

log = logging.getLogger(__name__)

META_FILE = "nvr_embedder.json"
POOLER_FILE = "pooler.safetensors"
FORMAT_VERSION = 1


def build_pooler(cfg: EmbedderConfig, hidden_size: int, seed: int = 0) -> nn.Module:
    if cfg.pooling == "mean":
        return MeanPooling()
    if cfg.pooling == "cls":
        return ClsPooling()
    if cfg.pooling == "last_token":
        return LastTokenPooling()
    pooler = LatentAttentionPooling(hidden_size, cfg.latent, seed=seed)
    return pooler.to(TORCH_DTYPES[cfg.dtype])


class Embedder(nn.Module):
    """``forward(input_ids, attention_mask, pool_mask=None) -> [B, H]`` float32 (L2-normalized if configured)."""

    def __init__(self, config: EmbedderConfig, backbone: nn.Module, tokenizer, pooler: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.pooler = pooler
        self.tokenizer = tokenizer

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def from_config(cls, cfg: EmbedderConfig, seed: int = 0) -> Embedder:
        """Load the backbone named by ``cfg`` and build a fresh pooling head (seeded when it has weights)."""
        tokenizer = load_tokenizer(cfg)
        backbone = load_backbone(cfg, pad_token_id=tokenizer.pad_token_id)
        return cls(cfg, backbone, tokenizer, build_pooler(cfg, hidden_size_of(backbone), seed))

    @classmethod
    def from_pretrained(cls, path: str | Path, is_trainable: bool = False, **overrides: Any) -> Embedder:
        """Reload a ``save_pretrained`` folder; ``overrides`` replace config fields (e.g. ``dtype``)."""
        path = Path(path)
        meta = read_meta(path)
        cfg_dict = {**meta["config"], **overrides}
        if meta["backbone"] == "adapter":
            from peft import PeftModel

            base_cfg = EmbedderConfig.from_dict({**cfg_dict, "lora": None}, key=str(path / META_FILE))
            check_base_model(meta, base_cfg.model_name_or_path, path / META_FILE, key="config.model_name_or_path")
            tokenizer = load_tokenizer(base_cfg, str(path))
            base = load_backbone(base_cfg, pad_token_id=tokenizer.pad_token_id)
            backbone = PeftModel.from_pretrained(base, str(path), is_trainable=is_trainable)
            cfg = EmbedderConfig.from_dict(cfg_dict, key=str(path / META_FILE))
        else:
            cfg = EmbedderConfig.from_dict({**cfg_dict, "lora": None}, key=str(path / META_FILE))
            tokenizer = load_tokenizer(cfg, str(path))
            backbone = load_backbone(cfg, pad_token_id=tokenizer.pad_token_id, path=str(path))
            cfg.model_name_or_path = str(path)  # the weights now live here, not in the original base
        embedder = cls(cfg, backbone, tokenizer, build_pooler(cfg, hidden_size_of(backbone)))
        if (path / POOLER_FILE).exists():
            from safetensors.torch import load_file

            state = load_file(str(path / POOLER_FILE))
            dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
            if len(dtypes) == 1:  # training keeps the head in float32 (master weights): reload it as trained
                embedder.pooler.to(dtypes.pop())
            embedder.pooler.load_state_dict(state)
        return embedder

    # ------------------------------------------------------------------------------------------------ running
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def hidden_size(self) -> int:
        return hidden_size_of(self.backbone)

    def tokenize(self, texts: list[str], max_length: int | None = None, prefix: str = "",
                 mask_prefix: bool = False) -> dict[str, Tensor]:
        """``tokenization.tokenize`` with this embedder's tokenizer, ``add_eos`` and default ``max_length``
        (clamped, with one warning, to the model's position limit: longer inputs would crash the embeddings)."""
        return tokenize(self.tokenizer, texts, self.clamp_max_length(max_length or self.config.max_length),
                        prefix=prefix, mask_prefix=mask_prefix, add_eos=self.config.add_eos)

    def clamp_max_length(self, max_length: int) -> int:
        limit = position_limit(getattr(self.backbone, "config", None))
        if limit is None or max_length <= limit:
            return max_length
        warned = self.__dict__.setdefault("_clamp_warned", set())
        if max_length not in warned:
            warned.add(max_length)
            log.warning("max_length %d exceeds the %d positions of %s; clamped to %d", max_length, limit,
                        self.config.model_name_or_path, limit)
        return limit

    def token_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Last-layer hidden states ``[B, L, H]`` of the backbone."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pool_mask: Tensor | None = None) -> Tensor:
        hidden = self.token_states(input_ids, attention_mask)
        pooled = self.pooler(hidden, attention_mask, attention_mask if pool_mask is None else pool_mask)
        pooled = pooled.to(torch.float32)
        return F.normalize(pooled, p=2, dim=-1) if self.config.normalize else pooled

    # ---------------------------------------------------------------------------------------------- identity
    def fingerprint(self) -> str:
        """sha256 over every weight (name, dtype, shape, bytes), the tokenizer and the settings that change the
        embedding.

        Caches of embeddings key on this, so it must change when weights, tokenizer (vocabulary, lower-casing,
        special tokens...) or pooling change and must not depend on where the model was loaded from.
        """
        digest = hashlib.sha256()
        settings = {
            "pooling": self.config.pooling, "dtype": self.config.dtype, "normalize": self.config.normalize,
            "bidirectional": self.config.bidirectional, "add_eos": self.config.add_eos,
            "quantization": self.config.quantization,
            "model_type": getattr(getattr(self.backbone, "config", None), "model_type", None),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
        }
        digest.update(json.dumps(settings, sort_keys=True).encode("utf-8"))
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode("utf-8"))
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor_bytes(tensor))
        return digest.hexdigest()

    # ------------------------------------------------------------------------------------------------ saving
    def save_pretrained(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the folder atomically (adapter only when LoRA is unmerged; full backbone otherwise)."""
        path = Path(path)
        with atomic_dir(path, overwrite=overwrite) as tmp:
            self.write_to(tmp)
        return path

    def write_to(self, folder: Path, backbone: nn.Module | None = None, cfg: EmbedderConfig | None = None,
                 extra_meta: dict[str, Any] | None = None) -> None:
        """Write into an existing (temporary) folder; ``backbone``/``cfg`` let export pass a merged copy."""
        backbone = self.backbone if backbone is None else backbone
        cfg = self.config if cfg is None else cfg
        kind = "adapter" if is_peft_model(backbone) else "full"
        backbone.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))
        pooler_state = {k: v.detach().cpu().contiguous() for k, v in self.pooler.state_dict().items()}
        if pooler_state:
            from safetensors.torch import save_file

            save_file(pooler_state, str(folder / POOLER_FILE))
        meta = {"format_version": FORMAT_VERSION, "backbone": kind, "config": cfg.to_dict(), **(extra_meta or {})}
        if kind == "adapter":  # the base weights stay in model_name_or_path: record which ones they were
            meta[BASE_KEY] = base_model_record(cfg.model_name_or_path)
        write_json_atomic(folder / META_FILE, meta, newline=False)


def hidden_size_of(backbone: nn.Module) -> int:
    config = backbone.config
    for key in ("hidden_size", "d_model", "dim"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"cannot find the hidden size in {type(config).__name__}")


_TOKENIZER_SETTINGS = (
    "do_lower_case", "strip_accents", "tokenize_chinese_chars", "do_basic_tokenize", "never_split",
    "add_prefix_space", "add_bos_token", "add_eos_token", "legacy", "padding_side", "truncation_side",
    "split_special_tokens",
)
"""Tokenizer init settings that change token ids (a fast tokenizer's backend JSON also records most of them)."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides a tokenizer's ids: the fast backend's full JSON (normalizer, e.g. lower-casing,
    pre-tokenizer, vocabulary, post-processor, added tokens) or a slow tokenizer's vocabulary, plus its class,
    special tokens and the init settings above. Paths are left out, so a copy of the folder gives the same value."""
    parts: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
        "settings": {k: _plain(tokenizer.init_kwargs.get(k)) for k in _TOKENIZER_SETTINGS
                     if k in getattr(tokenizer, "init_kwargs", {})},
        "padding_side": getattr(tokenizer, "padding_side", None),
        "truncation_side": getattr(tokenizer, "truncation_side", None),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # its truncation / padding state is set per call, not part of the tokenizer
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        parts["backend"] = hashlib.sha256(json.dumps(state, sort_keys=True).encode("utf-8")).hexdigest()
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        parts["vocab"] = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _plain(value: Any) -> Any:
    """A JSON-able form of a tokenizer setting (AddedToken and other objects as their string)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def tensor_bytes(tensor: Tensor) -> bytes:
    """Raw bytes of any dtype (bf16 and uint8-packed 4-bit included), on CPU."""
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise InputError(f"not an nvr embedder folder (missing {META_FILE})", path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON: {err.msg}", meta_path, err.lineno) from err
    if not isinstance(meta, dict) or meta.get("backbone") not in ("full", "adapter") or "config" not in meta:
        raise InputError("expected {format_version, backbone: full|adapter, config}", meta_path)
    return meta
