"""Block scores: every query against the mean key of every key partition, reduced per query block.

The router of MoBA (Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs", arXiv 2502.13189) and
VMoBA (Wu et al., "VMoBA: Mixture-of-Block Attention for Video Diffusion Models", arXiv 2506.23858) scores a
query ``q`` against a key block by ``q . mean(K_block)`` (unscaled, float32, as in the released ``src/vmoba.py``).
The method computes the centroids (one mean key per partition, ``P`` of them, a few dozen); this kernel does the
``N x P`` products in one pass over ``q`` and reduces them per query block of the block-sparse kernel, so a
per-query-block selection never writes the per-query score matrix (``per_query=True`` writes it too, for the
union-of-top-k selection).

    mean, _ = block_scores(q, centroids, 64, token_order=order)   # (B, H, ceil(N/64), P) float32

``q`` rows are read through ``token_order`` (kernel position ``i`` holds sequence row ``token_order[..., i]``),
the order the block-sparse kernel runs in, so query blocks here are that kernel's query blocks.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from diffaccel.kernels._util import _cdiv, _describe, _next_pow2
from diffaccel.kernels.dispatch import MAX_HEAD_DIM, SUPPORTED_DTYPES, _choose_backend
from diffaccel.kernels.reference import block_scores_reference

__all__ = ["block_scores"]

triton: Any = None  # imported by _kernel() on first use
tl: Any = None


@functools.cache
def _kernel() -> Any:
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def block_scores_kernel(
        Q, C, ORDER, MEAN, S,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_cb, stride_ch, stride_cp, stride_cd,
        stride_oh, stride_on,
        stride_mb, stride_mh, stride_mq, stride_mp,
        stride_sb, stride_sh, stride_sn, stride_sp,
        num_heads, n_q, n_p, head_dim,
        BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_ORDER: tl.constexpr, PER_QUERY: tl.constexpr,
    ):  # fmt: skip
        """One program: query block ``program_id(0)`` of (batch, head) ``program_id(1)``, all centroids."""
        q_block = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // num_heads).to(tl.int64)
        h = (bh % num_heads).to(tl.int64)
        offs_q = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        q_valid = offs_q < n_q
        d_valid = offs_d < head_dim
        if HAS_ORDER:
            rows = tl.load(ORDER + h * stride_oh + offs_q * stride_on, mask=q_valid, other=0).to(tl.int64)
        else:
            rows = offs_q.to(tl.int64)
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
            mask=q_valid[:, None] & d_valid[None, :], other=0.0,
        ).to(tl.float32)
        n_valid = tl.sum(q_valid.to(tl.float32), axis=0)
        for p0 in range(0, n_p, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_valid = offs_p < n_p
            ct = tl.load(
                C + b * stride_cb + h * stride_ch + offs_p[None, :] * stride_cp + offs_d[:, None] * stride_cd,
                mask=d_valid[:, None] & p_valid[None, :], other=0.0,
            ).to(tl.float32)
            s = tl.dot(q, ct, input_precision="ieee")
            s = tl.where(q_valid[:, None], s, 0.0)
            tl.store(MEAN + b * stride_mb + h * stride_mh + q_block * stride_mq + offs_p * stride_mp,
                     tl.sum(s, axis=0) / n_valid, mask=p_valid)
            if PER_QUERY:
                tl.store(S + b * stride_sb + h * stride_sh + offs_q[:, None] * stride_sn + offs_p[None, :] * stride_sp,
                         s, mask=q_valid[:, None] & p_valid[None, :])

    return block_scores_kernel


def block_scores(
    q: torch.Tensor,
    centroids: torch.Tensor,
    block_size: int,
    *,
    token_order: torch.Tensor | None = None,
    per_query: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unscaled float32 scores ``q . c_p`` of every query against every centroid, averaged per query block.

    Args:
        q: (batch, heads, N, head_dim), float16/bfloat16/float32, head_dim up to 256.
        centroids: (batch, heads, P, head_dim), any float dtype on q's device (one row per key partition).
        block_size: queries per block, a power of two in [16, 256] (the block-sparse kernel's query block).
        token_order: optional integer ``(N,)`` or ``(heads, N)`` permutation: kernel position ``i`` is row
            ``token_order[..., i]`` of ``q`` (query blocks are consecutive kernel positions).
        per_query: also return the per-query scores ``(batch, heads, N, P)`` in kernel order.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``(block_mean, scores)``: ``block_mean`` ``(batch, heads, ceil(N / block_size), P)`` float32 (the last,
        ragged block averages its valid queries); ``scores`` or None.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.dtype not in SUPPORTED_DTYPES or q.shape[2] == 0:
        raise ValueError(f"q must be a non-empty float (batch, heads, tokens, head_dim) tensor, got {_describe(q)}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM}, got {q.shape[-1]}")
    B, H, N, D = q.shape
    if (not isinstance(centroids, torch.Tensor) or centroids.dim() != 4 or not centroids.dtype.is_floating_point
            or tuple(centroids.shape[:2]) != (B, H) or centroids.shape[-1] != D or centroids.shape[2] == 0):
        raise ValueError(
            f"centroids must be a float ({B}, {H}, P >= 1, {D}) tensor, got {_describe(centroids)}"
        )
    if centroids.device != q.device:
        raise ValueError(f"centroids must be on q's device ({q.device}), got {centroids.device}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 16 <= block_size <= 256 \
            or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [16, 256], got {block_size!r}")
    if token_order is not None:
        if not isinstance(token_order, torch.Tensor) or token_order.dtype.is_floating_point \
                or token_order.dtype == torch.bool or tuple(token_order.shape) not in ((N,), (H, N)):
            raise ValueError(f"token_order must be an integer ({N},) or ({H}, {N}) tensor, got {_describe(token_order)}")
        if token_order.device != q.device:
            raise ValueError(f"token_order must be on q's device ({q.device}), got {token_order.device}")
    if not isinstance(per_query, bool):
        raise TypeError(f"per_query must be a bool, got {per_query!r}")
    if _choose_backend(backend, q.device, "block_scores") == "reference":
        return block_scores_reference(q, centroids, block_size, token_order=token_order, per_query=per_query)

    P = centroids.shape[2]
    nqb = _cdiv(N, block_size)
    mean = torch.empty((B, H, nqb, P), device=q.device, dtype=torch.float32)
    scores = torch.empty((B, H, N, P), device=q.device, dtype=torch.float32) if per_query else mean
    if token_order is None:
        order = torch.zeros((1, 1), dtype=torch.int32, device=q.device)
        o_strides = (0, 0)
    else:
        order = token_order.to(torch.int32).reshape(-1, N)
        o_strides = (order.stride(0) if order.shape[0] > 1 else 0, order.stride(1))
    block_d = max(16, _next_pow2(D))
    block_p = max(16, min(64, _next_pow2(P)))
    s_strides = scores.stride() if per_query else (0, 0, 0, 0)
    _kernel()[(nqb, B * H)](
        q, centroids, order, mean, scores,
        *q.stride(), *centroids.stride(), *o_strides, *mean.stride(), *s_strides,
        H, N, P, D,
        BLOCK_Q=block_size, BLOCK_P=block_p, BLOCK_D=block_d,
        HAS_ORDER=token_order is not None, PER_QUERY=per_query,
        num_warps=4,
    )  # fmt: skip
    return mean, (scores if per_query else None)
