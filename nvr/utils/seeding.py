"""Order-independent randomness: every random choice derives from (seed, key), never from call order."""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(seed: int, *keys: object) -> int:
    """A 64-bit seed from a base seed and any keys (e.g. a query id); stable across processes and platforms."""
    h = hashlib.sha256(repr((int(seed), *[str(k) for k in keys])).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little")


def rng_for(seed: int, *keys: object) -> np.random.Generator:
    """A numpy Generator for one unit of work (one query, one epoch...), independent of processing order."""
    return np.random.Generator(np.random.PCG64(derive_seed(seed, *keys)))
