"""Token-to-sequence pooling: small pure functions plus thin modules so the Embedder can swap heads.

Index-based poolers (cls, last_token) look at the attention mask so they are correct for left and right padding;
mean pooling uses ``pool_mask`` (padding AND instruction tokens excluded, as NV-Embed / NV-Retriever).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def masked_mean(hidden: Tensor, pool_mask: Tensor) -> Tensor:
    """Mean of ``hidden[B, L, H]`` over positions where ``pool_mask[B, L]`` is 1, accumulated in float32.

    A row whose mask is all zero (e.g. a text consisting only of the instruction) yields a zero vector rather
    than NaN.
    """
    mask = pool_mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1.0)
    return summed / counts


def first_token(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Hidden state of the first non-pad token ([CLS] under right padding; also correct under left padding)."""
    first = attention_mask.to(torch.int64).argmax(dim=1)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), first].to(torch.float32)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Position of the last non-pad token of each row, for left or right padding."""
    length = attention_mask.size(1)
    from_end = attention_mask.to(torch.int64).flip(dims=[1]).argmax(dim=1)
    return length - 1 - from_end


def last_token(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Hidden state of the last non-pad token (the appended EOS with ``add_eos``, as e5-mistral)."""
    idx = last_token_index(attention_mask)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), idx].to(torch.float32)


class MeanPooling(nn.Module):
    def forward(self, hidden: Tensor, attention_mask: Tensor, pool_mask: Tensor) -> Tensor:
        return masked_mean(hidden, pool_mask)


class ClsPooling(nn.Module):
    def forward(self, hidden: Tensor, attention_mask: Tensor, pool_mask: Tensor) -> Tensor:
        return first_token(hidden, attention_mask)


class LastTokenPooling(nn.Module):
    def forward(self, hidden: Tensor, attention_mask: Tensor, pool_mask: Tensor) -> Tensor:
        return last_token(hidden, attention_mask)
