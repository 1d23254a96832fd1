"""Attention statistics from a cached log-sum-exp: the block attention mass behind AdaSpa and PARO.

AdaSpa (Xia et al., "Training-free and Adaptive Sparse Attention for Efficient Long Video Generation",
arXiv 2502.21079) searches its block-sparse mask from the exact post-softmax mass of every (query block,
key block) tile, computed in a second pass that reuses the log-sum-exp (LSE) of a dense first pass; PARO
(Zhao et al., "PAROAttention", arXiv 2506.16054) calibrates its static masks from the same block sums.
Given the LSE, each tile's mass is a sum of ``exp(scale * q.k - lse_q)`` that needs no normalisation
across tiles, so one program per (batch, head, query block) can walk the key blocks and never hold the
``N x N`` probability matrix.

    out, lse = attention_with_lse(q, k, v)                  # dense pass, natural-log LSE per query
    mass = block_attention_mass(q, k, lse, block_size=64)   # (B, H, ceil(Nq/64), ceil(Nk/64)) float32
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from diffaccel.kernels.reference import attention_with_lse_reference, block_attention_mass_reference
from diffaccel.kernels.dispatch import MAX_HEAD_DIM, SUPPORTED_DTYPES, _choose_backend
from diffaccel.kernels.masks import SparseBlockMask

__all__ = ["attention_with_lse", "block_attention_mass"]

_LOG2E = 1.4426950408889634
_MIN_BLOCK, _MAX_BLOCK = 16, 256  # tl.dot needs tiles of at least 16; above 256 a tile spills registers
_DENSE_BLOCK = 128  # block size of the all-kept mask of attention_with_lse (the kernel picks its tiles within it)


triton: Any = None  # imported by _block_mass_kernel() on first use
tl: Any = None


@functools.cache
def _block_mass_kernel() -> Any:
    """Compile-on-first-use: importing diffaccel.kernels needs torch only; Triton is imported here."""
    global triton, tl  # the kernel body resolves ``tl`` among this module's globals, like any @triton.jit
    import triton
    import triton.language as tl

    @triton.jit
    def block_mass_kernel(
        Q, K, LSE, OUT,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_lb, stride_lh, stride_ln,
        stride_ob, stride_oh, stride_oq, stride_ok,
        num_heads, n_q, n_k, head_dim, n_key_blocks,
        qk_scale_log2,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        """One program: query block ``program_id(0)`` of (batch, head) ``program_id(1)``, all key blocks."""
        q_block = tl.program_id(0)
        bh = tl.program_id(1)
        # int64 offsets (as in the attention kernel): b * stride_qb overflows int32 from ~2^31 elements, e.g. at
        # 24 heads x 118800 tokens x 128 (one 720p video sample) from batch index 6.
        b = (bh // num_heads).to(tl.int64)
        h = (bh % num_heads).to(tl.int64)

        offs_q = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        q_valid = offs_q < n_q
        d_valid = offs_d < head_dim
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + offs_q[:, None] * stride_qn + offs_d[None, :] * stride_qd,
            mask=q_valid[:, None] & d_valid[None, :],
            other=0.0,
        )
        if DOT_FP32:
            q = q.to(tl.float32)
        # Work in base 2: exp(s * scale - lse) == exp2(s * scale * log2(e) - lse * log2(e)).
        lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_q * stride_ln, mask=q_valid, other=0.0)
        lse2 = lse * 1.4426950408889634
        k_base = K + b * stride_kb + h * stride_kh + offs_d[:, None] * stride_kd
        out_base = OUT + b * stride_ob + h * stride_oh + q_block * stride_oq

        for key_block in range(0, n_key_blocks):
            offs_k = key_block * BLOCK_K + tl.arange(0, BLOCK_K)
            k_valid = offs_k < n_k
            kt = tl.load(k_base + offs_k[None, :] * stride_kn, mask=d_valid[:, None] & k_valid[None, :], other=0.0)
            if DOT_FP32:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=INPUT_PRECISION)
            p = tl.exp2(s * qk_scale_log2 - lse2[:, None])
            # Padding rows/columns contribute exactly zero; a NaN in a valid entry is kept (never hidden).
            p = tl.where(q_valid[:, None] & k_valid[None, :], p, 0.0)
            tl.store(out_base + key_block * stride_ok, tl.sum(tl.sum(p, axis=1), axis=0))

    return block_mass_kernel


def _block_sizes(block_size: int | tuple[int, int]) -> tuple[int, int]:
    sizes = (block_size, block_size) if isinstance(block_size, int) else block_size
    ok = isinstance(sizes, (tuple, list)) and len(sizes) == 2 and all(
        isinstance(s, int) and not isinstance(s, bool) and _MIN_BLOCK <= s <= _MAX_BLOCK and s & (s - 1) == 0
        for s in sizes
    )
    if not ok:
        raise ValueError(
            f"block_size must be a power of two in [{_MIN_BLOCK}, {_MAX_BLOCK}] or a (query, key) pair of them, "
            f"got {block_size!r}"
        )
    return tuple(sizes)  # type: ignore[return-value]


def _check_qk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
    """Shared checks of (batch, heads, tokens, head_dim) inputs, naming the offending argument."""
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.shape[-2] == 0:
            raise ValueError(f"{name} has no tokens (shape {tuple(t.shape)}); at least one is required")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype must equal q.dtype ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {t.device}")
        if t.shape[0] != q.shape[0] or t.shape[1] != q.shape[1]:
            raise ValueError(
                f"{name} must have q's batch and heads {tuple(q.shape[:2])}, got shape {tuple(t.shape)}"
            )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k head_dim must equal q head_dim ({q.shape[-1]}), got shape {tuple(k.shape)}")
    if v is not None and v.shape[-1] != q.shape[-1]:
        raise ValueError(f"v head_dim must equal q head_dim ({q.shape[-1]}), got shape {tuple(v.shape)}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if v is not None and v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v must have as many tokens as k ({k.shape[-2]}), got shape {tuple(v.shape)}")


def _scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None (1/sqrt(head_dim)), got {scale!r}")
    return float(scale)


def block_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    block_size: int | tuple[int, int],
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax probability mass of every (query block, key block) tile of ``softmax(scale * q k^T)``.

    Args:
        q: (batch, heads, N_q, head_dim), float16/bfloat16/float32, head_dim up to 256.
        k: (batch, heads, N_k, head_dim), same dtype and device as ``q``.
        lse: (batch, heads, N_q) float32 natural-log log-sum-exp of each query row over all keys, as returned by
            :func:`attention_with_lse` (or FlexAttention with ``return_lse``) for the same inputs and scale.
        block_size: tokens per block, a power of two in [16, 256]; an int for square tiles or ``(block_q, block_k)``.
            ``N_q`` and ``N_k`` need not be multiples: tail blocks hold the remaining tokens.
        scale: logit scale, ``1 / sqrt(head_dim)`` when None.
        backend: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else the reference with a one-time
            warning), ``"triton"`` or ``"reference"``.

    Returns:
        (batch, heads, ceil(N_q / block_q), ceil(N_k / block_k)) float32 with
        ``mass[b, h, i, j] = sum over queries q of block i and keys k of block j of exp(scale * q.k - lse_q)``.
        Summed over ``j`` it gives the number of queries in block ``i`` (each softmax row sums to one).
    """
    _check_qk(q, k)
    block_q, block_k = _block_sizes(block_size)
    scale = _scale(scale, q.shape[-1])
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[-2]
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    if tuple(lse.shape) != (batch, heads, n_q):
        raise ValueError(f"lse must have shape (batch, heads, N_q) = {(batch, heads, n_q)}, got {tuple(lse.shape)}")
    if lse.dtype != torch.float32:
        raise TypeError(f"lse must be float32 (a half-precision LSE shifts every probability), got {lse.dtype}")
    if lse.device != q.device:
        raise ValueError(f"lse must be on q's device ({q.device}), got {lse.device}")

    if _choose_backend(backend, q.device, "block_attention_mass") == "reference":
        return block_attention_mass_reference(q, k, lse, (block_q, block_k), scale=scale)
    if torch.compiler.is_compiling():  # traced: the kernel as one opaque op (diffaccel/kernels/ops.py)
        return block_attention_mass_op(q, k, lse, block_q, block_k, float(scale))

    kernel = _block_mass_kernel()
    n_qb, n_kb = -(-n_q // block_q), -(-n_k // block_k)
    out = torch.empty((batch, heads, n_qb, n_kb), device=q.device, dtype=torch.float32)
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    big_tile = block_q * block_k * max(block_d, 64) > 64 * 64 * 128
    kernel[(n_qb, batch * heads)](
        q, k, lse, out,
        *q.stride(), *k.stride(), *lse.stride(), *out.stride(),
        heads, n_q, n_k, head_dim, n_kb,
        scale * _LOG2E,
        BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # Triton's interpreter multiplies the raw bits of bfloat16 dot operands (triton-lang/triton#11584):
        # upcast there; the products are the exact ones a bf16 tensor-core dot accumulates in float32.
        DOT_FP32=type(kernel).__name__ == "InterpretedFunction" or q.dtype == torch.float32,
        num_warps=8 if big_tile else 4,
        num_stages=2,
    )  # fmt: skip
    return out


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention ``softmax(scale * q k^T) v`` and the natural-log log-sum-exp of every query row.

    The first pass of AdaSpa's search: its LSE feeds :func:`block_attention_mass`. On the Triton path this is
    the block-sparse flash kernel with every key block kept (one flash kernel in the package, not two).

    Args:
        q: (batch, heads, N_q, head_dim); k, v: (batch, heads, N_k, head_dim); same dtype and device.
        scale: logit scale, ``1 / sqrt(head_dim)`` when None.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``, as for :func:`block_attention_mass`.

    Returns:
        ``(out, lse)``: ``out`` like ``q``; ``lse`` (batch, heads, N_q) float32.
    """
    _check_qk(q, k, v)
    scale = _scale(scale, q.shape[-1])
    if _choose_backend(backend, q.device, "attention_with_lse") == "reference":
        return attention_with_lse_reference(q, k, v, scale=scale)
    if torch.compiler.is_compiling():  # traced: the kernel as one opaque op (diffaccel/kernels/ops.py)
        return attention_with_lse_op(q, k, v, float(scale))
    from diffaccel.kernels.dispatch import block_sparse_attention

    mask = _dense_mask(q.shape[-2], k.shape[-2], str(q.device))
    return block_sparse_attention(q, k, v, mask, scale=scale, return_lse=True, backend="triton")


@functools.lru_cache(maxsize=16)
def _dense_mask(q_len: int, kv_len: int, device: str) -> SparseBlockMask:
    return SparseBlockMask.dense(q_len, kv_len, _DENSE_BLOCK, device=device)


# -- custom ops (the Triton paths as opaque ops under torch.compile; see diffaccel/kernels/ops.py) --------------
@torch.library.custom_op("diffaccel::attention_with_lse", mutates_args=())
def attention_with_lse_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention and its log-sum-exp on the Triton kernel (:func:`~diffaccel.kernels.stats.attention_with_lse`)."""
    out, lse = attention_with_lse(q, k, v, scale=scale, backend="triton")
    return out.contiguous(), lse.contiguous()


@attention_with_lse_op.register_fake
def _attention_with_lse_fake(q, k, v, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("diffaccel::block_attention_mass", mutates_args=())
def block_attention_mass_op(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, block_q: int, block_k: int,
                            scale: float) -> torch.Tensor:
    """Attention mass per (query block, key block) on the Triton kernel (:func:`~diffaccel.kernels.stats.block_attention_mass`)."""
    return block_attention_mass(q, k, lse, (block_q, block_k), scale=scale, backend="triton")


@block_attention_mass_op.register_fake
def _block_attention_mass_fake(q, k, lse, block_q, block_k, scale):
    b, h, n_q = q.shape[:3]
    n_k = k.shape[2]
    return q.new_empty((b, h, -(-n_q // block_q), -(-n_k // block_k)), dtype=torch.float32)
