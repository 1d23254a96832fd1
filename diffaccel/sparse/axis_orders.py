"""PARO's per-head axis orders of the visual grid: kernel position -> sequence position, text left in place.

PAROAttention (Zhao et al., arXiv 2506.16054; ``research/sparse_quant.md`` §1.2) permutes the visual tokens of each
head so that the axis the head aggregates along becomes the innermost (fastest varying) one: its attention map then
turns block-wise, which suits 64x64 block sparsity and block-group INT8. The candidates are the 6 orders of
``(F, H, W)`` for video grids and the 2 of ``(H, W)`` for images, indexed as in the authors' release
(``0:FHW, 1:FWH, 2:HWF, 3:HFW, 4:WHF, 5:WFH``). An order is a tuple of grid axes, outermost first.

Text tokens keep their sequence place (PARO leaves CogVideoX's prefix text unpermuted): a prefix stays first, a
suffix last. The kernel reads Q/K/V rows through the order and writes output rows back through it
(``token_order`` of :func:`diffaccel.kernels.block_sparse_attention`), so the inverse order on the output costs no
pass of its own.
"""

from __future__ import annotations

import functools
import math

import torch

from diffaccel.kernels.masks import TextSpec

__all__ = [
    "AXIS_ORDERS",
    "axis_order_names",
    "axis_orders_for",
    "head_token_order",
    "inverse_order",
    "visual_axis_order",
]

AXIS_ORDERS: dict[int, tuple[tuple[int, ...], ...]] = {
    3: ((0, 1, 2), (0, 2, 1), (1, 2, 0), (1, 0, 2), (2, 1, 0), (2, 0, 1)),
    2: ((0, 1), (1, 0)),
}
"""Candidate orders per grid rank, in the index order of PARO's release (3-D) and row-major first (2-D)."""

_AXIS_NAMES = {3: "FHW", 2: "HW"}


def axis_orders_for(ndim: int) -> tuple[tuple[int, ...], ...]:
    """The candidate orders of a ``ndim``-D grid (2 or 3); a ValueError otherwise."""
    if ndim not in AXIS_ORDERS:
        raise ValueError(f"PARO axis orders need a 2-D (H, W) or 3-D (F, H, W) grid, got {ndim} dimension(s)")
    return AXIS_ORDERS[ndim]


def axis_order_names(ndim: int) -> tuple[str, ...]:
    """``("FHW", "FWH", "HWF", ...)`` (or ``("HW", "WH")``): the letters of each order, outermost first."""
    letters = _AXIS_NAMES[ndim] if ndim in _AXIS_NAMES else ""
    return tuple("".join(letters[a] for a in order) for order in axis_orders_for(ndim))


@functools.lru_cache(maxsize=64)
def _visual_axis_order(grid: tuple[int, ...], index: int) -> torch.Tensor:
    order = axis_orders_for(len(grid))[index]
    return torch.arange(math.prod(grid)).view(grid).permute(order).reshape(-1)


def visual_axis_order(grid: tuple[int, ...], index: int) -> torch.Tensor:
    """Row-major visual indices in the order of candidate ``index``: ``(num_visual,)`` int64 (a fresh copy)."""
    orders = axis_orders_for(len(grid))
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(orders):
        raise ValueError(f"axis order index must be in [0, {len(orders) - 1}] for a {len(grid)}-D grid, got {index!r}")
    return _visual_axis_order(tuple(int(s) for s in grid), index).clone()


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """The inverse permutation along the last dimension: ``inverse[..., order[..., i]] = i``."""
    inv = torch.empty_like(order)
    positions = torch.arange(order.shape[-1], device=order.device, dtype=order.dtype).expand_as(order)
    return inv.scatter_(-1, order, positions)


def head_token_order(grid: tuple[int, ...], orders: list[int] | tuple[int, ...] | torch.Tensor,
                     text: TextSpec | None) -> torch.Tensor:
    """The kernel order over the whole sequence for one axis-order index per head: ``(heads, tokens)`` int64.

    Visual tokens follow each head's axis order; text tokens stay at their sequence place (prefix or suffix).
    """
    nv = math.prod(grid)
    nt = 0 if text is None else text.length
    idx = [int(o) for o in (orders.tolist() if isinstance(orders, torch.Tensor) else orders)]
    rows = []
    for o in idx:
        vis = visual_axis_order(grid, o)
        if nt == 0:
            rows.append(vis)
        elif text is not None and text.position == "prefix":
            rows.append(torch.cat([torch.arange(nt), vis + nt]))
        else:
            rows.append(torch.cat([vis, torch.arange(nv, nv + nt)]))
    return torch.stack(rows) if rows else torch.empty(0, nv + nt, dtype=torch.long)
