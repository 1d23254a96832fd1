"""Helpers shared by the kernel test files (tests/test_kernels_*.py): inputs, error measures, the poisoned run.

Not a conftest: only the kernel tests import it (``from kernel_helpers import ...``; pytest puts tests/ on the path).
"""

from __future__ import annotations

import torch

from diffaccel.kernels import block_sparse_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ``||a - b|| / ||b||`` in float64; a NaN in ``a`` fails (never passes silently)."""
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any(), "NaN in output"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def qkv(b, h, lq, lk, d, dtype=torch.float32, device=DEVICE):  # noqa: ANN001, ANN201
    """Random normal q ``(b, h, lq, d)``, k and v ``(b, h, lk, d)``."""
    return (
        torch.randn(b, h, lq, d, dtype=dtype, device=device),
        torch.randn(b, h, lk, d, dtype=dtype, device=device),
        torch.randn(b, h, lk, d, dtype=dtype, device=device),
    )


def run(q, k, v, bm, **kw):  # noqa: ANN001, ANN003, ANN201
    """The Triton kernel writing into a NaN-poisoned ``out``: any element it does not write fails the comparison.

    ``dense_fast_path`` defaults to False here: these tests are about the kernel, not about the SDPA shortcut.
    """
    kw.setdefault("dense_fast_path", False)
    out = torch.full_like(q, float("nan"))
    res = block_sparse_attention(q, k, v, bm, out=out, **kw)
    if kw.get("return_lse"):
        assert res[0] is out
    else:
        assert res is out
    return res


def bias(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean signed error relative to the mean magnitude of the reference: ~0 for an unbiased approximation.

    A rescaled output (e.g. a wrong quantization scale, a dropped rounding offset) moves this, while a relative
    L2 bound loose enough for INT8 noise may not notice it.
    """
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output"
    return float((out - ref).mean() / ref.abs().mean())


def ratio_bias(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean of ``out / ref`` over positive reference values (``(out / ref)`` ~1 for an unbiased approximation),
    as a least-squares slope ``<out, ref> / <ref, ref>``: robust to reference entries near zero."""
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output"
    return float((out * ref).sum() / (ref * ref).sum())
