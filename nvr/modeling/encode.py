"""Batch-encode texts with an Embedder: length-sorted batches (little padding), original order restored."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from nvr.modeling.embedder import Embedder
from nvr.utils.errors import ConfigError
from nvr.utils.precision import Precision, autocast


def encode_texts(
    embedder: Embedder,
    texts: Sequence[str],
    *,
    prefix: str = "",
    max_length: int = 512,
    batch_size: int = 32,
    mask_prefix: bool = False,
    device: str | torch.device | None = None,
    desc: str | None = None,
    show_progress: bool = True,
    precision: Precision | None = None,
    max_tokens_per_batch: int | None = None,
) -> np.ndarray:
    """Embeddings ``[N, H]`` float32 in the order of ``texts``.

    Texts are processed longest first (by token count after truncation) so each batch pads to similar lengths and
    an out-of-memory error shows up in the first batch, not after an hour. A batch holds at most ``batch_size``
    texts and, when ``max_tokens_per_batch`` is set, at most that many padded tokens (a long-tailed corpus then
    runs few long texts per batch and many short ones); how texts are cut into batches never changes their
    embeddings beyond float rounding. ``precision`` with an autocast dtype runs the forward under
    ``torch.autocast`` (embeddings are returned in fp32). The embedder's train/eval mode is restored afterwards,
    so this is safe to call from a validation hook. ``device`` moves the embedder.
    """
    if batch_size <= 0:
        raise ConfigError("batch_size", f"must be > 0, got {batch_size}")
    if max_tokens_per_batch is not None and max_tokens_per_batch <= 0:
        raise ConfigError("max_tokens_per_batch", f"must be > 0 or unset, got {max_tokens_per_batch}")
    texts = list(texts)
    if device is not None and torch.device(device) != embedder.device:
        embedder.to(device)  # teachers pass device="cuda" once; the model then stays there
    device = embedder.device
    out = np.zeros((len(texts), embedder.hidden_size), dtype=np.float32)
    was_training = embedder.training
    embedder.eval()
    try:
        lengths = token_lengths(embedder, texts, prefix, max_length)
        with torch.inference_mode(), autocast(precision, device), \
                tqdm(total=len(texts), desc=desc, unit="text", disable=not show_progress) as bar:
            for idx in budget_batches(lengths, batch_size, max_tokens_per_batch):
                batch = embedder.tokenize([texts[i] for i in idx], max_length, prefix=prefix, mask_prefix=mask_prefix)
                batch = {k: v.to(device) for k, v in batch.items()}
                emb = embedder(batch["input_ids"], batch["attention_mask"], batch["pool_mask"])
                out[idx] = emb.to(torch.float32).cpu().numpy()
                bar.update(len(idx))
    finally:
        embedder.train(was_training)
    return out


def token_lengths(embedder: Embedder, texts: Sequence[str], prefix: str, max_length: int,
                  chunk: int = 2048) -> list[int]:
    """Tokens of every ``prefix + text`` after truncation (special tokens and EOS included): what its row costs."""
    lengths: list[int] = []
    for start in range(0, len(texts), chunk):
        enc = embedder.tokenize(list(texts[start : start + chunk]), max_length, prefix=prefix)
        lengths.extend(enc["attention_mask"].sum(dim=1).tolist())
    return lengths


def budget_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> Iterator[list[int]]:
    """Positions in batches, longest first (ties in input order): at most ``batch_size`` rows and, when
    ``max_tokens`` is set, at most ``max_tokens`` padded tokens (rows x longest row) per batch; a single row
    longer than the budget still gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        width = lengths[batch[0]] if batch else lengths[i]  # descending: the first row is the widest
        if batch and (len(batch) >= batch_size or (max_tokens is not None and (len(batch) + 1) * width > max_tokens)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch
