"""Small helpers shared by the kernel modules (one definition each)."""

from __future__ import annotations

import os
from typing import Any

import torch


def _interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cdiv(a: int, b: int) -> int:
    """Ceiling division of Python integers (no Triton constexpr wrapper on the host path)."""
    return -(-a // b)


def _next_pow2(x: int) -> int:
    """Smallest power of two >= ``x`` (1 for ``x <= 1``)."""
    return 1 << (x - 1).bit_length() if x > 1 else 1


def _is_int(x: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(x, int) and not isinstance(x, bool)


def _describe(t: Any) -> str:
    """What a bad argument was, for error messages: dtype, shape and device of a tensor, else its type."""
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
    return repr(type(t).__name__)
