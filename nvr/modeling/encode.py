"""Batch-encode texts with an Embedder: length-sorted batches (little padding), original order restored."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from nvr.modeling.embedder import Embedder
from nvr.utils.errors import ConfigError


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
) -> np.ndarray:
    """Embeddings ``[N, H]`` float32 in the order of ``texts``.

    Texts are processed longest first (by characters, a cheap proxy for tokens) so each batch pads to similar
    lengths and an out-of-memory error shows up in the first batch, not after an hour. The embedder's train/eval
    mode is restored afterwards, so this is safe to call from a validation hook. ``device`` moves the embedder.
    """
    if batch_size <= 0:
        raise ConfigError("batch_size", f"must be > 0, got {batch_size}")
    texts = list(texts)
    if device is not None and torch.device(device) != embedder.device:
        embedder.to(device)  # teachers pass device="cuda" once; the model then stays there
    device = embedder.device
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = np.zeros((len(texts), embedder.hidden_size), dtype=np.float32)
    was_training = embedder.training
    embedder.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(texts), desc=desc, unit="text", disable=not show_progress) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = embedder.tokenize([texts[i] for i in idx], max_length, prefix=prefix, mask_prefix=mask_prefix)
                batch = {k: v.to(device) for k, v in batch.items()}
                emb = embedder(batch["input_ids"], batch["attention_mask"], batch["pool_mask"])
                out[idx] = emb.to(torch.float32).cpu().numpy()
                bar.update(len(idx))
    finally:
        embedder.train(was_training)
    return out
