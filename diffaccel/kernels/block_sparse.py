"""Block-sparse flash attention forward in Triton: full key blocks unmasked, partial key blocks with an element mask.

Algorithm: FlashAttention-2 (Dao, arXiv 2307.08691) as in Triton's fused-attention tutorial: one program per
(query tile, batch*head), online softmax with running max and sum in the exp2 domain (log2(e) folded into the
scale), fp32 accumulation. Sparsity follows FlexAttention's block masks (Dong et al., arXiv 2412.05496): per
query block the program walks the *indices* of the kept key blocks (never the whole key range), first the full
blocks with no element mask, then the partial ones, whose element mask is computed from token coordinates for the
mask kinds of :mod:`diffaccel.kernels.masks` (MASK_KIND is a constexpr, its integer parameters runtime arguments).

Precision options: ``QK_INT8`` multiplies INT8 Q and K (per-block scales, K smoothed; SageAttention, arXiv
2410.02367) with int32 accumulation; ``PV_INT8`` quantizes P with the fixed scale 127 after the running max and
multiplies with per-channel INT8 V (PARO, arXiv 2506.16054).

Block sizes are autotuned per (mask block sizes, head_dim, mask kind, precision, power-of-two length bucket) from
``_CONFIGS``; ``DIFFACCEL_AUTOTUNE=0`` uses one default config instead (tests do, to keep compile time down).
Run ``python -m diffaccel.kernels.block_sparse`` on a GPU for a quick benchmark against SDPA (and ``--flex``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from diffaccel.kernels.masks import KIND_NONE, SparseBlockMask
from diffaccel.kernels.quant import quantize_per_block, quantize_per_channel, smoothing_mean

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M must divide the mask's query block, BLOCK_N its key block;
# the pruning below keeps the ones that do. Hopper-oriented, after the fused-attention tutorial's list.
_CONFIGS = [
    (128, 128, 8, 3),
    (128, 128, 8, 2),
    (128, 128, 8, 4),
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (128, 64, 4, 3),
    (64, 128, 4, 3),
    (64, 64, 4, 3),
    (32, 32, 4, 2),
    (16, 16, 4, 1),
]


def _default_config(q_block: int, kv_block: int, head_dim: int) -> triton.Config:
    """The config used without autotuning (interpreter, DIFFACCEL_AUTOTUNE=0, or no listed config fits)."""
    if _interpreting():
        # Small tiles: the interpreter's cost is per tile op, and sub-tiles of mask blocks get exercised by tests.
        return triton.Config({"BLOCK_M": min(q_block, 32), "BLOCK_N": 16}, num_warps=4, num_stages=1)
    bm, bn = min(q_block, 128 if head_dim < 256 else 64), min(kv_block, 64 if head_dim < 256 else 32)
    warps = 8 if bm == 128 and head_dim >= 128 else 4
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=3 if bm >= 64 else 2)


def _prune_configs(configs, named_args, **kwargs):
    q_block = kwargs["Q_BLOCK"]
    kv_block = kwargs["KV_BLOCK"]
    head_dim = kwargs["HEAD_DIM_PAD"]
    ok = [
        c for c in configs
        if q_block % c.kwargs["BLOCK_M"] == 0 and kv_block % c.kwargs["BLOCK_N"] == 0
        and c.kwargs["BLOCK_M"] >= min(64, q_block) and c.kwargs["BLOCK_N"] >= min(32, kv_block)
        and not (head_dim >= 256 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 64)
    ]
    if _interpreting() or not ok or os.environ.get("DIFFACCEL_AUTOTUNE", "1") == "0":
        return [_default_config(q_block, kv_block, head_dim)]
    return ok


# ---------------------------------------------------------------------------------------------------------------
# Element masks of partial blocks. Query-side quantities are 1-D (BLOCK_M), key-side 1-D (BLOCK_N); the 2-D work
# per element is kept to a few integer ops, since on tensor-core GPUs it, not the two dots, bounds a partial tile.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _coords3(v, G1, G2):
    """Row-major (c0, c1, c2) of flat visual indices on a (G0, G1, G2) grid."""
    c2 = v % G2
    t = v // G2
    return t // G1, t % G1, c2


@triton.jit
def _na_window(xq, n, k, s, d, causal):
    """NATTEN's window of each query on one axis (masks.NeighborhoodMask): (dilation group, first key, span)."""
    gq = xq % d
    iq = xq // d
    n_g = n // d + (gq < (n % d)).to(tl.int32)
    left = k // 2
    right = k // 2 - (1 - k % 2)
    leader = tl.minimum((iq // s) * s + s // 2, n_g - 1)
    center = tl.minimum(tl.maximum(leader, left), n_g - 1 - right)
    leader_c = tl.minimum((iq // s) * s + (s - 1), n_g - 1)
    lo = tl.where(causal != 0, leader_c - k + 1, center - left)
    hi = tl.where(causal != 0, iq, center + right)
    return gq, lo, hi - lo


@triton.jit
def _na_keep(xk, gq, lo, span, d, HAS_DIL: tl.constexpr):
    """Keys (in-group coordinate) inside [lo, lo + span] of their query: one subtraction, one unsigned compare."""
    keep = ((xk // d)[None, :] - lo[:, None]).to(tl.uint32) <= span[:, None].to(tl.uint32)
    if HAS_DIL:
        keep = keep & (gq[:, None] == (xk % d)[None, :])
    return keep


@triton.jit
def _window_id(c0, c1, c2, G0, G1, G2, W0, W1, W2, S0, S1, S2):
    """Window index of each token after rolling the grid by -shift (masks.ShiftedWindowMask)."""
    w0 = (c0 - S0 + G0) % G0 // W0
    w1 = (c1 - S1 + G1) % G1 // W1
    w2 = (c2 - S2 + G2) % G2 // W2
    return (w0 * ((G1 + W1 - 1) // W1) + w1) * ((G2 + W2 - 1) // W2) + w2


@triton.jit
def _element_mask(
    offs_m, offs_n, h, Table, stride_th,
    n_text, n_vis, G0, G1, G2,
    P0, P1, P2, P3, P4, P5, P6, P7, P8, P9, P10, P11,
    MASK_KIND: tl.constexpr, TEXT_MODE: tl.constexpr, NDIM: tl.constexpr, HAS_DIL: tl.constexpr,
):
    """The spec's mask_mod on a (BLOCK_M, BLOCK_N) tile of token indices (sequence bounds not included)."""
    if TEXT_MODE == 1:
        q_text = offs_m < n_text
        k_text = offs_n < n_text
        vq = offs_m - n_text
        vk = offs_n - n_text
    elif TEXT_MODE == 2:
        q_text = offs_m >= n_vis
        k_text = offs_n >= n_vis
        vq = offs_m
        vk = offs_n
    else:
        vq = offs_m
        vk = offs_n
    vq = tl.minimum(tl.maximum(vq, 0), n_vis - 1)
    vk = tl.minimum(tl.maximum(vk, 0), n_vis - 1)
    q0, q1, q2 = _coords3(vq, G1, G2)
    k0, k1, k2 = _coords3(vk, G1, G2)
    if MASK_KIND == 1:  # neighborhood (GNA / NATTEN); P = (k, s, d, causal) per axis; the last NDIM axes are real
        g2, lo2, sp2 = _na_window(q2, G2, P8, P9, P10, P11)
        keep = _na_keep(k2, g2, lo2, sp2, P10, HAS_DIL)
        if NDIM >= 2:
            g1, lo1, sp1 = _na_window(q1, G1, P4, P5, P6, P7)
            keep = keep & _na_keep(k1, g1, lo1, sp1, P6, HAS_DIL)
        if NDIM >= 3:
            g0, lo0, sp0 = _na_window(q0, G0, P0, P1, P2, P3)
            keep = keep & _na_keep(k0, g0, lo0, sp0, P2, HAS_DIL)
    elif MASK_KIND == 2:  # circle (CLEAR); P0 = largest kept squared distance
        d2 = q2[:, None] - k2[None, :]
        dist = d2 * d2
        if NDIM >= 2:
            d1 = q1[:, None] - k1[None, :]
            dist += d1 * d1
        if NDIM >= 3:
            d0 = q0[:, None] - k0[None, :]
            dist += d0 * d0
        keep = dist <= P0
    elif MASK_KIND == 3:  # frame tiles (Efficient-vDiT); Table[h, frame] != 0 for global frames
        gq = tl.load(Table + h * stride_th + q0) != 0
        gk = tl.load(Table + h * stride_th + k0) != 0
        keep = (q0[:, None] == k0[None, :]) | gq[:, None] | gk[None, :]
    elif MASK_KIND == 4:  # shifted windows (MSW-MSA); P = windows (3), shifts (3)
        wq = _window_id(q0, q1, q2, G0, G1, G2, P0, P1, P2, P3, P4, P5)
        wk = _window_id(k0, k1, k2, G0, G1, G2, P0, P1, P2, P3, P4, P5)
        keep = wq[:, None] == wk[None, :]
    else:
        keep = (offs_m[:, None] >= 0) & (offs_n[None, :] >= 0)
    if TEXT_MODE != 0:
        keep = keep | q_text[:, None] | k_text[None, :]
    return keep


# ---------------------------------------------------------------------------------------------------------------
# Main loop and kernel
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _attend_tiles(
    acc, l_i, m_i, q, q_scale,
    K, V, KScale, Idx, it_start, it_end,
    offs_m, offs_d, h, stride_kn, stride_kd, stride_vn, stride_vd,
    kv_len, qk_scale,
    Table, stride_th, n_text, n_vis, G0, G1, G2,
    P0, P1, P2, P3, P4, P5, P6, P7, P8, P9, P10, P11,
    KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    EVEN_D: tl.constexpr, BOUNDS: tl.constexpr,
    APPLY_MASK: tl.constexpr, MASK_KIND: tl.constexpr, TEXT_MODE: tl.constexpr, NDIM: tl.constexpr,
    HAS_DIL: tl.constexpr,
    QK_INT8: tl.constexpr, PV_INT8: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Online-softmax update over key tiles ``it_start .. it_end`` of the block list ``Idx``.

    Tile ``it`` is sub-tile ``it % (KV_BLOCK // BLOCK_N)`` of key block ``Idx[it // (KV_BLOCK // BLOCK_N)]``.
    ``BOUNDS`` masks keys past ``kv_len`` (only the sequence's last key block needs it); ``APPLY_MASK`` evaluates the
    element mask (partial blocks).
    """
    for it in range(it_start, it_end):
        kv_blk = tl.load(Idx + it // (KV_BLOCK // BLOCK_N))
        start_n = kv_blk * KV_BLOCK + (it % (KV_BLOCK // BLOCK_N)) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if BOUNDS:
            k = tl.load(k_ptrs, mask=(offs_n[None, :] < kv_len) & (offs_d[:, None] < HEAD_DIM), other=0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0)
        if DOT_UPCAST:
            k = k.to(tl.float32)
        if QK_INT8:
            # One scale per key block (a tile never straddles two): a scalar multiply per score, as in bf16.
            k_scale = tl.load(KScale + kv_blk)
            if HEAD_DIM_PAD >= 32:
                s_int = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32)
            else:  # int8 dots need K >= 32; integer-valued fp16 operands give the same (exact) products
                s_int = tl.dot(q.to(tl.float16), k.to(tl.float16))
            qk = s_int * (q_scale * k_scale)
        else:
            qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if APPLY_MASK:
            keep = _element_mask(
                offs_m, offs_n, h, Table, stride_th, n_text, n_vis, G0, G1, G2,
                P0, P1, P2, P3, P4, P5, P6, P7, P8, P9, P10, P11, MASK_KIND, TEXT_MODE, NDIM, HAS_DIL,
            )
            if BOUNDS:
                keep = keep & (offs_n[None, :] < kv_len)
            qk = tl.where(keep, qk, float("-inf"))
        elif BOUNDS:
            qk = tl.where(offs_n[None, :] < kv_len, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if APPLY_MASK or BOUNDS:
            # A row may have no kept element yet: keep exp2 finite (p = 0, alpha = 0) instead of NaN.
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if BOUNDS:
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM), other=0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0)
        if PV_INT8:
            # P is in [0, 1] after subtracting the running max: fixed scale 127, round to nearest (PARO).
            p8 = (p * 127.0 + 0.5).to(tl.int8)
            if BLOCK_N >= 32:
                acc += tl.dot(p8, v, out_dtype=tl.int32).to(tl.float32)
            else:
                acc += tl.dot(p8.to(tl.float16), v.to(tl.float16))
        elif DOT_UPCAST:
            acc += tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _split_tail(Idx, n_blocks, kv_len, num_kv_blocks, KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                EVEN_N: tl.constexpr):
    """Tiles of a block list without bounds checks, and the end of the (masked) tail tiles.

    Lists are ascending, so the sequence's last key block, the only one reaching past ``kv_len``, comes last.
    """
    sub = KV_BLOCK // BLOCK_N
    if EVEN_N:
        n_main = n_blocks * sub
        tail_end = n_main
    else:
        last = tl.load(Idx + tl.maximum(n_blocks - 1, 0))
        has_tail = (n_blocks > 0) & (last == num_kv_blocks - 1)
        n_main = tl.where(has_tail, n_blocks - 1, n_blocks) * sub
        tail_tiles = (kv_len - (num_kv_blocks - 1) * KV_BLOCK + BLOCK_N - 1) // BLOCK_N
        tail_end = tl.where(has_tail, n_main + tail_tiles, n_main)
    return n_main, tail_end


@triton.jit(do_not_specialize=["len_bucket"])
def _block_sparse_fwd(
    Q, K, V, Out, Lse, QScale, KScale, VScale,
    KvNum, KvIdx, FullNum, FullIdx, Table,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_numb, stride_numh, stride_idxb, stride_idxh, stride_th,
    num_heads, q_len, kv_len, num_kv_blocks, n_q_scales, n_k_scales, qk_scale, len_bucket,
    n_text, n_vis, G0, G1, G2,
    P0, P1, P2, P3, P4, P5, P6, P7, P8, P9, P10, P11,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    MASK_KIND: tl.constexpr, TEXT_MODE: tl.constexpr, NDIM: tl.constexpr, HAS_DIL: tl.constexpr,
    QK_INT8: tl.constexpr, PV_INT8: tl.constexpr, HAS_PARTIAL: tl.constexpr, RETURN_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q_ptrs = Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    if EVEN_M and EVEN_D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM), other=0)
    if DOT_UPCAST:
        q = q.to(tl.float32)
    q_blk = pid_m * BLOCK_M // Q_BLOCK
    if QK_INT8:
        # One scale per query block (BLOCK_M divides Q_BLOCK); it already holds softmax_scale * log2(e).
        q_scale = tl.load(QScale + pid_bh * n_q_scales + q_blk)
    else:
        q_scale = 0.0

    K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    KScale += pid_bh * n_k_scales

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    num_off = b * stride_numb + h * stride_numh + q_blk
    idx_off = b.to(tl.int64) * stride_idxb + h.to(tl.int64) * stride_idxh + q_blk * num_kv_blocks

    # Full key blocks: no element mask; only the sequence's last key block (listed last) checks bounds.
    n_full = tl.load(FullNum + num_off)
    main_end, tail_end = _split_tail(FullIdx + idx_off, n_full, kv_len, num_kv_blocks, KV_BLOCK, BLOCK_N, EVEN_N)
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, q_scale, K, V, KScale, FullIdx + idx_off, 0, main_end,
        offs_m, offs_d, h, stride_kn, stride_kd, stride_vn, stride_vd, kv_len, qk_scale,
        Table, stride_th, n_text, n_vis, G0, G1, G2, P0, P1, P2, P3, P4, P5, P6, P7, P8, P9, P10, P11,
        KV_BLOCK, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, EVEN_D, False,
        False, MASK_KIND, TEXT_MODE, NDIM, HAS_DIL, QK_INT8, PV_INT8, DOT_PRECISION, DOT_UPCAST,
    )
    if not EVEN_N:
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, q_scale, K, V, KScale, FullIdx + idx_off, main_end, tail_end,
            offs_m, offs_d, h, stride_kn, stride_kd, stride_vn, stride_vd, kv_len, qk_scale,
            Table, stride_th, n_text, n_vis, G0, G1, G2, P0, P1, P2, P3, P4, P5, P6, P7, P8, P9, P10, P11,
            KV_BLOCK, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, EVEN_D, True,
            False, MASK_KIND, TEXT_MODE, NDIM, HAS_DIL, QK_INT8, PV_INT8, DOT_PRECISION, DOT_UPCAST,
        )
    # Partial key blocks: element mask from token coordinates.
    if HAS_PARTIAL:
        n_part = tl.load(KvNum + num_off)
        main_end, tail_end = _split_tail(KvIdx + idx_off, n_part, kv_len, num_kv_blocks, KV_BLOCK, BLOCK_N, EVEN_N)
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, q_scale, K, V, KScale, KvIdx + idx_off, 0, main_end,
            offs_m, offs_d, h, stride_kn, stride_kd, stride_vn, stride_vd, kv_len, qk_scale,
            Table, stride_th, n_text, n_vis, G0, G1, G2, P0, P1, P2, P3, P4, P5, P6, P7, P8, P9, P10, P11,
            KV_BLOCK, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, EVEN_D, False,
            True, MASK_KIND, TEXT_MODE, NDIM, HAS_DIL, QK_INT8, PV_INT8, DOT_PRECISION, DOT_UPCAST,
        )
        if not EVEN_N:
            acc, l_i, m_i = _attend_tiles(
                acc, l_i, m_i, q, q_scale, K, V, KScale, KvIdx + idx_off, main_end, tail_end,
                offs_m, offs_d, h, stride_kn, stride_kd, stride_vn, stride_vd, kv_len, qk_scale,
                Table, stride_th, n_text, n_vis, G0, G1, G2, P0, P1, P2, P3, P4, P5, P6, P7, P8, P9, P10, P11,
                KV_BLOCK, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, EVEN_D, True,
                True, MASK_KIND, TEXT_MODE, NDIM, HAS_DIL, QK_INT8, PV_INT8, DOT_PRECISION, DOT_UPCAST,
            )

    if PV_INT8:
        v_scale = tl.load(VScale + pid_bh * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        acc = acc * (v_scale / 127.0)[None, :]
    # Rows with no kept key (l == 0) get zeros and LSE -inf.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    Out += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    o_ptrs = Out + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    if EVEN_M and EVEN_D:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM))
    if RETURN_LSE:
        lse = tl.where(l_i > 0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(Lse + pid_bh * q_len + offs_m, lse, mask=offs_m < q_len)


# The first call per tuning key goes through Triton's autotuner (benchmarks the configs, or takes the single pruned
# one); later calls launch the JIT function directly with the config it chose (see ``launch``), skipping the
# autotuner's and heuristics' per-call Python work (key building over all ~70 arguments, argument dicts).
_block_sparse_fwd_kernel = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in _CONFIGS],
    key=["len_bucket", "Q_BLOCK", "KV_BLOCK", "HEAD_DIM_PAD", "MASK_KIND", "TEXT_MODE", "QK_INT8", "PV_INT8",
         "HAS_PARTIAL"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(triton.heuristics({
    "EVEN_M": lambda a: a["q_len"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["kv_len"] % a["KV_BLOCK"] == 0,
    "EVEN_D": lambda a: a["HEAD_DIM"] == a["HEAD_DIM_PAD"],
})(_block_sparse_fwd))

def quantize_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: SparseBlockMask, scale: float,
    qk_int8: bool, pv_int8: bool,
) -> tuple[torch.Tensor, ...]:
    """Kernel operands: INT8 Q/K with per-block scales (K smoothed) and/or INT8 V with per-channel scales.

    Returns ``(q_in, k_in, v_in, q_scales, k_scales, v_scales, k_mean)``; unused scales are ``None``.
    """
    q_in, k_in, v_in = q, k, v
    q_scales = k_scales = v_scales = km = None
    if qk_int8:
        km = smoothing_mean(k)
        q_in, q_scales = quantize_per_block(q, block_mask.q_block_size, premultiply=scale * LOG2E)
        k_in, k_scales = quantize_per_block(k, block_mask.kv_block_size, mean=km)
    if pv_int8:
        v_in, v_scales = quantize_per_channel(v)
    return q_in, k_in, v_in, q_scales, k_scales, v_scales, km


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length() if x > 1 else 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class _MaskArgs:
    """Everything the kernel takes from one block mask, derived once per mask (cached on it by :func:`_mask_args`).

    ``tensors``: KvNum, KvIdx, FullNum, FullIdx, Table; ``strides``: the mask's batch/head strides and the table's
    head stride; ``lengths``: q_len, kv_len, num_kv_blocks, n_q_scales, n_k_scales; ``coords``: len_bucket, n_text,
    n_vis, G0..G2, P0..P11; ``constexprs``: the mask's compile-time arguments (EVEN_N included).
    """

    tensors: tuple
    strides: tuple
    lengths: tuple
    coords: tuple
    constexprs: dict
    tune_key: tuple


def _mask_args(block_mask: SparseBlockMask) -> _MaskArgs:
    cached = block_mask.derived.get("block_sparse_launch")
    if cached is not None:
        return cached
    spec = block_mask.spec
    num, idx = block_mask.kv_num_blocks, block_mask.kv_indices
    fnum, fidx = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    assert fnum is not None and fidx is not None
    mb, mh = num.shape[:2]
    nqb, nkb = block_mask.num_q_blocks, block_mask.num_kv_blocks
    Lq, Lk = block_mask.q_len, block_mask.kv_len
    if spec is None:
        kind, text_mode, n_text, n_vis, grid3, params, table = KIND_NONE, 0, 0, Lk, (1, 1, 1), (0,) * 12, None
        ndim, has_dil = 1, False
    else:
        kind, text_mode, n_text, n_vis = spec.kind, spec.text_mode, spec.num_text, spec.num_visual
        grid3, params, table = spec.kernel_grid(), spec.kernel_params(), spec.kernel_table(num.device)
        ndim, has_dil = spec.kernel_ndim, spec.kernel_has_dilation
    stride_th = 0
    if table is None:
        table = num
    elif table.shape[0] > 1:
        stride_th = table.stride(0)
    len_bucket = _next_pow2(max(Lq, Lk))  # autotuning key only: long sequences tune apart from short ones
    constexprs = dict(
        Q_BLOCK=block_mask.q_block_size, KV_BLOCK=block_mask.kv_block_size, MASK_KIND=kind, TEXT_MODE=text_mode,
        NDIM=ndim, HAS_DIL=has_dil, HAS_PARTIAL=block_mask.num_partial > 0,
    )
    args = _MaskArgs(
        tensors=(num, idx, fnum, fidx, table),
        strides=(mh * nqb if mb > 1 else 0, nqb if mh > 1 else 0, mh * nqb * nkb if mb > 1 else 0,
                 nqb * nkb if mh > 1 else 0, stride_th),
        lengths=(Lq, Lk, nkb, _cdiv(Lq, block_mask.q_block_size), _cdiv(Lk, block_mask.kv_block_size)),
        coords=(len_bucket, n_text, n_vis, *grid3, *params),
        constexprs=constexprs,
        tune_key=(len_bucket, block_mask.q_block_size, block_mask.kv_block_size, kind, text_mode,
                  block_mask.num_partial > 0),
    )
    block_mask.derived["block_sparse_launch"] = args
    return args


_TUNED: dict[tuple, dict] = {}
"""Launch options (``Config.all_kwargs()``) the autotuner chose, per autotuning key (its key plus the dtypes)."""
_last_config: dict | None = None
"""The options of the latest launch (the benchmark reports them)."""


def launch(
    q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor,
    q_scales: torch.Tensor | None, k_scales: torch.Tensor | None, v_scales: torch.Tensor | None,
    block_mask: SparseBlockMask, out: torch.Tensor, lse: torch.Tensor | None, scale: float, dtype: torch.dtype,
) -> None:
    """Run the kernel on prepared operands (see :func:`quantize_inputs`); writes ``out`` (and ``lse``)."""
    B, H, Lq, D = q_in.shape
    qk_int8, pv_int8 = q_scales is not None, v_scales is not None
    head_dim_pad = max(16, _next_pow2(D))
    m = _mask_args(block_mask)
    dummy = out
    # Triton's interpreter (3.9) computes bfloat16 dots wrongly: there, dot operands are upcast to float32 after the
    # same roundings (P is still rounded to bfloat16 first). Compiled kernels use bfloat16 tensor-core dots.
    dot_upcast = _interpreting() and dtype == torch.bfloat16
    args = (
        q_in, k_in, v_in, out, lse if lse is not None else dummy,
        q_scales if qk_int8 else dummy, k_scales if qk_int8 else dummy, v_scales if pv_int8 else dummy,
        *m.tensors,
        *q_in.stride(), *k_in.stride(), *v_in.stride(), *out.stride(),
        *m.strides, H, *m.lengths, scale * LOG2E, *m.coords,
    )
    constexprs = dict(
        m.constexprs, HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad, QK_INT8=qk_int8, PV_INT8=pv_int8,
        RETURN_LSE=lse is not None, DOT_PRECISION="ieee" if dtype == torch.float32 or dot_upcast else "tf32",
        DOT_UPCAST=dot_upcast,
    )
    # The autotuner's key: its key arguments plus the dtype of every tensor argument (fixed by these).
    key = (*m.tune_key, head_dim_pad, qk_int8, pv_int8, lse is not None, dtype, q_in.dtype, v_in.dtype)
    global _last_config
    config = _TUNED.get(key)
    if config is None:
        grid = lambda meta: (_cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
        _block_sparse_fwd_kernel[grid](*args, **constexprs)
        _TUNED[key] = _last_config = _block_sparse_fwd_kernel.best_config.all_kwargs()
        return
    _last_config = config
    # Same launch as the autotuner's cached path: its chosen config, and the heuristics' EVEN_* values.
    _block_sparse_fwd[(_cdiv(Lq, config["BLOCK_M"]), B * H)](
        *args, **constexprs, **config,
        EVEN_M=Lq % config["BLOCK_M"] == 0, EVEN_N=block_mask.kv_len % block_mask.kv_block_size == 0,
        EVEN_D=D == head_dim_pad,
    )


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: SparseBlockMask,
    *,
    scale: float,
    qk_int8: bool = False,
    pv_int8: bool = False,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Quantize (if asked) and launch. Arguments are validated by :func:`diffaccel.kernels.block_sparse_attention`."""
    B, H, Lq, D = q.shape
    if out is None:
        out = torch.empty(B, H, Lq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device) if return_lse else None
    q_in, k_in, v_in, q_scales, k_scales, v_scales, km = quantize_inputs(q, k, v, block_mask, scale, qk_int8, pv_int8)
    launch(q_in, k_in, v_in, q_scales, k_scales, v_scales, block_mask, out, lse, scale, q.dtype)
    if lse is None:
        return out
    if km is not None:
        # Smoothing shifted each row's logits by scale * q.km; report the unsmoothed log-sum-exp.
        lse += scale * torch.einsum("bhnd,bhd->bhn", q.float(), km)
    return out, lse


# ---------------------------------------------------------------------------------------------------------------
# Benchmark: python -m diffaccel.kernels.block_sparse  (CUDA; prints a table, optional --json PATH)
# ---------------------------------------------------------------------------------------------------------------

BENCH_SHAPES = {
    # name: (batch, heads, text tokens, visual grid, head_dim)  -- see shared BENCHMARKS.md
    "flux-1024": (1, 24, 512, (64, 64), 128),
    "wan13-480": (1, 12, 0, (21, 30, 52), 128),
}


def _chosen_config() -> str:
    c = _last_config
    if c is None:
        return "?"
    return f"{c.get('BLOCK_M')}x{c.get('BLOCK_N')}/w{c.get('num_warps')}/s{c.get('num_stages')}"


def random_block_mask(heads: int, n: int, block: int, density: float, device, seed: int = 0) -> SparseBlockMask:
    """Exactly ``round(density * num_kv_blocks)`` random full key blocks per (head, query block)."""
    if density >= 1.0:
        return SparseBlockMask.dense(n, n, block, device=device)
    nb = triton.cdiv(n, block)
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(1, heads, nb, nb, device=device, generator=gen)
    keep = torch.zeros(1, heads, nb, nb, dtype=torch.bool, device=device)
    keep.scatter_(-1, scores.topk(max(1, round(density * nb)), dim=-1).indices, True)
    return SparseBlockMask.from_block_keep(keep, q_len=n, kv_len=n, q_block_size=block, kv_block_size=block)


def _benchmark(
    shapes: list[str], densities: list[float], block: int, with_flex: bool, json_path: str | None, device: str = "cuda"
) -> None:
    import json
    import time

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from diffaccel.kernels.masks import CircleMask, NeighborhoodMask, TextSpec
    from diffaccel.kernels.reference import block_sparse_attention_reference

    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    gpu_name = torch.cuda.get_device_name() if on_gpu else "cpu (dry run)"
    rows: list[dict] = []
    print(f"# {gpu_name} | torch {torch.__version__} | triton {triton.__version__} | "
          f"CUDA {torch.version.cuda}")

    def timed(fn) -> float:
        fn()
        sync()
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def rel(a, b) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    for name in shapes:
        B, H, T, grid, D = BENCH_SHAPES[name]
        n = T + math.prod(grid)
        gen = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3))
        flops = 4.0 * B * H * n * n * D
        scale = 1.0 / math.sqrt(D)
        sdpa = {}
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            try:
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    sdpa[backend] = timed(lambda: F.scaled_dot_product_attention(q, k, v))
            except Exception as err:  # noqa: BLE001 - report and go on
                print(f"{name}: SDPA {backend} unavailable: {type(err).__name__}")
        best = min(sdpa, key=sdpa.get)
        for backend, ms in sdpa.items():
            rows.append(dict(shape=name, variant=f"sdpa-{backend.lower()}", density=1.0, ms=ms))
        check = name == shapes[0]
        for d in densities:
            bm = random_block_mask(H, n, block, d, dev)
            for variant, kw in (("bf16", {}), ("qk-int8", {"qk_int8": True}), ("qk-int8+pv-int8",
                                                                                  {"qk_int8": True, "pv_int8": True})):
                if variant != "bf16" and d not in (1.0, min(densities)):
                    continue
                out = torch.empty_like(q)
                ms = timed(lambda: block_sparse_attention_triton(q, k, v, bm, scale=scale, out=out, **kw))
                row = dict(shape=name, variant=variant, density=bm.density, ms=ms,
                           config=_chosen_config())
                if kw:  # the same call split into quantization and the kernel alone
                    args = quantize_inputs(q, k, v, bm, scale, kw.get("qk_int8", False), kw.get("pv_int8", False))
                    row["quant_ms"] = timed(
                        lambda: quantize_inputs(q, k, v, bm, scale, kw.get("qk_int8", False), kw.get("pv_int8", False))
                    )
                    row["kernel_ms"] = timed(lambda: launch(*args[:6], bm, out, None, scale, q.dtype))
                if check:
                    ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), bm, scale=scale)
                    row["rel_l2_vs_fp32"] = rel(out, ref)
                rows.append(row)
            if with_flex and name == shapes[0]:
                try:
                    from torch.nn.attention.flex_attention import flex_attention

                    flex = torch.compile(flex_attention, dynamic=False)
                    fbm = bm.to_block_mask()
                    rows.append(dict(shape=name, variant="flex-compiled", density=bm.density,
                                     ms=timed(lambda: flex(q, k, v, block_mask=fbm))))
                except Exception as err:  # noqa: BLE001
                    print(f"{name}: FlexAttention failed: {type(err).__name__}: {str(err)[:200]}")
        # Structured masks with partial blocks (element mask evaluated in-kernel): GNA neighborhood; CLEAR circle.
        text = TextSpec(T, "prefix") if T else None
        if len(grid) == 2:
            ks = (grid[0] // 2, grid[1] // 2)
            specs = [NeighborhoodMask(grid, ks, (min(16, ks[0]), min(16, ks[1])), text=text),
                     CircleMask(grid, max(1, grid[0] // 4), text=text)]
        else:
            specs = [NeighborhoodMask(grid, (max(1, grid[0] // 3), grid[1] // 2, grid[2] // 2), (1, 1, 1), text=text)]
        for spec in specs:
            t0 = time.time()
            bm = SparseBlockMask.from_spec(spec, block, device=dev)
            sync()
            build_s = time.time() - t0
            out = torch.empty_like(q)
            ms = timed(lambda: block_sparse_attention_triton(q, k, v, bm, scale=scale, out=out))
            is_na = isinstance(spec, NeighborhoodMask)
            label = f"bf16-gna{spec.kernel_size}" if is_na else f"bf16-circle-r{spec.radius}"
            row = dict(shape=name, variant=label, density=bm.density, ms=ms,
                       partial_fraction=bm.num_partial / max(1, bm.num_partial + bm.num_full), mask_build_s=build_s,
                       config=_chosen_config())
            # Same blocks, all treated as full: the cost of evaluating the element mask on partial tiles.
            full, partial = bm.block_keep()
            as_full = SparseBlockMask.from_block_keep(full | partial, q_len=n, kv_len=n, q_block_size=block,
                                                      kv_block_size=block)
            row["same_blocks_no_mask_ms"] = timed(
                lambda: block_sparse_attention_triton(q, k, v, as_full, scale=scale, out=out))
            if check:
                ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), bm, scale=scale)
                block_sparse_attention_triton(q, k, v, bm, scale=scale, out=out)
                row["rel_l2_vs_fp32"] = rel(out, ref)
            rows.append(row)
        for row in rows:
            if row["shape"] == name:
                row["dense_equiv_tflops"] = flops / row["ms"] * 1e-9
                row["speedup_vs_best_sdpa"] = sdpa[best] / row["ms"]
                row["best_sdpa"] = best
        print(f"\n{name}: B={B} H={H} N={n} D={D}, block {block}, best SDPA = {best}")
        print(f"{'variant':28s} {'density':>7s} {'ms':>8s} {'TFLOP/s*':>9s} {'x SDPA':>7s} {'relL2':>8s}  notes")
        for row in rows:
            if row["shape"] == name:
                err = f"{row['rel_l2_vs_fp32']:.2e}" if "rel_l2_vs_fp32" in row else ""
                notes = " ".join(f"{key}={row[key]:.3f}" for key in ("quant_ms", "kernel_ms", "same_blocks_no_mask_ms",
                                                                      "partial_fraction", "mask_build_s") if key in row)
                print(f"{row['variant']:28s} {row['density']:7.3f} {row['ms']:8.3f} {row['dense_equiv_tflops']:9.1f} "
                      f"{row['speedup_vs_best_sdpa']:7.2f} {err:>8s}  {notes} {row.get('config', '')}")
        del q, k, v
        if on_gpu:
            torch.cuda.empty_cache()
    print("(* dense-equivalent: 4*B*H*N^2*D / time)")
    if json_path:
        meta = dict(device=gpu_name, torch=torch.__version__, triton=triton.__version__,
                    cuda=torch.version.cuda, block=block)
        with open(json_path, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Block-sparse attention kernel vs SDPA (CUDA).")
    parser.add_argument("--shapes", nargs="+", default=list(BENCH_SHAPES), choices=list(BENCH_SHAPES))
    parser.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.5, 0.25])
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--flex", action="store_true", help="also time compiled FlexAttention (first shape only)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    _benchmark(args.shapes, args.densities, args.block, args.flex, args.json)
