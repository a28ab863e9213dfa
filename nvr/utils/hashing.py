"""Content fingerprints for caches and manifests."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any


def sha256_json(obj: Any) -> str:
    """Fingerprint of a JSON-able object (sorted keys, so dict order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def sha256_texts(texts: Iterable[str]) -> str:
    """Fingerprint of an ordered list of texts (length-prefixed, so boundaries are unambiguous)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()
