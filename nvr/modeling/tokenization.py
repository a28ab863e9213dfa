"""Tokenize texts with an optional instruction prefix and build the pooling mask.

``pool_mask`` is the attention mask with, when ``mask_prefix``, the leading special token (BOS/[CLS]) and the
prefix tokens zeroed: the instruction still shapes the other tokens through attention but is not averaged
(NV-Embed / NV-Retriever). This is the same span sentence-transformers excludes with ``include_prompt=False``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nvr.utils.errors import ConfigError


def tokenize(
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    prefix: str = "",
    mask_prefix: bool = False,
    add_eos: bool = False,
) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``pool_mask`` (int64, shape [B, L]) for ``prefix + text``.

    With ``add_eos`` the EOS id is appended after truncation (so it is never cut off), as e5-mistral does for
    last-token pooling.
    """
    if max_length <= (1 if add_eos else 0):
        raise ConfigError("max_length", f"must leave room for at least one token, got {max_length}")
    if isinstance(texts, str):
        raise TypeError("tokenize() expects a sequence of texts, not a single string")
    budget = max_length - 1 if add_eos else max_length
    encoded = tokenizer(
        [f"{prefix}{t}" for t in texts], add_special_tokens=True, truncation=True, max_length=budget,
        padding=False, return_attention_mask=False,
    )["input_ids"]
    if add_eos:
        eos = _eos_id(tokenizer)
        encoded = [ids if ids and ids[-1] == eos else [*ids, eos] for ids in encoded]
    prefix_ids = prefix_token_ids(tokenizer, prefix) if (prefix and mask_prefix) else []
    return _pad_right(encoded, _pad_id(tokenizer), prefix_ids)


def prefix_token_ids(tokenizer, prefix: str) -> list[int]:
    """Ids that a ``prefix + text`` encoding starts with: leading specials + prefix tokens, trailing specials cut.

    Trailing whitespace is stripped before tokenizing because whitespace-aware tokenizers (sentencepiece, BPE)
    attach the separating space to the first text token.
    """
    ids = list(tokenizer(prefix.rstrip(), add_special_tokens=True)["input_ids"])
    special = set(tokenizer.all_special_ids)
    lead = 0
    while lead < len(ids) and ids[lead] in special:
        lead += 1
    end = len(ids)
    while end > lead and ids[end - 1] in special:
        end -= 1
    return ids[:end]


def _pad_right(encoded: list[list[int]], pad_id: int, prefix_ids: list[int]) -> dict[str, Tensor]:
    width = max((len(ids) for ids in encoded), default=0)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    pool_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        pool_mask[row, _common_prefix_len(ids, prefix_ids) : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pool_mask": pool_mask}


def _common_prefix_len(ids: list[int], prefix_ids: list[int]) -> int:
    """How many leading ids equal the prefix encoding (robust to a tokenizer merging across the boundary)."""
    n = 0
    for a, b in zip(ids, prefix_ids):
        if a != b:
            break
        n += 1
    return n


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ConfigError("embedder.model_name_or_path", f"tokenizer {type(tokenizer).__name__} has no PAD or EOS token")


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError("embedder.add_eos", f"tokenizer {type(tokenizer).__name__} has no EOS token")
    return int(tokenizer.eos_token_id)
