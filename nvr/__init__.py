"""nvr: NV-Retriever-style hard-negative mining and embedding training on PyTorch Lightning."""

from __future__ import annotations

__version__ = "0.1.0"
