"""INT8 quantization for the attention kernel: per-block Q/K scales with K smoothing, per-channel V scales.

Scheme (SageAttention, arXiv 2410.02367; PARO, arXiv 2506.16054):

* K is smoothed by subtracting its per-channel mean over tokens. Every logit of a query row moves by the same
  ``q · mean(k)``, which softmax ignores, and K's outlier channels stop dominating its quantization scale.
* Q and K are quantized symmetrically to INT8 per block of tokens, one float32 scale ``absmax / 127`` per
  (batch, head, block); the softmax scale times log2(e) is folded into Q's scale so the kernel uses ``exp2``.
* V (optional INT8 P·V) is quantized per channel over all tokens; P gets the fixed scale 127 inside the kernel.

Per-block quantization is one fused Triton pass (read the block, subtract the mean, absmax, round, write int8 and
the scale), so Q and K are read once and their INT8 copies written once. The K mean and the V per-channel scales
need a reduction over all tokens first; those use torch (one reduction each, memory bound and small next to
attention). The PyTorch definitions are ``quantize_per_block_reference`` / ``quantize_per_channel_reference`` in
``reference.py``; rounding is to nearest with ties away from zero in both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffaccel.kernels.reference import quantize_per_channel_reference


@triton.jit
def _quant_per_block_kernel(
    X, Mean, Out, Scale,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_mb, stride_mh,
    num_heads, n_tokens, n_blocks, premultiply,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK: tl.constexpr, HAS_MEAN: tl.constexpr,
):
    pid_blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_n = pid_blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_n[:, None] < n_tokens) & (offs_d[None, :] < HEAD_DIM)
    x_base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    x = tl.load(x_base + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    if HAS_MEAN:
        mean = tl.load(Mean + b * stride_mb + h * stride_mh + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        x = tl.where(mask, x - mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.where(amax > 0, amax / 127.0, 1.0)
    r = x / scale
    xq = tl.where(r >= 0, r + 0.5, r - 0.5).to(tl.int8)  # float -> int truncates: ties away from zero
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od, xq, mask=mask)
    tl.store(Scale + pid_bh * n_blocks + pid_blk, scale * premultiply)


def quantize_per_block(
    x: torch.Tensor, block_size: int, *, mean: torch.Tensor | None = None, premultiply: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`~diffaccel.kernels.reference.quantize_per_block_reference` (same contract)."""
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, heads, tokens, head_dim), got shape {tuple(x.shape)}")
    B, H, N, D = x.shape
    nb = -(-N // block_size)
    out = torch.empty(B, H, N, D, dtype=torch.int8, device=x.device)
    scales = torch.empty(B, H, nb, dtype=torch.float32, device=x.device)
    if mean is not None:
        if mean.dtype != torch.float32 or not mean.is_contiguous():
            mean = mean.float().contiguous()
        if mean.shape != (B, H, D):
            raise ValueError(f"mean must have shape {(B, H, D)}, got {tuple(mean.shape)}")
    m = mean if mean is not None else scales  # dummy pointer when unused
    _quant_per_block_kernel[(nb, B * H)](
        x, m, out, scales,
        *x.stride(), *out.stride(),
        (m.stride(0) if mean is not None else 0), (m.stride(1) if mean is not None else 0),
        H, N, nb, float(premultiply),
        HEAD_DIM=D, HEAD_DIM_PAD=max(16, 1 << (D - 1).bit_length()), BLOCK=block_size, HAS_MEAN=mean is not None,
        num_warps=4,
    )
    return out, scales


def smoothing_mean(k: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of K over tokens, float32 ``(B, H, D)`` (SageAttention's K smoothing)."""
    return k.mean(dim=2, dtype=torch.float32)


def quantize_per_channel(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 V with one scale per (batch, head, channel) over all tokens (torch: a reduction over all tokens).

    The INT8 values are laid out tokens-fastest (a ``(B, H, D, N)`` buffer seen as ``(B, H, N, D)``): P·V then
    reads V with the reduction dimension contiguous, the operand layout INT8 tensor-core MMAs need.
    """
    v8, scale = quantize_per_channel_reference(v)
    return v8.transpose(-1, -2).contiguous().transpose(-1, -2), scale
