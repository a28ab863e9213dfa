"""Tokenize texts with an optional instruction prefix and build the pooling mask.

``pool_mask`` is the attention mask with, when ``mask_prefix``, the leading special token (BOS/[CLS]) and the
prefix tokens zeroed: the instruction still shapes the other tokens through attention but is not averaged
(NV-Embed / NV-Retriever). The span is measured exactly as sentence-transformers measures a prompt for
``include_prompt=False`` (the prefix tokenized alone, trailing space included, minus one trailing special token),
so an exported model gives the same embeddings in ST. On sentencepiece/Metaspace tokenizers a prefix ending in a
space tokenizes with a lone "▁" piece, so the span also covers the first text token (as in ST and NV-Embed).
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
    """The prompt as sentence-transformers measures it: ``prefix`` tokenized alone with special tokens, minus one
    trailing special token (``[SEP]``/EOS). Its length is the masked span of every ``prefix + text`` row."""
    ids = list(tokenizer(prefix, add_special_tokens=True)["input_ids"])
    if ids and ids[-1] in set(tokenizer.all_special_ids):
        ids = ids[:-1]
    return ids


def prefix_room(tokenizer, prefix: str, max_length: int, add_eos: bool = False) -> int:
    """How many text tokens a long text keeps for pooling after ``prefix`` within ``max_length`` (special tokens and
    the prefix span measured as :func:`tokenize` masks it). 0 means the prefix alone fills the budget."""
    probe = " ".join(["a"] * max_length)
    features = tokenize(tokenizer, [probe], max_length, prefix=prefix, mask_prefix=True, add_eos=add_eos)
    special = set(tokenizer.all_special_ids)
    pooled = features["input_ids"][0][features["pool_mask"][0].bool()].tolist()
    return sum(1 for t in pooled if t not in special)


def check_prefix_fits(tokenizer, prefix: str, max_length: int, add_eos: bool, key: str, length_key: str) -> None:
    """A ``ConfigError`` naming ``key`` when ``prefix`` (an instruction) leaves no text token within
    ``max_length``: truncation cuts the end of ``prefix + text``, so the text would vanish and the embedding would
    pool only special tokens. The prefix is never truncated (a cut instruction is another instruction)."""
    if not prefix or prefix_room(tokenizer, prefix, max_length, add_eos) > 0:
        return
    used = len(tokenizer(prefix, add_special_tokens=True)["input_ids"]) + (1 if add_eos else 0)
    shown = prefix if len(prefix) <= 60 else f"{prefix[:57]}..."
    raise ConfigError(key, f"the instruction {shown!r} takes {used} tokens with the special tokens, leaving no room "
                           f"for the text within {length_key}={max_length}; shorten it or raise {length_key}")


def _pad_right(encoded: list[list[int]], pad_id: int, prefix_ids: list[int]) -> dict[str, Tensor]:
    width = max((len(ids) for ids in encoded), default=0)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    pool_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        pool_mask[row, min(len(prefix_ids), len(ids)) : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pool_mask": pool_mask}


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
