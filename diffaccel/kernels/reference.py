"""Plain PyTorch versions of the kernels: the definitions the Triton kernels are tested against, and the CPU path.

Everything here materializes attention scores for a chunk of query rows at a time (memory bounded by
``_CHUNK_ELEMENTS`` scores), computes in float32 and returns the input dtype, like the kernels.
"""

from __future__ import annotations

import math

import torch

from diffaccel.kernels.masks import SparseBlockMask

_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------------


def materialize_mask(
    block_mask: SparseBlockMask, rows: torch.Tensor | None = None, token_order: torch.Tensor | None = None
) -> torch.Tensor:
    """The element mask a :class:`SparseBlockMask` keeps, ``(B or 1, H or 1, len(rows), kv_len)`` bool.

    An element is kept when its key block is full for its query block, or partial and the spec's ``mask_mod``
    keeps it. ``rows`` selects query positions (default: all); use it to bound memory on long sequences.
    With ``token_order`` (``(tokens,)`` or ``(heads, tokens)``), positions are kernel positions: blocks are read
    at kernel positions and the ``mask_mod`` at the sequence positions ``token_order[..., i]``.
    """
    device = block_mask.device
    if rows is None:
        rows = torch.arange(block_mask.q_len, device=device)
    rows = rows.to(device)
    full, partial = block_mask.block_keep()
    kv = torch.arange(block_mask.kv_len, device=device)
    qb = rows // block_mask.q_block_size
    kb = kv // block_mask.kv_block_size
    keep_full = full[:, :, qb][..., kb]
    keep_part = partial[:, :, qb][..., kb]
    spec = block_mask.spec
    if spec is None:
        return keep_full | keep_part
    bm, hm = full.shape[:2]
    # A per-head spec (e.g. a TileMask with one global-frame tuple per head) under a head-broadcast block mask
    # still has one element mask per head.
    hm = max(hm, getattr(spec, "num_mask_heads", 1))
    b = torch.arange(bm, device=device).view(-1, 1, 1, 1)
    if token_order is None:
        q_pos, k_pos = rows.view(1, 1, -1, 1), kv.view(1, 1, 1, -1)
    else:
        order = token_order.to(device).long().reshape(-1, block_mask.q_len)
        q_pos = order[:, rows].view(1, order.shape[0], -1, 1)
        k_pos = order.view(1, order.shape[0], 1, -1)
        hm = max(hm, order.shape[0])
    h = torch.arange(hm, device=device).view(1, -1, 1, 1)
    elem = spec.mask_mod(b, h, q_pos, k_pos)
    return keep_full | (keep_part & elem)


def gather_tokens(x: torch.Tensor, token_order: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``(B, H, N, D)`` in kernel order: ``out[:, h, i] = x[:, h, token_order[(h,) i]]``."""
    order = token_order.to(x.device).long()
    if order.dim() == 1:
        return x.index_select(2, order)
    return torch.gather(x, 2, order[None, :, :, None].expand(x.shape[0], -1, -1, x.shape[-1]))


def scatter_tokens(x: torch.Tensor, token_order: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`gather_tokens` for ``(B, H, N, D)`` or ``(B, H, N)`` tensors: rows back in sequence order."""
    order = token_order.to(x.device).long()
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(-1)
    index = (order if order.dim() == 2 else order.expand(x.shape[1], -1))[None, :, :, None]
    out = torch.empty_like(x).scatter_(2, index.expand(x.shape[0], -1, -1, x.shape[-1]), x)
    return out.squeeze(-1) if squeeze else out


# ---------------------------------------------------------------------------------------------------------------
# Quantization (the definitions kernels/quant.py implements in Triton)
# ---------------------------------------------------------------------------------------------------------------


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties away from zero (what ``(x + 0.5*sign(x))`` truncated gives)."""
    return torch.where(x >= 0, x + 0.5, x - 0.5).trunc()


def quantize_per_block_reference(
    x: torch.Tensor, block_size: int, *, mean: torch.Tensor | None = None, premultiply: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 per block of ``block_size`` tokens: ``x ≈ x_int8 * scale`` per (batch, head, block).

    ``mean`` ``(B, H, D)`` is subtracted first (K smoothing, SageAttention). The stored scale is
    ``absmax / 127 * premultiply`` (fold the softmax scale into Q's scale). Returns ``(int8 (B, H, N, D), float32
    scales (B, H, ceil(N / block_size)))``; an all-zero block gets scale ``premultiply`` and zeros.
    """
    B, H, N, D = x.shape
    xf = x.float()
    if mean is not None:
        xf = xf - mean.float().unsqueeze(2)
    nb = -(-N // block_size)
    pad = nb * block_size - N
    xp = torch.nn.functional.pad(xf, (0, 0, 0, pad)).view(B, H, nb, block_size, D)
    amax = xp.abs().amax(dim=(3, 4))
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = round_half_away(xp / scale[..., None, None]).clamp(-127, 127).to(torch.int8)
    return q.view(B, H, nb * block_size, D)[:, :, :N].contiguous(), (scale * premultiply).contiguous()


def quantize_per_channel_reference(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 per (batch, head, channel) over all tokens: returns ``(int8 like v, float32 (B, H, D))``."""
    vf = v.float()
    amax = vf.abs().amax(dim=2)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = round_half_away(vf / scale.unsqueeze(2)).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Block-sparse attention
# ---------------------------------------------------------------------------------------------------------------


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: SparseBlockMask,
    *,
    scale: float | None = None,
    qk_int8: bool = False,
    pv_int8: bool = False,
    return_lse: bool = False,
    token_order: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention restricted to the elements ``block_mask`` keeps (see :func:`materialize_mask`), in float32.

    ``token_order``: see :func:`diffaccel.kernels.block_sparse_attention`; inputs are gathered into kernel order,
    the mask evaluated there (element masks on sequence positions) and the outputs scattered back.

    Rows with no kept key give zeros and log-sum-exp ``-inf``. ``qk_int8`` simulates the kernel's quantization:
    K smoothed by its per-channel token mean, Q and K quantized per mask block (Q blocks of ``q_block_size``, K
    blocks of ``kv_block_size`` tokens), scores dequantized; the log-sum-exp is corrected for the smoothing so it
    is the unsmoothed one. ``pv_int8`` quantizes probabilities with the fixed scale 127 and V per channel
    (PARO); it uses each row's final maximum, where the kernel uses the running one (finer), so the two agree to
    within the quantization error, not exactly.
    """
    if token_order is not None:
        res = block_sparse_attention_reference(
            gather_tokens(q, token_order), gather_tokens(k, token_order), gather_tokens(v, token_order),
            _OrderedMask(block_mask, token_order), scale=scale, qk_int8=qk_int8, pv_int8=pv_int8,
            return_lse=return_lse,
        )
        if return_lse:
            return scatter_tokens(res[0], token_order), scatter_tokens(res[1], token_order)
        return scatter_tokens(res, token_order)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    block_mask = block_mask.to(q.device)
    km = None
    if qk_int8:
        km = k.float().mean(dim=2)
        q8, qs = quantize_per_block_reference(q, block_mask.q_block_size, premultiply=scale)
        k8, ks = quantize_per_block_reference(k, block_mask.kv_block_size, mean=km)
        qs_row = qs.repeat_interleave(block_mask.q_block_size, dim=-1)[..., :Lq]
        ks_col = ks.repeat_interleave(block_mask.kv_block_size, dim=-1)[..., :Lk]
        kf = k8.float()
    else:
        kf = k.float()
    if pv_int8:
        v8, vs = quantize_per_channel_reference(v)
        vf = v8.float()
    else:
        vf = v.float()
    out = torch.empty(B, H, Lq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, B * H * Lk))
    for r0 in range(0, Lq, rows_per_chunk):
        rows = torch.arange(r0, min(Lq, r0 + rows_per_chunk), device=q.device)
        keep = (
            materialize_mask(block_mask.mask, rows, block_mask.token_order)
            if isinstance(block_mask, _OrderedMask) else materialize_mask(block_mask, rows)
        )
        if qk_int8:
            s = (q8[:, :, rows].float() @ kf.transpose(-1, -2)) * qs_row[:, :, rows, None] * ks_col[:, :, None, :]
        else:
            s = (q[:, :, rows].float() @ kf.transpose(-1, -2)) * scale
        s = s.masked_fill(~keep, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m)
        l = p.sum(dim=-1, keepdim=True)
        if pv_int8:
            o = (torch.floor(p * 127.0 + 0.5) @ vf) * (vs.unsqueeze(2) / 127.0)
        else:
            o = p @ vf
        out[:, :, rows] = (o / torch.where(l > 0, l, torch.ones_like(l))).to(q.dtype)
        lse[:, :, rows] = torch.where(l > 0, m + torch.log(l), torch.full_like(l, float("-inf"))).squeeze(-1)
    if not return_lse:
        return out
    if km is not None:
        # Smoothing shifted every logit of a row by scale * q.km; add it back (SageAttention does the same).
        lse = lse + scale * torch.einsum("bhnd,bhd->bhn", q.float(), km)
    return out, lse


class _OrderedMask:
    """A block mask with the token order its element mask is read through (internal to the reference)."""

    def __init__(self, mask: SparseBlockMask, token_order: torch.Tensor) -> None:
        self.mask, self.token_order = mask, token_order
        self.q_block_size, self.kv_block_size = mask.q_block_size, mask.kv_block_size

    def to(self, device: torch.device | str) -> "_OrderedMask":
        return _OrderedMask(self.mask.to(device), self.token_order)


# ---------------------------------------------------------------------------------------------------------------
# Statistics of a dense pass (kernels/stats.py): LSE and block attention mass
# ---------------------------------------------------------------------------------------------------------------

# Queries per chunk in the references: bounds the float32 score buffer to heads * _STATS_CHUNK * N_k elements per batch.
_STATS_CHUNK = 1024


def attention_with_lse_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense softmax attention in float32 that also returns the natural-log log-sum-exp of each query row.

    Args:
        q: (batch, heads, N_q, head_dim); k, v: (batch, heads, N_k, head_dim).
        scale: logit scale, ``1 / sqrt(head_dim)`` when None.

    Returns:
        ``(out, lse)``: ``out`` (batch, heads, N_q, head_dim) in ``q.dtype``; ``lse`` (batch, heads, N_q) float32,
        ``lse[b, h, i] = log(sum_j exp(scale * q_i . k_j))``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kf, vf = k.float(), v.float()
    outs, lses = [], []
    for start in range(0, q.shape[-2], _STATS_CHUNK):
        s = torch.matmul(q[..., start : start + _STATS_CHUNK, :].float(), kf.transpose(-1, -2)) * scale
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse.unsqueeze(-1)), vf))
        lses.append(lse)
    return torch.cat(outs, dim=-2).to(q.dtype), torch.cat(lses, dim=-1)


def block_attention_mass_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    block_size: int | tuple[int, int],
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax probability mass of each (query block, key block) tile, given the rows' log-sum-exp.

    ``mass[b, h, i, j] = sum_{q in block i, k in block j} exp(scale * q . k - lse[b, h, q])``; tail blocks hold
    fewer tokens (no padding is counted). Each row of blocks sums to the number of queries in the query block
    when ``lse`` is the dense log-sum-exp of the same ``q``, ``k`` and ``scale``.

    Returns:
        (batch, heads, ceil(N_q / block_q), ceil(N_k / block_k)) float32.
    """
    block_q, block_k = (block_size, block_size) if isinstance(block_size, int) else block_size
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[-2]
    n_qb, n_kb = -(-n_q // block_q), -(-n_k // block_k)
    kf = k.float()
    chunk = max(block_q, (_STATS_CHUNK // block_q) * block_q)  # whole query blocks per chunk
    rows = []
    for start in range(0, n_q, chunk):
        qc = q[..., start : start + chunk, :].float()
        p = torch.exp(torch.matmul(qc, kf.transpose(-1, -2)) * scale - lse[..., start : start + chunk, None].float())
        n = p.shape[-2]
        # Zero-pad both axes to whole blocks, then sum each tile (zeros add nothing; a NaN stays in its tile).
        p = torch.nn.functional.pad(p, (0, n_kb * block_k - n_k, 0, -n % block_q))
        tiles = p.view(batch, heads, p.shape[-2] // block_q, block_q, n_kb, block_k)
        rows.append(tiles.sum(dim=(-3, -1)))
    out = torch.cat(rows, dim=-2)
    assert out.shape[-2] == n_qb
    return out


# ---------------------------------------------------------------------------------------------------------------
# Block scores (VMoBA's router: query . mean key of a key partition)
# ---------------------------------------------------------------------------------------------------------------


def block_scores_reference(
    q: torch.Tensor,
    centroids: torch.Tensor,
    block_size: int,
    *,
    token_order: torch.Tensor | None = None,
    per_query: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores ``q . c_p`` (unscaled, float32) of every query against every centroid ``c_p``.

    Returns ``(block_mean, scores)``: ``block_mean`` ``(B, H, ceil(N / block_size), P)`` is the mean over the
    queries of each block of ``block_size`` consecutive kernel positions (rows of ``q`` read through
    ``token_order`` when given); ``scores`` ``(B, H, N, P)`` in kernel order when ``per_query``, else None.
    """
    qk = q if token_order is None else gather_tokens(q, token_order)
    s = torch.einsum("bhnd,bhpd->bhnp", qk.float(), centroids.float())
    B, H, N, P = s.shape
    nb = -(-N // block_size)
    padded = torch.nn.functional.pad(s, (0, 0, 0, nb * block_size - N)).view(B, H, nb, block_size, P)
    counts = torch.full((nb,), float(block_size), device=s.device)
    counts[-1] = N - (nb - 1) * block_size
    mean = padded.sum(3) / counts.view(1, 1, nb, 1)
    return mean, (s if per_query else None)
