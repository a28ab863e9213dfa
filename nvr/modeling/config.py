"""Typed embedder configuration: plain dataclasses that jsonargparse builds from YAML and ``nvr_embedder.json``.

``__post_init__`` rejects bad values with the dotted key, so a typo fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from nvr.utils.errors import ConfigError

PoolingMode = Literal["mean", "cls", "last_token", "latent_attention"]
DTypeName = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["4bit", "8bit"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2", "flex_attention"]

POOLING_MODES: tuple[str, ...] = ("mean", "cls", "last_token", "latent_attention")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


@dataclass
class LatentAttentionConfig:
    """NV-Embed latent-attention pooling head (used only when ``pooling == "latent_attention"``)."""

    num_latents: int = 512
    """Rows of the trainable latent array (keys = values)."""
    num_heads: int = 8
    head_dim: int | None = None
    """Per-head width; None = the backbone hidden size (as NV-Embed: 8 heads x 4096)."""
    mlp_mult: int = 4
    """GEGLU feed-forward inner width = mlp_mult x hidden."""

    def __post_init__(self) -> None:
        for key in ("num_latents", "num_heads", "mlp_mult"):
            if int(getattr(self, key)) <= 0:
                raise ConfigError(f"embedder.latent.{key}", f"must be > 0, got {getattr(self, key)}")
        if self.head_dim is not None and self.head_dim <= 0:
            raise ConfigError("embedder.latent.head_dim", f"must be > 0 or null, got {self.head_dim}")


@dataclass
class LoraSettings:
    """LoRA adapters (peft). Decoder-style names are mapped to BERT-style ones when the model has no match."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    modules_to_save: list[str] | None = None
    """Backbone modules trained fully and saved with the adapter (e.g. an embedding layer)."""

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ConfigError("embedder.lora.r", f"must be > 0, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError("embedder.lora.alpha", f"must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("embedder.lora.dropout", f"must be in [0, 1), got {self.dropout}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ConfigError("embedder.lora.target_modules", "must be a non-empty list of module names")


@dataclass
class EmbedderConfig:
    """Everything needed to rebuild the same embedder: backbone, attention, pooling, LoRA, quantization."""

    model_name_or_path: str
    """HF hub id or local folder (resolved through nvr.utils.models.resolve_model_path)."""
    pooling: PoolingMode = "mean"
    normalize: bool = True
    """L2-normalize embeddings (cosine similarity = inner product)."""
    bidirectional: bool = False
    """Decoders only: load with ``config.is_causal = False`` (NV-Retriever / NV-Embed)."""
    attn_implementation: AttnImplementation = "sdpa"
    dtype: DTypeName = "float32"
    latent: LatentAttentionConfig = field(default_factory=LatentAttentionConfig)
    lora: LoraSettings | None = None
    quantization: Quantization | None = None
    """bitsandbytes 4-bit (nf4) or 8-bit loading of the backbone (QLoRA when combined with ``lora``)."""
    gradient_checkpointing: bool = False
    add_eos: bool = False
    """Append the EOS id to every sequence (e5-mistral style, for last-token pooling)."""
    max_length: int = 512
    """Default token budget for ``encode_texts`` callers that do not pass one."""
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model_name_or_path, str) or not self.model_name_or_path.strip():
            raise ConfigError("embedder.model_name_or_path", "must be a non-empty HF id or folder")
        _check_choice("embedder.pooling", self.pooling, POOLING_MODES)
        _check_choice("embedder.dtype", self.dtype, DTYPES)
        if self.quantization is not None:
            _check_choice("embedder.quantization", self.quantization, ("4bit", "8bit"))
        if self.max_length <= 0:
            raise ConfigError("embedder.max_length", f"must be > 0, got {self.max_length}")
        if isinstance(self.latent, dict):
            self.latent = LatentAttentionConfig(**self.latent)
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], key: str = "embedder") -> EmbedderConfig:
        """Rebuild from ``to_dict`` output (or a YAML mapping); unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", f"unknown key (expected one of {sorted(known)})")
        return cls(**data)


def as_embedder_config(value: Any, key: str = "embedder") -> EmbedderConfig:
    """Accept an EmbedderConfig, a dict, or a jsonargparse Namespace (as stored in checkpoint hyper_parameters)."""
    if isinstance(value, EmbedderConfig):
        return value
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return EmbedderConfig.from_dict(dict(value), key)
    raise ConfigError(key, f"expected an embedder config mapping, got {type(value).__name__}")


def _check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, f"must be one of {list(choices)}, got {value!r}")
