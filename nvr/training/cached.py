"""Cached (GradCache-style) InfoNCE: the batch of in-batch negatives is independent of activation memory.

1. Queries and passages are encoded in mini-batches *without* a graph (``torch.no_grad``); each mini-batch is
   padded to its own longest sequence and the RNG state before it is saved.
2. The loss and its gradient w.r.t. every embedding are computed over the full batch (other ranks' passages and
   the teacher false-negative mask included): the embeddings are leaves, so this costs one small graph.
3. Each mini-batch is encoded again *with* a graph from its saved RNG state (the same dropout masks, so the same
   embeddings) and back-propagated with its cached embedding gradient; parameter gradients add up to exactly the
   gradient of the loss over the embeddings of step 1.

Only one mini-batch's activations are alive at a time. The price is a second forward per mini-batch (about +1/3
compute). Dropout masks are drawn per mini-batch, so with dropout on they differ from one unchunked forward of the
whole field (as with any mini-batching); the gradient is exact for the embeddings actually used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

EncodeFn = Callable[[dict[str, Tensor]], Tensor]


@dataclass
class RngState:
    """The torch CPU generator and, where the embeddings live on CUDA, that device's generator (dropout there)."""

    cpu: Tensor
    cuda: Tensor | None = None
    device: torch.device | None = None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        if device.type == "cuda":
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device), device)
        return cls(torch.get_rng_state())

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def plan_mini_batches(lengths: Tensor, max_rows: int | None, max_tokens: int | None) -> list[Tensor]:
    """Row indices of each mini-batch: at most ``max_rows`` rows and ``rows x longest <= max_tokens`` padded tokens.

    When everything fits, one mini-batch keeps the rows in order (identical to the uncached forward). Otherwise rows
    go longest first, so each mini-batch is padded to a similar length; a row longer than the token budget gets a
    mini-batch of its own (sequences are never split).
    """
    sizes = [int(v) for v in lengths.tolist()]

    def fits(count: int, longest: int) -> bool:
        return (max_rows is None or count <= max_rows) and (max_tokens is None or count * longest <= max_tokens)

    if not sizes or fits(len(sizes), max(sizes)):
        return [torch.arange(len(sizes))]
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    chunks: list[list[int]] = [[]]
    for row in order:
        current = chunks[-1]
        if current and not fits(len(current) + 1, sizes[current[0]]):
            chunks.append([])
        chunks[-1].append(row)
    return [torch.as_tensor(rows, dtype=torch.long) for rows in chunks]


def take_rows(features: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """``rows`` of every ``[N, L]`` feature, trimmed to the longest of them (the tokenizer pads on the right)."""
    index = rows.to(features["attention_mask"].device)
    mask = features["attention_mask"].index_select(0, index)
    width = max(1, int(mask.sum(dim=1).max())) if mask.numel() else mask.shape[1]
    return {k: (v.index_select(0, index)[:, :width] if isinstance(v, Tensor) and v.dim() == 2 else v)
            for k, v in features.items()}


@dataclass
class MiniBatch:
    rows: Tensor
    features: dict[str, Tensor]
    rng: RngState


@dataclass
class CachedField:
    """One field (queries or flattened passages): its mini-batches and the graph-free embeddings ``[N, H]``."""

    mini_batches: list[MiniBatch]
    embeddings: Tensor


def encode_without_grad(encode: EncodeFn, features: dict[str, Tensor], max_rows: int | None,
                        max_tokens: int | None) -> CachedField:
    """Step 1: embeddings of every row in original order, mini-batch by mini-batch, remembering each RNG state."""
    mask = features["attention_mask"]
    plan = plan_mini_batches(mask.sum(dim=1).cpu(), max_rows, max_tokens)
    mini_batches, parts = [], []
    with torch.no_grad():
        for rows in plan:
            sub = take_rows(features, rows)
            state = RngState.capture(mask.device)
            parts.append(encode(sub))
            mini_batches.append(MiniBatch(rows, sub, state))
    embeddings = torch.cat(parts) if len(parts) > 1 else parts[0]
    if len(plan) > 1:
        order = torch.cat(plan).to(embeddings.device)
        embeddings = torch.empty_like(embeddings).index_copy_(0, order, embeddings)
    return CachedField(mini_batches, embeddings)


@dataclass
class PendingBackward:
    """What :meth:`BiEncoderModule.backward` needs after ``training_step``: the loss leaf returned to Lightning (its
    gradient is Lightning's loss scale: ``1 / accumulate_grad_batches``, an AMP scaler...) and each field with the
    gradient of the loss w.r.t. its embeddings."""

    loss_leaf: Tensor
    fields: list[tuple[CachedField, Tensor]] = field(default_factory=list)


def cached_backward(encode: EncodeFn, pending: PendingBackward, scale: Tensor, params: Sequence[nn.Parameter],
                    context: Callable[[], AbstractContextManager] = nullcontext, *, sharded: bool = False) -> None:
    """Step 3: re-encode each mini-batch from its saved RNG state and back-propagate its cached gradient.

    One device / DDP: every mini-batch but the last adds its parameter gradients with ``torch.autograd.grad``
    straight into ``.grad``, which does not fire DDP's gradient hooks; the last one is a normal ``backward``, so DDP
    all-reduces the accumulated total once, as ``no_sync`` gradient accumulation does. (A normal ``backward`` per
    mini-batch would all-reduce only the first one's gradients: DDP expects one backward per forward.)

    FSDP2 (``sharded``): ``params`` are DTensor shards that the forward does not use (it runs on all-gathered
    copies), so ``autograd.grad`` cannot reach them. Every mini-batch is a normal ``backward``: FSDP2 reduce-scatters
    its gradients and adds them to the sharded ``.grad``, as in its gradient accumulation. Gradient memory stays
    sharded (no unsharded accumulation buffers, unlike ``set_requires_gradient_sync(False)``), for one
    reduce-scatter per mini-batch next to the two all-gathers FSDP2 already runs to re-encode it.
    """
    items = [(mb, grad.index_select(0, mb.rows.to(grad.device))) for cached, grad in pending.fields
             for mb in cached.mini_batches]
    if not items:
        return
    after = RngState.capture(items[0][1].device)
    for position, (mb, grad) in enumerate(items):
        mb.rng.restore()
        with context():
            emb = encode(mb.features)
        upstream = (grad * scale).to(emb.dtype)
        if sharded or position == len(items) - 1:
            emb.backward(upstream)
        else:
            _accumulate(params, torch.autograd.grad(emb, params, upstream, allow_unused=True))
        del emb
    after.restore()


def _accumulate(params: Sequence[nn.Parameter], grads: Sequence[Tensor | None]) -> None:
    with torch.no_grad():
        for param, grad in zip(params, grads, strict=True):
            if grad is None:
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param, memory_format=torch.preserve_format)
            param.grad.add_(grad.to(param.grad.dtype))
