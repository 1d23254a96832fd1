"""``jit`` and ``tl`` for the mask predicates, so that importing the mask specs needs torch only.

Without Triton the predicates stay plain (never called) Python functions; the PyTorch reference does not use them.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # pragma: no cover - torch-only installs (no Triton wheel for the platform)
    tl = None  # type: ignore[assignment]

    def jit(fn):  # type: ignore[no-untyped-def]
        return fn
