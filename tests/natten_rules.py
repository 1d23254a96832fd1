"""NATTEN's neighborhood rule written out by hand, once, for every test that needs an independent definition.

Hassani et al., "Neighborhood Attention Transformer" (CVPR 2023) and "Generalized Neighborhood Attention"
(arXiv 2504.16922); semantics of NATTEN's masks as its Flex backend states them (``natten/backends/flex.py``,
``get_na_flex_mask``) and ``research/locality.md`` §1.2. Written per query with Python sets and loops over grid
coordinates, on purpose unlike the vectorized mask specs of :mod:`diffaccel.kernels.masks`, so that the two can
disagree. ``tests/test_natten_oracle.py`` checks these rules against NATTEN itself; the other test modules import
them instead of keeping their own copies.

Per axis of size ``n`` with ``kernel_size`` k, ``stride`` s, ``dilation`` d:

- the axis splits into ``d`` interleaved dilation groups (positions ``g, g + d, g + 2d, ...``); a query only sees
  keys of its own group, and all indices below are positions inside that group (``x // d``);
- queries form stride groups of ``s`` consecutive positions; the group's *leader* is its center-most query
  (the right one of the two centers when ``s`` is even), clipped to the last position of the dilation group;
- non-causal: the window of ``k`` keys is centered on the leader (``k // 2`` before, ``k // 2`` after for odd k,
  one fewer after for even k) and slid inward at the borders, so every query sees exactly ``k`` keys;
- causal: the leader is the group's last query (clipped); a query sees the keys at or before itself that lie less
  than ``k`` positions before the leader.

The multi-dimensional mask is the AND of the per-axis masks. Text tokens of joint attention are dense: text queries
see every key, visual queries see every text key plus their visual neighborhood.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch

__all__ = [
    "coords",
    "masked_attention",
    "natten_axis",
    "neighborhood_keep",
    "per_dim",
    "with_text",
]


def natten_axis(n: int, k: int, s: int, d: int, causal: bool, x: int) -> set[int]:
    """Keys of query ``x`` on one axis of size ``n``: the set of key positions (0..n-1) it attends to."""
    group, xi = x % d, x // d
    size = len(range(group, n, d))  # positions in this dilation group
    if causal:
        leader = min((xi // s) * s + s - 1, size - 1)
        keys = [j for j in range(size) if j <= xi and leader - j < k]
    else:
        leader = min((xi // s) * s + s // 2, size - 1)
        before = k // 2
        after = k // 2 if k % 2 else k // 2 - 1
        center = min(max(leader, before), size - 1 - after)
        keys = list(range(center - before, center + after + 1))
    return {j * d + group for j in keys}


def per_dim(value: int | bool | Sequence, ndim: int) -> tuple:
    """One value per grid dimension (a scalar is repeated)."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * ndim


def coords(grid: Sequence[int]) -> list[tuple[int, ...]]:
    """Grid coordinates in row-major order (the order diffusers models flatten latents)."""
    return list(itertools.product(*[range(n) for n in grid]))


def neighborhood_keep(
    grid: Sequence[int],
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    is_causal: bool | Sequence[bool] = False,
) -> torch.Tensor:
    """``(N, N)`` boolean mask of neighborhood attention on ``grid`` (``N = prod(grid)``), row-major tokens."""
    nd = len(grid)
    ks, st, dl, ca = (per_dim(p, nd) for p in (kernel_size, stride, dilation, is_causal))
    allowed = [[natten_axis(n, k, s, d, c, x) for x in range(n)] for n, k, s, d, c in zip(grid, ks, st, dl, ca)]
    pts = coords(grid)
    keep = torch.zeros(len(pts), len(pts), dtype=torch.bool)
    for i, p in enumerate(pts):
        for j, r in enumerate(pts):
            keep[i, j] = all(r[a] in allowed[a][p[a]] for a in range(nd))
    return keep


def with_text(visual: torch.Tensor, num_text: int, position: str | None) -> torch.Tensor:
    """Embed a visual ``(Nv, Nv)`` mask in the joint sequence: text rows and text columns all True."""
    if not num_text:
        return visual
    nv = visual.shape[0]
    keep = torch.ones(nv + num_text, nv + num_text, dtype=torch.bool)
    vis = slice(num_text, None) if position == "prefix" else slice(0, nv)
    keep[vis, vis] = visual
    return keep


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention of ``(B, H, N, D)`` tensors under a boolean ``keep`` mask, in float64, written out."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.double()).to(q.dtype)
