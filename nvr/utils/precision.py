"""Which precision to encode in: ``dtype: auto`` = bf16 autocast where the hardware runs bf16 fast, else fp32.

bf16 is fast on CUDA devices with native bf16 (``torch.cuda.is_bf16_supported()``) and on CPUs with the
``avx512_bf16`` or ``amx_bf16`` instructions (read from ``/proc/cpuinfo``; torch's ``get_cpu_capability()`` reports
only "AVX512", which does not say whether bf16 dot products exist). Elsewhere bf16 is emulated and slower than
fp32, so ``auto`` resolves to fp32 there.

``auto`` keeps the weights as loaded (fp32) and runs the forward under :func:`torch.autocast` (matmuls in bf16,
reductions and the pooled output in fp32), unlike an explicit ``bfloat16``, which loads the weights in bf16. The two
compute different numbers, so they have different labels in cache keys (:attr:`Precision.label`); an explicit
``float32`` and an ``auto`` that resolves to fp32 compute the same thing and share one label.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nvr.utils.errors import ConfigError

DTYPE_CHOICES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
CPU_BF16_FLAGS: frozenset[str] = frozenset({"avx512_bf16", "amx_bf16"})
"""``/proc/cpuinfo`` flags of native bf16 arithmetic (AVX512-BF16 dot products, AMX tiles)."""
AUTOCAST_BF16 = "autocast-bfloat16"
"""Label of fp32 weights run under bf16 autocast (what ``auto`` resolves to on bf16 hardware)."""


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor listed in ``cpuinfo`` (empty when unreadable, e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.lru_cache(maxsize=8)
def cpu_supports_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU has native bf16 instructions (``avx512_bf16`` or ``amx_bf16``)."""
    return bool(cpu_flags(cpuinfo) & CPU_BF16_FLAGS)


def device_type(device: object) -> str:
    """``"cuda"`` / ``"cpu"`` / ``"mps"``... of a device string or ``torch.device`` (``"cuda:1"`` -> ``"cuda"``)."""
    text = str(getattr(device, "type", device) or "cpu")
    return text.split(":", 1)[0]


def bf16_supported(device: object = "cpu") -> bool:
    """Does ``device`` run bf16 natively (fast)? CUDA: ``torch.cuda.is_bf16_supported()``; CPU: the cpuinfo flags.

    Other device types (mps, xpu...) are treated as unsupported, so ``auto`` stays fp32 there.
    """
    kind = device_type(device)
    if kind == "cpu":
        return cpu_supports_bf16()
    if kind == "cuda":
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return False


def resolve_dtype(dtype: str, device: object = "cpu") -> str:
    """The dtype name computed in: ``auto`` -> ``"bfloat16"`` where :func:`bf16_supported`, else ``"float32"``;
    explicit names are returned unchanged."""
    if dtype not in DTYPE_CHOICES:
        raise ConfigError("dtype", f"must be one of {list(DTYPE_CHOICES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    return "bfloat16" if bf16_supported(device) else "float32"


@dataclass(frozen=True)
class Precision:
    """How one encoder runs: the dtype its weights are loaded in, and the autocast dtype of its forward (if any)."""

    weights: str
    """``float32`` / ``bfloat16`` / ``float16``: passed to the model loader."""
    autocast: str | None = None
    """``bfloat16`` when the forward runs under autocast (``dtype: auto`` on bf16 hardware), else None."""

    @property
    def label(self) -> str:
        """The resolved dtype as recorded in cache keys and manifests (``float32``, ``bfloat16``, ``float16`` or
        ``autocast-bfloat16``); an explicit ``float32`` and ``auto`` resolved to fp32 share ``float32``."""
        return AUTOCAST_BF16 if self.autocast == "bfloat16" else self.weights


def resolve_precision(dtype: str, device: object = "cpu") -> Precision:
    """``auto`` -> fp32 weights under bf16 autocast where bf16 is native, plain fp32 elsewhere; an explicit dtype
    loads the weights in that dtype (no autocast), exactly as before ``auto`` existed."""
    if dtype == "auto":
        return Precision("float32", "bfloat16" if resolve_dtype("auto", device) == "bfloat16" else None)
    return Precision(resolve_dtype(dtype, device))


def precision_from_label(label: str) -> Precision:
    """Inverse of :attr:`Precision.label` (e.g. to rebuild an encoder from a recorded manifest)."""
    if label == AUTOCAST_BF16:
        return Precision("float32", "bfloat16")
    return Precision(resolve_dtype(label))


@contextlib.contextmanager
def autocast(precision: Precision | str | None, device: object = "cpu") -> Iterator[None]:
    """``torch.autocast`` for a precision with an autocast dtype (or the dtype name ``"bfloat16"``); a no-op
    otherwise, so fp32 runs stay bit-identical to code without this context."""
    dtype = precision.autocast if isinstance(precision, Precision) else precision
    if dtype in (None, "float32"):
        yield
        return
    import torch

    with torch.autocast(device_type=device_type(device), dtype=getattr(torch, dtype)):
        yield
