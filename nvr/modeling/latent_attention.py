"""NV-Embed latent-attention pooling (clean-room implementation from the paper and its published shapes).

Each token's hidden state is a *query* that cross-attends to a trainable latent array (keys = values), followed by
a GEGLU feed-forward block, both PreNorm with residuals, then a masked mean over ``pool_mask``. Tokens never attend
to each other here, so padded or instruction tokens cannot leak into the pooled vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nvr.modeling.config import LatentAttentionConfig
from nvr.modeling.pooling import masked_mean
from nvr.utils.seeding import derive_seed


class GEGLU(nn.Module):
    """``x * gelu(gate)`` over the two halves of the last dimension."""

    def forward(self, x: Tensor) -> Tensor:
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)


class LatentCrossAttention(nn.Module):
    """Multi-head attention from token queries to latent keys/values (no mask needed: latents are never padding)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.to_q = nn.Linear(hidden_size, inner, bias=False)
        self.to_kv = nn.Linear(hidden_size, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, hidden_size, bias=False)

    def forward(self, tokens: Tensor, latents: Tensor) -> Tensor:
        batch, length, _ = tokens.shape
        q = self.to_q(tokens).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(latents).chunk(2, dim=-1)
        k = k.view(1, -1, self.num_heads, self.head_dim).transpose(1, 2).expand(batch, -1, -1, -1)
        v = v.view(1, -1, self.num_heads, self.head_dim).transpose(1, 2).expand(batch, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim)
        return self.to_out(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


class LatentAttentionPooling(nn.Module):
    """Latent attention block + masked mean: ``forward(hidden, attention_mask, pool_mask) -> [B, H]``."""

    def __init__(self, hidden_size: int, cfg: LatentAttentionConfig, seed: int = 0) -> None:
        super().__init__()
        head_dim = cfg.head_dim or hidden_size
        self.latents = nn.Parameter(torch.empty(cfg.num_latents, hidden_size))
        self.norm_hidden = nn.LayerNorm(hidden_size)
        self.norm_latents = nn.LayerNorm(hidden_size)
        self.cross_attention = LatentCrossAttention(hidden_size, cfg.num_heads, head_dim)
        self.norm_ff = nn.LayerNorm(hidden_size)
        inner = cfg.mlp_mult * hidden_size
        self.ff = nn.Sequential(nn.Linear(hidden_size, 2 * inner), GEGLU(), nn.Linear(inner, hidden_size))
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Deterministic init from ``seed`` alone (independent of the global torch RNG and of call order)."""
        gen = torch.Generator().manual_seed(derive_seed(seed, "latent_attention") % 2**63)
        hidden = self.latents.size(1)
        self.latents.copy_(torch.randn(self.latents.shape, generator=gen) * hidden**-0.5)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                bound = module.in_features**-0.5
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) * 2 * bound - bound)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def transform(self, hidden: Tensor) -> Tensor:
        """The per-token part: ``h + xattn(LN(h), LN(latents))`` then ``h + ff(LN(h))``."""
        hidden = hidden.to(self.latents.dtype)
        latents = self.norm_latents(self.latents)
        hidden = hidden + self.cross_attention(self.norm_hidden(hidden), latents)
        return hidden + self.ff(self.norm_ff(hidden))

    def forward(self, hidden: Tensor, attention_mask: Tensor, pool_mask: Tensor) -> Tensor:
        return masked_mean(self.transform(hidden), pool_mask)
