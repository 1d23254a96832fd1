"""Block-sparse flash attention forward in Triton: full key blocks unmasked, partial key blocks with an element mask.

Algorithm: FlashAttention-2 (Dao, arXiv 2307.08691) as in Triton's fused-attention tutorial: one program per
(query tile, batch*head), online softmax with running max and sum in the exp2 domain (log2(e) folded into the
scale), fp32 accumulation. Sparsity follows FlexAttention's block masks (Dong et al., arXiv 2412.05496): per
query block the program walks the *indices* of the kept key blocks (never the whole key range), first the full
blocks with no element mask, then the partial ones, whose element mask is the spec's ``@triton.jit`` predicate
(``MASK_FN``, a constexpr JIT function, with its packed int32 parameters ``Params``; see
:mod:`diffaccel.kernels.masks.base`) evaluated on token coordinates. The kernel knows no mask kind by name.

Token order (``HAS_ORDER``, a constexpr: the contiguous path has no extra loads): kernel position ``i`` holds
sequence row ``Order[h, i]``. Q rows and K/V tiles are gathered through it, the output and LSE rows scattered back
through it, and the element mask is evaluated on the gathered sequence positions, so a tile-major or per-head
permuted layout costs no full-tensor gather/scatter pass around the kernel. INT8 Q/K are quantized in kernel order
(the quantization pass reads through the order), so the kernel reads them contiguously (``QK_ORDER`` off).

Precision options: ``QK_INT8`` multiplies INT8 Q and K (per-block scales, K smoothed; SageAttention, arXiv
2410.02367) with int32 accumulation; ``PV_INT8`` quantizes P with the fixed scale 127 after the running max and
multiplies with per-channel INT8 V (the scheme of PARO, arXiv 2506.16054).

Density 1 with no INT8, LSE or order-dependent output goes to ``F.scaled_dot_product_attention`` in
:mod:`diffaccel.kernels.dispatch`, not here: this FA2-style loop measured 0.69-0.79x cuDNN on an H100.

Block sizes are autotuned per (mask block sizes, head_dim, predicate, precision, power-of-two length bucket) from
``_CONFIGS``; ``DIFFACCEL_AUTOTUNE=0`` uses one default config instead (tests do, to keep compile time down).
The benchmark is ``diffaccel bench kernels`` (``benchmarks/bench_kernels.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from diffaccel.kernels._util import _cdiv, _interpreting, _next_pow2
from diffaccel.kernels.masks import SparseBlockMask, keep_all
from diffaccel.kernels.quant import LOG2E, quantize_inputs


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
# Main loop and kernel
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _element_mask(
    pos_m, pos_n, h, Params, n_text, n_vis, G0, G1, G2,
    MASK_FN: tl.constexpr, MASK_VARIANT: tl.constexpr, TEXT_MODE: tl.constexpr, NDIM: tl.constexpr,
):
    """The spec's element mask on a (BLOCK_M, BLOCK_N) tile of *sequence* positions (bounds not included).

    Text handling is generic (TEXT_MODE 1: text prefix of ``n_text`` tokens, 2: text after the ``n_vis`` visual
    tokens; text rows and columns are dense); the visual part is the spec's predicate ``MASK_FN`` on row-major grid
    coordinates (contract: :mod:`diffaccel.kernels.masks.base`).
    """
    if TEXT_MODE == 1:
        q_text = pos_m < n_text
        k_text = pos_n < n_text
        vq = pos_m - n_text
        vk = pos_n - n_text
    elif TEXT_MODE == 2:
        q_text = pos_m >= n_vis
        k_text = pos_n >= n_vis
        vq = pos_m
        vk = pos_n
    else:
        vq = pos_m
        vk = pos_n
    vq = tl.minimum(tl.maximum(vq, 0), n_vis - 1)
    vk = tl.minimum(tl.maximum(vk, 0), n_vis - 1)
    q0, q1, q2 = _coords3(vq, G1, G2)
    k0, k1, k2 = _coords3(vk, G1, G2)
    keep = MASK_FN(q0, q1, q2, k0, k1, k2, h, Params, G0, G1, G2, NDIM, MASK_VARIANT)
    if TEXT_MODE != 0:
        keep = keep | q_text[:, None] | k_text[None, :]
    return keep


@triton.jit
def _coords3(v, G1, G2):
    """Row-major (c0, c1, c2) of flat visual indices on a (G0, G1, G2) grid."""
    c2 = v % G2
    t = v // G2
    return t // G1, t % G1, c2


@triton.jit
def _attend_tiles(
    acc, l_i, m_i, q, q_scale, pos_m,
    K, V, KScale, Order, Idx, it_start, it_end,
    offs_d, h, stride_kn, stride_kd, stride_vn, stride_vd,
    kv_len, qk_scale,
    Params, n_text, n_vis, G0, G1, G2,
    KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    EVEN_D: tl.constexpr, BOUNDS: tl.constexpr, APPLY_MASK: tl.constexpr,
    MASK_FN: tl.constexpr, MASK_VARIANT: tl.constexpr, TEXT_MODE: tl.constexpr, NDIM: tl.constexpr,
    HAS_ORDER: tl.constexpr, QK_ORDER: tl.constexpr,
    QK_INT8: tl.constexpr, PV_INT8: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Online-softmax update over key tiles ``it_start .. it_end`` of the block list ``Idx``.

    Tile ``it`` is sub-tile ``it % (KV_BLOCK // BLOCK_N)`` of key block ``Idx[it // (KV_BLOCK // BLOCK_N)]``.
    ``BOUNDS`` masks keys past ``kv_len`` (only the sequence's last key block needs it); ``APPLY_MASK`` evaluates the
    element mask (partial blocks). With ``HAS_ORDER`` the tile's kernel positions are mapped to sequence rows
    through ``Order``: V (and K when ``QK_ORDER``; INT8 K is already in kernel order) is read at those rows and the
    element mask evaluated there.
    """
    for it in range(it_start, it_end):
        kv_blk = tl.load(Idx + it // (KV_BLOCK // BLOCK_N))
        start_n = kv_blk * KV_BLOCK + (it % (KV_BLOCK // BLOCK_N)) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if HAS_ORDER:
            if BOUNDS:
                pos_n = tl.load(Order + offs_n, mask=offs_n < kv_len, other=0)
            else:
                pos_n = tl.load(Order + offs_n)
        else:
            pos_n = offs_n
        if QK_ORDER:
            rows_k = pos_n
        else:
            rows_k = offs_n
        k_ptrs = K + rows_k[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = V + pos_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
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
            keep = _element_mask(pos_m, pos_n, h, Params, n_text, n_vis, G0, G1, G2,
                                 MASK_FN, MASK_VARIANT, TEXT_MODE, NDIM)
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
            # P is in [0, 1] after subtracting the running max: a fixed scale of 127, rounded to nearest.
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


@triton.jit
def _attend_list(
    acc, l_i, m_i, q, q_scale, pos_m,
    K, V, KScale, Order, Idx, n_blocks, num_kv_blocks,
    offs_d, h, stride_kn, stride_kd, stride_vn, stride_vd,
    kv_len, qk_scale,
    Params, n_text, n_vis, G0, G1, G2,
    KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, APPLY_MASK: tl.constexpr,
    MASK_FN: tl.constexpr, MASK_VARIANT: tl.constexpr, TEXT_MODE: tl.constexpr, NDIM: tl.constexpr,
    HAS_ORDER: tl.constexpr, QK_ORDER: tl.constexpr,
    QK_INT8: tl.constexpr, PV_INT8: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """One block list (full or partial): its tiles without bounds checks, then the sequence's last key block (if
    listed and ragged) with them."""
    main_end, tail_end = _split_tail(Idx, n_blocks, kv_len, num_kv_blocks, KV_BLOCK, BLOCK_N, EVEN_N)
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, q_scale, pos_m, K, V, KScale, Order, Idx, 0, main_end,
        offs_d, h, stride_kn, stride_kd, stride_vn, stride_vd, kv_len, qk_scale,
        Params, n_text, n_vis, G0, G1, G2,
        KV_BLOCK, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, EVEN_D, False, APPLY_MASK,
        MASK_FN, MASK_VARIANT, TEXT_MODE, NDIM, HAS_ORDER, QK_ORDER, QK_INT8, PV_INT8, DOT_PRECISION, DOT_UPCAST,
    )
    if not EVEN_N:
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, q_scale, pos_m, K, V, KScale, Order, Idx, main_end, tail_end,
            offs_d, h, stride_kn, stride_kd, stride_vn, stride_vd, kv_len, qk_scale,
            Params, n_text, n_vis, G0, G1, G2,
            KV_BLOCK, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, EVEN_D, True, APPLY_MASK,
            MASK_FN, MASK_VARIANT, TEXT_MODE, NDIM, HAS_ORDER, QK_ORDER, QK_INT8, PV_INT8, DOT_PRECISION, DOT_UPCAST,
        )
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["len_bucket"])
def _block_sparse_fwd(
    Q, K, V, Out, Lse, QScale, KScale, VScale,
    KvNum, KvIdx, FullNum, FullIdx, Params, Order,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_numb, stride_numh, stride_idxb, stride_idxh, stride_order_h,
    num_heads, q_len, kv_len, num_kv_blocks, n_q_scales, n_k_scales, qk_scale, len_bucket,
    n_text, n_vis, G0, G1, G2,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    MASK_FN: tl.constexpr, MASK_VARIANT: tl.constexpr, TEXT_MODE: tl.constexpr, NDIM: tl.constexpr,
    HAS_ORDER: tl.constexpr, QK_ORDER: tl.constexpr,
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
    if HAS_ORDER:
        # Gathered loads / scattered stores: kernel position i is sequence row Order[h, i].
        Order += h.to(tl.int64) * stride_order_h
        if EVEN_M:
            pos_m = tl.load(Order + offs_m)
        else:
            pos_m = tl.load(Order + offs_m, mask=offs_m < q_len, other=0)
    else:
        pos_m = offs_m
    if QK_ORDER:
        rows_q = pos_m
    else:
        rows_q = offs_m
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q_ptrs = Q + rows_q[:, None] * stride_qm + offs_d[None, :] * stride_qd
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
    acc, l_i, m_i = _attend_list(
        acc, l_i, m_i, q, q_scale, pos_m, K, V, KScale, Order, FullIdx + idx_off, tl.load(FullNum + num_off),
        num_kv_blocks, offs_d, h, stride_kn, stride_kd, stride_vn, stride_vd, kv_len, qk_scale,
        Params, n_text, n_vis, G0, G1, G2,
        KV_BLOCK, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, EVEN_N, EVEN_D, False,
        MASK_FN, MASK_VARIANT, TEXT_MODE, NDIM, HAS_ORDER, QK_ORDER, QK_INT8, PV_INT8, DOT_PRECISION, DOT_UPCAST,
    )
    # Partial key blocks: element mask from token coordinates.
    if HAS_PARTIAL:
        acc, l_i, m_i = _attend_list(
            acc, l_i, m_i, q, q_scale, pos_m, K, V, KScale, Order, KvIdx + idx_off, tl.load(KvNum + num_off),
            num_kv_blocks, offs_d, h, stride_kn, stride_kd, stride_vn, stride_vd, kv_len, qk_scale,
            Params, n_text, n_vis, G0, G1, G2,
            KV_BLOCK, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, EVEN_N, EVEN_D, True,
            MASK_FN, MASK_VARIANT, TEXT_MODE, NDIM, HAS_ORDER, QK_ORDER, QK_INT8, PV_INT8, DOT_PRECISION, DOT_UPCAST,
        )

    if PV_INT8:
        v_scale = tl.load(VScale + pid_bh * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        acc = acc * (v_scale / 127.0)[None, :]
    # Rows with no kept key (l == 0) get zeros and LSE -inf.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    Out += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    o_ptrs = Out + pos_m[:, None] * stride_om + offs_d[None, :] * stride_od
    if EVEN_M and EVEN_D:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM))
    if RETURN_LSE:
        lse = tl.where(l_i > 0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(Lse + pid_bh.to(tl.int64) * q_len + pos_m, lse, mask=offs_m < q_len)


# The first call per tuning key goes through Triton's autotuner (benchmarks the configs, or takes the single pruned
# one); later calls launch the JIT function directly with the config it chose (see ``launch``), skipping the
# autotuner's and heuristics' per-call Python work (key building over all ~70 arguments, argument dicts).
_block_sparse_fwd_kernel = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in _CONFIGS],
    key=["len_bucket", "Q_BLOCK", "KV_BLOCK", "HEAD_DIM_PAD", "MASK_FN", "MASK_VARIANT", "TEXT_MODE", "QK_INT8",
         "PV_INT8", "HAS_PARTIAL", "HAS_ORDER"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(triton.heuristics({
    "EVEN_M": lambda a: a["q_len"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["kv_len"] % a["KV_BLOCK"] == 0,
    "EVEN_D": lambda a: a["HEAD_DIM"] == a["HEAD_DIM_PAD"],
})(_block_sparse_fwd))


@dataclass(frozen=True)
class _MaskArgs:
    """Everything the kernel takes from one block mask, derived once per mask (cached on it by :func:`_mask_args`).

    ``tensors``: KvNum, KvIdx, FullNum, FullIdx, Params (the spec's packed predicate parameters); ``strides``: the
    mask's batch/head strides; ``lengths``: q_len, kv_len, num_kv_blocks, n_q_scales, n_k_scales; ``coords``:
    len_bucket, n_text, n_vis, G0..G2; ``constexprs``: the mask's compile-time arguments.
    """

    tensors: tuple
    strides: tuple
    lengths: tuple
    coords: tuple
    constexprs: dict
    tune_key: tuple
    launches: dict = field(default_factory=dict, compare=False)
    """Per (head_dim, precision, LSE, order, dtypes): the prepared keyword arguments of a direct launch."""


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
        mask_fn, variant, text_mode, n_text, n_vis, grid3, params = keep_all, 0, 0, 0, Lk, (1, 1, 1), num
        ndim = 1
    else:
        mask_fn, variant, text_mode = type(spec).mask_fn, spec.kernel_variant, spec.text_mode
        n_text, n_vis, grid3 = spec.num_text, spec.num_visual, spec.kernel_grid()
        params, ndim = spec.kernel_param_tensor(num.device), spec.kernel_ndim
    has_partial = block_mask.may_have_partial
    len_bucket = _next_pow2(max(Lq, Lk))  # autotuning key only: long sequences tune apart from short ones
    constexprs = dict(
        Q_BLOCK=block_mask.q_block_size, KV_BLOCK=block_mask.kv_block_size, MASK_FN=mask_fn, MASK_VARIANT=variant,
        TEXT_MODE=text_mode, NDIM=ndim, HAS_PARTIAL=has_partial,
    )
    args = _MaskArgs(
        tensors=(num, idx, fnum, fidx, params),
        strides=(mh * nqb if mb > 1 else 0, nqb if mh > 1 else 0, mh * nqb * nkb if mb > 1 else 0,
                 nqb * nkb if mh > 1 else 0),
        lengths=(Lq, Lk, nkb, _cdiv(Lq, block_mask.q_block_size), _cdiv(Lk, block_mask.kv_block_size)),
        coords=(len_bucket, n_text, n_vis, *grid3),
        constexprs=constexprs,
        tune_key=(len_bucket, block_mask.q_block_size, block_mask.kv_block_size, mask_fn.__name__, variant,
                  text_mode, has_partial),
    )
    block_mask.derived["block_sparse_launch"] = args
    return args


_TUNED: dict[tuple, dict] = {}
"""Launch options (``Config.all_kwargs()``) the autotuner chose, per autotuning key (its key plus the dtypes)."""
_last_config: dict | None = None
"""The options of the latest launch (benchmarks report them)."""


def launch(
    q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor,
    q_scales: torch.Tensor | None, k_scales: torch.Tensor | None, v_scales: torch.Tensor | None,
    block_mask: SparseBlockMask, out: torch.Tensor, lse: torch.Tensor | None, scale: float, dtype: torch.dtype,
    order: torch.Tensor | None = None,
) -> None:
    """Run the kernel on prepared operands (see :func:`~diffaccel.kernels.quant.quantize_inputs`).

    Writes ``out`` (and ``lse``, contiguous ``(B, H, q_len)``) in sequence order. ``order``: int32 token order,
    contiguous ``(N,)`` or ``(H, N)`` (see :func:`diffaccel.kernels.block_sparse_attention`); INT8 Q/K must then
    have been quantized in kernel order.
    """
    B, H, Lq, D = q_in.shape
    qk_int8, pv_int8 = q_scales is not None, v_scales is not None
    head_dim_pad = max(16, _next_pow2(D))
    m = _mask_args(block_mask)
    dummy = out
    has_order = order is not None
    # Triton's interpreter (3.9) computes bfloat16 dots wrongly: there, dot operands are upcast to float32 after the
    # same roundings (P is still rounded to bfloat16 first). Compiled kernels use bfloat16 tensor-core dots.
    dot_upcast = _interpreting() and dtype == torch.bfloat16
    args = (
        q_in, k_in, v_in, out, lse if lse is not None else dummy,
        q_scales if qk_int8 else dummy, k_scales if qk_int8 else dummy, v_scales if pv_int8 else dummy,
        *m.tensors, order if has_order else dummy,
        *q_in.stride(), *k_in.stride(), *v_in.stride(), *out.stride(),
        *m.strides, (order.stride(0) if has_order and order.dim() == 2 else 0), H, *m.lengths, scale * LOG2E,
        *m.coords,
    )
    global _last_config
    lkey = (D, qk_int8, pv_int8, lse is not None, has_order, dot_upcast, dtype, q_in.dtype, v_in.dtype)
    prepared = m.launches.get(lkey)
    if prepared is not None:  # steady state: one dict lookup, then Triton's binder
        kwargs, block_m, _last_config = prepared
        _block_sparse_fwd[(_cdiv(Lq, block_m), B * H)](*args, **kwargs)
        return
    constexprs = dict(
        m.constexprs, HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad, QK_INT8=qk_int8, PV_INT8=pv_int8,
        RETURN_LSE=lse is not None, DOT_PRECISION="ieee" if dtype == torch.float32 or dot_upcast else "tf32",
        DOT_UPCAST=dot_upcast, HAS_ORDER=has_order, QK_ORDER=has_order and not qk_int8,
    )
    # The autotuner's key: its key arguments plus the dtype of every tensor argument (fixed by these).
    key = (*m.tune_key, head_dim_pad, qk_int8, pv_int8, lse is not None, has_order, dtype, q_in.dtype, v_in.dtype)
    config = _TUNED.get(key)
    if config is None:
        grid = lambda meta: (_cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
        _block_sparse_fwd_kernel[grid](*args, **constexprs)
        _TUNED[key] = _last_config = _block_sparse_fwd_kernel.best_config.all_kwargs()
        return
    _last_config = config
    # Same launch as the autotuner's cached path: its chosen config, and the heuristics' EVEN_* values (q_len and
    # kv_len are the mask's, so these are fixed per mask and launch key).
    kwargs = dict(
        constexprs, **config,
        EVEN_M=Lq % config["BLOCK_M"] == 0, EVEN_N=block_mask.kv_len % block_mask.kv_block_size == 0,
        EVEN_D=D == head_dim_pad,
    )
    m.launches[lkey] = (kwargs, config["BLOCK_M"], config)
    _block_sparse_fwd[(_cdiv(Lq, config["BLOCK_M"]), B * H)](*args, **kwargs)


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
    token_order: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Quantize (if asked) and launch. Arguments are validated by :func:`diffaccel.kernels.block_sparse_attention`
    (or were, once, by the caller of the unchecked entry)."""
    B, H, Lq, D = q.shape
    if out is None:
        out = torch.empty(B, H, Lq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device) if return_lse else None
    order = None
    if token_order is not None:
        order = token_order
        if order.dtype != torch.int32 or not order.is_contiguous():
            order = order.to(torch.int32).contiguous()
    q_in, k_in, v_in, q_scales, k_scales, v_scales, km = quantize_inputs(
        q, k, v, block_mask, scale, qk_int8, pv_int8, order=order)
    launch(q_in, k_in, v_in, q_scales, k_scales, v_scales, block_mask, out, lse, scale, q.dtype, order)
    if lse is None:
        return out
    if km is not None:
        # Smoothing shifted each row's logits by scale * q.km; report the unsmoothed log-sum-exp.
        lse += scale * torch.einsum("bhnd,bhd->bhn", q.float(), km)
    return out, lse
