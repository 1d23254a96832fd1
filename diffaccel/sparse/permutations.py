"""Token permutations of the locality layouts: kernel position -> sequence position, text included.

* *tile-major* (GNA / NATTEN's ``token_permute``, ``research/locality.md`` §1.4): visual tokens reordered so that
  each kernel block is one multi-dimensional tile of the grid, dilation groups outermost;
* *window-major* (MSW-MSA, HiDiffusion): the cyclically rolled grid partitioned window by window.

The kernel reads Q/K/V rows and writes output rows through the order (``token_order`` of
:func:`diffaccel.kernels.block_sparse_attention`), so a permutation costs no extra pass over the tensors. Text
tokens are part of the order (:func:`full_order`): they stay at their sequence place in kernel order whenever that
keeps the visual tiles aligned to kernel blocks (a suffix always, a prefix whose length is a multiple of the
block), else they run after the visual tokens in kernel order; the output is in sequence order either way.
"""

from __future__ import annotations

import itertools
import math

import torch

from diffaccel.kernels.masks import NeighborhoodMask, TextSpec

__all__ = [
    "axis_neighborhood_mask",
    "full_order",
    "tile_shapes",
    "tiled_axis_counts",
    "tiled_axis_order",
    "tiled_block_counts",
    "tiled_token_order",
    "window_token_order",
]


def full_order(
    visual_order: torch.Tensor, text: TextSpec | None, num_visual: int, block_size: int
) -> tuple[torch.Tensor, int]:
    """Kernel order over the whole sequence from a visual order (row-major visual indices), and the kernel
    position of the first visual token.

    Text keeps its sequence place where the visual tokens stay block-aligned (suffix; prefix of a multiple of
    ``block_size`` tokens), else it runs after the visual tokens in kernel order.
    """
    if text is None or text.length == 0:
        return visual_order, 0
    nt = text.length
    if text.position == "suffix":
        return torch.cat([visual_order, torch.arange(num_visual, num_visual + nt)]), 0
    if nt % block_size == 0:
        return torch.cat([torch.arange(nt), visual_order + nt]), nt
    return torch.cat([visual_order + nt, torch.arange(nt)]), 0


def tile_shapes(grid: tuple[int, ...], dilation: tuple[int, ...], volume: int) -> list[tuple[int, ...]]:
    """Tile shapes of ``volume`` tokens (powers of two per dimension) that tile every dilation group exactly.

    Tiles are taken inside dilation groups (NATTEN's layout, ``research/locality.md`` §1.4), so a dimension of size
    ``n`` with dilation ``d`` accepts a tile extent ``t`` when ``t * d`` divides ``n``.
    """
    exps = int(math.log2(volume)) if volume >= 1 else -1
    if exps < 0 or 2**exps != volume:
        return []
    options = [[e for e in range(exps + 1) if n % (2**e * d) == 0] for n, d in zip(grid, dilation)]
    return [tuple(2**e for e in combo) for combo in itertools.product(*options) if sum(combo) == exps]


def axis_neighborhood_mask(n: int, k: int, s: int, d: int, causal: bool) -> torch.Tensor:
    """NATTEN's mask on one axis, ``(n, n)`` bool, from the spec's own ``mask_mod`` (the single definition)."""
    spec = NeighborhoodMask((n,), k, s, d, causal)
    idx = torch.arange(n)
    zero = torch.zeros((), dtype=torch.long)
    return spec.mask_mod(zero, zero, idx.view(-1, 1), idx.view(1, -1))


def tiled_axis_order(n: int, tile: int, dilation: int) -> torch.Tensor:
    """Axis positions in (dilation group, tile index, position in tile) order: ``x = (r * tile + t) * d + g``."""
    return torch.arange(n).view(n // (tile * dilation), tile, dilation).permute(2, 0, 1).reshape(-1)


def tiled_token_order(grid: tuple[int, ...], tile: tuple[int, ...], dilation: tuple[int, ...]) -> torch.Tensor:
    """Row-major visual indices in tile-major order: dilation groups, then tiles, then tokens inside a tile."""
    m = len(grid)
    split = []
    for n, t, d in zip(grid, tile, dilation):
        split += [n // (t * d), t, d]
    idx = torch.arange(math.prod(grid)).view(*split)
    perm = [3 * a + 2 for a in range(m)] + [3 * a for a in range(m)] + [3 * a + 1 for a in range(m)]
    return idx.permute(*perm).reshape(-1)


def tiled_axis_counts(axis_mask: torch.Tensor, tile: int, dilation: int) -> torch.Tensor:
    """Kept elements per (query axis-tile, key axis-tile) pair, axis tiles in (group, tile index) order."""
    n = axis_mask.shape[0]
    order = tiled_axis_order(n, tile, dilation)
    m = axis_mask[order][:, order]
    na = n // tile
    return m.view(na, tile, na, tile).sum(dim=(1, 3))


def tiled_block_counts(
    axis_masks: list[torch.Tensor], grid: tuple[int, ...], tile: tuple[int, ...], dilation: tuple[int, ...]
) -> torch.Tensor:
    """Kept elements per (query tile, key tile) pair of the tile-major layout, ``(num_tiles, num_tiles)`` int64.

    The mask is the AND of per-axis masks and a tile is a product of per-axis intervals, so counts multiply across
    axes (the tile-counting idea behind the GNA paper's simulator, ``research/locality.md`` §1.10).
    """
    m = len(grid)
    groups = [n // (t * d) for n, t, d in zip(grid, tile, dilation)]
    lead = list(dilation) + groups  # tile ids are row-major over (groups..., tile indices...)
    counts = None
    for a in range(m):
        per_axis = tiled_axis_counts(axis_masks[a], tile[a], dilation[a])
        shape_g = [1] * (2 * m)
        shape_g[a] = dilation[a]
        shape_r = [1] * (2 * m)
        shape_r[m + a] = groups[a]
        axis_tile = torch.arange(dilation[a]).view(shape_g) * groups[a] + torch.arange(groups[a]).view(shape_r)
        axis_tile = axis_tile.expand(lead).reshape(-1)
        c = per_axis[axis_tile][:, axis_tile]
        counts = c if counts is None else counts * c
    assert counts is not None
    return counts


def window_token_order(grid: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...]) -> torch.Tensor:
    """Row-major visual indices rolled by ``-shift`` and grouped window by window (HiDiffusion's partition)."""
    idx = torch.arange(math.prod(grid)).view(grid)
    idx = torch.roll(idx, shifts=tuple(-s for s in shift), dims=tuple(range(len(grid))))
    split = []
    for n, w in zip(grid, window):
        split += [n // w, w]
    m = len(grid)
    perm = [2 * a for a in range(m)] + [2 * a + 1 for a in range(m)]
    return idx.view(*split).permute(*perm).reshape(-1)
