"""Exact attention over a union of key sets from the attentions over each set (log-sum-exp merge).

As NATTEN's ``merge_attentions`` (``research/locality.md`` §1.6): with ``m = max_i lse_i``,
``out = sum_i exp(lse_i - m) * out_i / sum_i exp(lse_i - m)``.
"""

from __future__ import annotations

import torch

__all__ = ["merge_by_lse"]


def merge_by_lse(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """Merge ``(out_i, lse_i)`` pairs (``(B, H, N, D)`` outputs, ``(B, H, N)`` natural-log LSEs) into ``dtype``.

    Rows whose every part is empty (``lse = -inf``) get zeros.
    """
    lses = torch.stack([lse for _, lse in parts])
    m = lses.amax(dim=0)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    weights = torch.exp(lses - m)
    total = weights.sum(dim=0)
    out = sum(w.unsqueeze(-1) * o.float() for w, (o, _) in zip(weights, parts))
    return (out / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)).to(dtype)
