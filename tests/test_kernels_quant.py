"""INT8 quantization helpers and the INT8 attention paths (Q·K int8, optional P·V int8)."""

from __future__ import annotations

import pytest
import torch

from diffaccel.kernels import NeighborhoodMask, SparseBlockMask, TextSpec, block_sparse_attention, quantize_per_block
from diffaccel.kernels.reference import (
    block_sparse_attention_reference,
    quantize_per_block_reference,
    quantize_per_channel_reference,
)
from kernel_helpers import DEVICE, bias, ratio_bias, rel_err, run

def outlier_qkv(b, h, n, d, dtype=torch.float32):
    """Random normal Q, K, V with a few large-offset channels in K (the case K smoothing is for)."""
    q, k, v = (torch.randn(b, h, n, d, device=DEVICE, dtype=dtype) for _ in range(3))
    k[..., : max(1, d // 8)] += 10.0
    return q, k, v


@pytest.mark.parametrize("n,d,block", [(70, 32, 32), (33, 24, 16), (16, 16, 16)])
@pytest.mark.parametrize("with_mean", [False, True])
def test_triton_quant_matches_reference(n, d, block, with_mean):
    x = torch.randn(2, 3, n, d, device=DEVICE) * 3
    mean = x.float().mean(2) if with_mean else None
    q8, s = quantize_per_block(x, block, mean=mean, premultiply=0.25)
    r8, rs = quantize_per_block_reference(x, block, mean=mean, premultiply=0.25)
    assert q8.dtype == torch.int8 and q8.shape == x.shape and s.shape == (2, 3, -(-n // block))
    assert torch.allclose(s, rs, rtol=1e-6)
    diff = (q8.int() - r8.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # rounding ties may differ by one
    # Dequantized values are within half a step of the (mean-subtracted) input.
    xs = x - mean.unsqueeze(2) if with_mean else x
    step = (rs / 0.25).repeat_interleave(block, -1)[..., :n, None]
    assert ((r8.float() * step - xs).abs() <= step * 0.5 + 1e-6).all()


def test_quantize_zero_block_and_bad_arguments():
    x = torch.zeros(1, 1, 20, 16, device=DEVICE)
    q8, s = quantize_per_block(x, 16)
    assert (q8 == 0).all() and (s == 1).all()
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        quantize_per_block(x, 24)
    with pytest.raises(ValueError, match="x must be"):
        quantize_per_block(x[0], 16)


def test_per_channel_quant_reference():
    v = torch.randn(2, 2, 50, 16) * torch.linspace(0.1, 10, 16)
    v8, s = quantize_per_channel_reference(v)
    assert s.shape == (2, 2, 16)
    assert ((v8.float() * s.unsqueeze(2) - v).abs() <= s.unsqueeze(2) * 0.5 + 1e-6).all()
    assert (v8.abs().amax(2) == 127).all()


def test_k_smoothing_is_exact_under_softmax():
    q, k, v = outlier_qkv(1, 2, 48, 16)
    bm = SparseBlockMask.from_spec(NeighborhoodMask((6, 8), 3), 16)
    km = k.mean(2, keepdim=True)
    a = block_sparse_attention_reference(q.double().float(), k, v, bm)
    b = block_sparse_attention_reference(q, k - km, v, bm)
    assert rel_err(a, b) < 1e-5


SPEC = NeighborhoodMask((8, 9), (4, 5), (2, 1), text=TextSpec(8, "prefix"))


@pytest.mark.parametrize("pv_int8", [False, True])
def test_int8_kernel_error_bound_versus_fp32(pv_int8):
    bm = SparseBlockMask.from_spec(SPEC, 32, 16, device=DEVICE)
    q, k, v = outlier_qkv(1, 2, SPEC.num_tokens, 32)
    exact, exact_lse = block_sparse_attention_reference(q, k, v, bm, return_lse=True)
    out, lse = block_sparse_attention(q, k, v, bm, qk_int8=True, pv_int8=pv_int8, return_lse=True)
    # INT8 Q·K: <= 2e-2. INT8 P (fixed scale 127, PARO) adds a few 1e-3 on flat random-input attention maps.
    assert rel_err(out, exact) <= (4e-2 if pv_int8 else 2e-2)
    # The log-sum-exp is the unsmoothed one (the smoothing shift is added back).
    assert torch.allclose(lse, exact_lse, atol=3e-2)


def test_int8_kernel_matches_int8_reference():
    bm = SparseBlockMask.from_spec(SPEC, 16, 32, device=DEVICE)
    q, k, v = outlier_qkv(2, 1, SPEC.num_tokens, 16)
    out = torch.full_like(q, float("nan"))
    block_sparse_attention(q, k, v, bm, qk_int8=True, out=out)
    sim = block_sparse_attention_reference(q, k, v, bm, qk_int8=True)
    assert rel_err(out, sim) < 1e-3  # same quantized operands; only float rounding (and rare ties) differ
    # INT8 P·V: the reference quantizes P against the final row max, the kernel against the running one.
    out8 = block_sparse_attention(q, k, v, bm, qk_int8=True, pv_int8=True)
    sim8 = block_sparse_attention_reference(q, k, v, bm, qk_int8=True, pv_int8=True)
    assert rel_err(out8, sim8) < 1.5e-2


def test_int8_half_precision_inputs():
    bm = SparseBlockMask.from_spec(SPEC, 32, device=DEVICE)
    q, k, v = outlier_qkv(1, 1, SPEC.num_tokens, 32, torch.float16)
    out = block_sparse_attention(q, k, v, bm, qk_int8=True)
    assert out.dtype == torch.float16
    assert rel_err(out, block_sparse_attention_reference(q.float(), k.float(), v.float(), bm)) <= 2e-2


@pytest.mark.parametrize("pv_int8", [False, True])
def test_int8_paths_are_unbiased(pv_int8):
    """A biased quantized output (e.g. a scale off by one step, a dropped rounding offset) can stay inside the
    relative-L2 bounds above; the mean signed error and the least-squares slope of out against the exact result
    cannot hide it. Many rows so the random part averages out."""
    spec = NeighborhoodMask((12, 12), (5, 5), text=TextSpec(16, "prefix"))
    bm = SparseBlockMask.from_spec(spec, 32, 16, device=DEVICE)
    q, k, v = outlier_qkv(1, 2, spec.num_tokens, 32)
    v = v + 1.0  # a non-zero mean output, so that a scale error shows in the mean
    exact = block_sparse_attention_reference(q, k, v, bm)
    out = run(q, k, v, bm, qk_int8=True, pv_int8=pv_int8)
    # Measured (interpreter, seed 0): bias 8.8e-5 / 5.5e-5 and slope 1.00008 / 1.00005 (qk / qk+pv).
    assert abs(bias(out, exact)) < 2e-3
    assert abs(ratio_bias(out, exact) - 1) < 2e-3
