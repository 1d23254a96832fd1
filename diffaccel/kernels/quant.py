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

LOG2E = 1.4426950408889634


@triton.jit
def _quant_per_block_kernel(
    X, Mean, Out, Scale, Order,
    stride_xb, stride_xh, stride_xn, stride_xd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_mb, stride_mh, stride_order_h,
    num_heads, n_tokens, n_blocks, premultiply,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK: tl.constexpr, HAS_MEAN: tl.constexpr,
    HAS_ORDER: tl.constexpr,
):
    pid_blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_n = pid_blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_n[:, None] < n_tokens) & (offs_d[None, :] < HEAD_DIM)
    x_base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    if HAS_ORDER:  # gathered load: output row i (kernel order) is input row Order[h, i]
        rows = tl.load(Order + h.to(tl.int64) * stride_order_h + offs_n, mask=offs_n < n_tokens, other=0)
    else:
        rows = offs_n
    x = tl.load(x_base + rows[:, None] * stride_xn + offs_d[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
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
    x: torch.Tensor, block_size: int, *, mean: torch.Tensor | None = None, premultiply: float = 1.0,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`~diffaccel.kernels.reference.quantize_per_block_reference` (same contract).

    ``order`` (int32, contiguous ``(N,)`` or ``(H, N)``): quantize the rows in that order (gathered loads), i.e.
    the result equals quantizing ``reference.gather_tokens(x, order)``: blocks are blocks of the order.
    """
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
        x, m, out, scales, order if order is not None else scales,
        *x.stride(), *out.stride(),
        (m.stride(0) if mean is not None else 0), (m.stride(1) if mean is not None else 0),
        (order.stride(0) if order is not None and order.dim() == 2 else 0),
        H, N, nb, float(premultiply),
        HEAD_DIM=D, HEAD_DIM_PAD=max(16, 1 << (D - 1).bit_length()), BLOCK=block_size, HAS_MEAN=mean is not None,
        HAS_ORDER=order is not None, num_warps=4,
    )
    return out, scales


def smoothing_mean(k: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of K over tokens, float32 ``(B, H, D)`` (SageAttention's K smoothing)."""
    return k.mean(dim=2, dtype=torch.float32)


def quantize_per_channel(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 V with one scale per (batch, head, channel) over all tokens.

    This is the PyTorch reference (:func:`~diffaccel.kernels.reference.quantize_per_channel_reference`, a
    reduction over all tokens plus elementwise passes) with a kernel-friendly layout, not a Triton kernel.

    The INT8 values are laid out tokens-fastest (a ``(B, H, D, N)`` buffer seen as ``(B, H, N, D)``): P·V then
    reads V with the reduction dimension contiguous, the operand layout INT8 tensor-core MMAs need.
    """
    v8, scale = quantize_per_channel_reference(v)
    return v8.transpose(-1, -2).contiguous().transpose(-1, -2), scale


def quantize_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float,  # noqa: ANN001 - SparseBlockMask
    qk_int8: bool, pv_int8: bool, *, order: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """The attention kernel's operands: INT8 Q/K with per-block scales (K smoothed) and/or INT8 V per channel.

    Returns ``(q_in, k_in, v_in, q_scales, k_scales, v_scales, k_mean)``; unused scales are ``None``. With
    ``order`` the INT8 Q/K come out in kernel order (their blocks are the mask's kernel-order blocks); V stays in
    sequence order (per-channel scales over all tokens do not depend on the order; the kernel gathers V rows).
    """
    q_in, k_in, v_in = q, k, v
    q_scales = k_scales = v_scales = km = None
    if qk_int8:
        km = smoothing_mean(k)
        q_in, q_scales = quantize_per_block(q, block_mask.q_block_size, premultiply=scale * LOG2E, order=order)
        k_in, k_scales = quantize_per_block(k, block_mask.kv_block_size, mean=km, order=order)
    if pv_int8:
        v_in, v_scales = quantize_per_channel(v)
    return q_in, k_in, v_in, q_scales, k_scales, v_scales, km
