"""Load any HF encoder or decoder as an embedding backbone (AutoModel), with the NV-Retriever switches.

- bidirectional decoders: ``config.is_causal = False`` set on the config *before* loading. In transformers 5 this
  is the supported switch (mask creation and SDPA both read it); a custom attention function is silently causal
  when the batch has padding, so we never patch attention.
- pad token = EOS when the tokenizer/model has none (decoders), so batches can be padded.
- optional bitsandbytes 4-bit (nf4) / 8-bit loading + ``prepare_model_for_kbit_training`` (QLoRA).
- optional LoRA (peft, FEATURE_EXTRACTION) and gradient checkpointing.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from nvr.modeling.config import EmbedderConfig, LoraSettings
from nvr.utils.errors import ConfigError
from nvr.utils.models import resolve_model_path

log = logging.getLogger(__name__)

MIN_TRANSFORMERS = (5, 2)
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Decoder (Llama/Mistral/Qwen) projection names -> BERT-family names, used when the defaults match nothing.
BERT_STYLE_TARGETS: dict[str, str] = {
    "q_proj": "query",
    "k_proj": "key",
    "v_proj": "value",
    "o_proj": "attention.output.dense",
}


def check_transformers_version() -> None:
    """Bidirectional loading relies on transformers 5 mask semantics; older versions would silently stay causal."""
    import transformers

    parts = transformers.__version__.split(".")
    version = (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0))
    if version < MIN_TRANSFORMERS:
        raise RuntimeError(
            f"nvr needs transformers >= {MIN_TRANSFORMERS[0]}.{MIN_TRANSFORMERS[1]} (found {transformers.__version__}):"
            " bidirectional decoders use config.is_causal, which older versions ignore"
        )


def load_tokenizer(cfg: EmbedderConfig, path: str | None = None):
    """The backbone's tokenizer, right padding, pad = EOS when missing."""
    from transformers import AutoTokenizer

    source = path or resolve_model_path(cfg.model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except OSError as err:  # a missing folder, or a hub id that is neither cached nor reachable (offline)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("embedder.model_name_or_path", f"cannot load {source!r}: {first}") from err
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ConfigError("embedder.model_name_or_path", "tokenizer has neither a PAD nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_hf_config(cfg: EmbedderConfig, path: str, pad_token_id: int | None):
    """AutoConfig with the attention direction and pad id fixed before the weights are built."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if cfg.bidirectional:
        hf_config.is_causal = False
    elif getattr(hf_config, "is_causal", True) is False and is_decoder_config(hf_config):
        hf_config.is_causal = True  # the folder was saved bidirectional but this config asks for causal
    if getattr(hf_config, "pad_token_id", None) is None and pad_token_id is not None:
        hf_config.pad_token_id = pad_token_id
    return hf_config


def is_decoder_config(hf_config) -> bool:
    """Decoder-only architectures (the ones whose attention is causal by default)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    encoder_types = {"bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2", "distilbert", "mpnet",
                     "modernbert", "nomic_bert", "new"}
    return hf_config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and hf_config.model_type not in encoder_types


def quantization_config(cfg: EmbedderConfig):
    """bitsandbytes settings: 4-bit NF4 with double quantization (QLoRA) or LLM.int8()."""
    if cfg.quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=TORCH_DTYPES[cfg.dtype],
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_backbone(cfg: EmbedderConfig, pad_token_id: int | None = None, path: str | None = None) -> nn.Module:
    """AutoModel (no head) with attention direction, dtype, quantization, LoRA and checkpointing applied."""
    from transformers import AutoModel

    check_transformers_version()
    path = path or resolve_model_path(cfg.model_name_or_path)
    hf_config = load_hf_config(cfg, path, pad_token_id)
    kwargs: dict[str, Any] = {
        "config": hf_config, "dtype": TORCH_DTYPES[cfg.dtype], "attn_implementation": cfg.attn_implementation,
        "trust_remote_code": cfg.trust_remote_code,
    }
    qconfig = quantization_config(cfg)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    model = AutoModel.from_pretrained(path, **kwargs)
    if qconfig is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def resolve_lora_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Keep the configured names if any module matches; else map decoder names to BERT-style ones."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]

    def matches(target: str) -> bool:
        return any(n == target or n.endswith(f".{target}") for n in names)

    if any(matches(t) for t in targets):
        return list(targets)
    mapped = [BERT_STYLE_TARGETS.get(t, t) for t in targets]
    if any(matches(t) for t in mapped):
        log.info("LoRA target_modules %s not found; using BERT-style names %s", targets, mapped)
        return mapped
    raise ConfigError(
        "embedder.lora.target_modules",
        f"none of {targets} (or {mapped}) names a Linear layer of {type(model).__name__}; e.g. {names[:6]}",
    )


def lora_config(model: nn.Module, settings: LoraSettings):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=resolve_lora_targets(model, settings.target_modules),
        modules_to_save=settings.modules_to_save, task_type=TaskType.FEATURE_EXTRACTION,
    )


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap with peft LoRA: base weights frozen, only adapters (and ``modules_to_save``) train."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, settings))


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a hard dependency
        return False
    return isinstance(model, PeftModel)


# position ids start after the padding index in these families (RoBERTa: 514 embeddings -> 512 usable)
PADDING_OFFSET_TYPES = {"roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "bart", "mbart"}


def position_limit(hf_config) -> int | None:
    """Longest input (in tokens) the model's absolute position embeddings cover; None when unbounded/unknown.

    Rotary models (Llama, Mistral, Qwen) report ``max_position_embeddings`` too: longer inputs run but degrade,
    so the same limit applies.
    """
    if hf_config is None:
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            if getattr(hf_config, "model_type", None) in PADDING_OFFSET_TYPES:
                value -= int(getattr(hf_config, "pad_token_id", None) or 0) + 1
            return value
    return None
