"""Plain PyTorch references for :mod:`diffaccel.kernels.stats` (CPU fallback and test oracle).

Both functions work in float32 and process queries in chunks, so a CPU fallback on a long sequence needs
memory for ``chunk x N_k`` scores per (batch, head), never ``N_q x N_k`` at once.
(These will move into ``diffaccel/kernels/reference.py``.)
"""

from __future__ import annotations

import math

import torch

# Queries per chunk in the references: bounds the float32 score buffer to heads * _CHUNK * N_k elements per batch.
_CHUNK = 1024


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
    for start in range(0, q.shape[-2], _CHUNK):
        s = torch.matmul(q[..., start : start + _CHUNK, :].float(), kf.transpose(-1, -2)) * scale
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
    chunk = max(block_q, (_CHUNK // block_q) * block_q)  # whole query blocks per chunk
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
