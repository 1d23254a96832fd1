"""Analytic block counts of GNA configurations: kept-block fraction and the ideal speedup bound.

The tile-counting idea of the GNA paper's simulator (Hassani et al., arXiv 2504.16922; NATTENSim, not released;
``research/locality.md`` §1.10), exact for both the tile-major and the row-major layouts, reproducing NATTEN's
published bounds. Used by :func:`diffaccel.methods.gna.analyze` and ``diffaccel methods gna --analyze``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffaccel.errors import ConfigError
from diffaccel.sparse.checks import check_grid, neighborhood_parameters
from diffaccel.sparse.permutations import axis_neighborhood_mask, tile_shapes, tiled_block_counts

__all__ = ["GNAAnalysis", "LayoutCost", "analyze"]


@dataclass(frozen=True)
class LayoutCost:
    """Block counts of one token layout: what a block-sparse kernel visits.

    Attributes:
        layout: ``"tile-major AxB"`` (multi-dimensional tiles, NATTEN's token permutation) or ``"row-major"``.
        visited_fraction: (query block, key block) pairs with at least one kept element, over all pairs.
        dense_fraction: of the visited pairs, those with every element kept (no masking needed).
        speedup_bound: ``1 / visited_fraction``, the ideal speedup over dense attention at equal per-block cost.
    """

    layout: str
    tile: tuple[int, ...] | None
    visited_fraction: float
    dense_fraction: float

    @property
    def speedup_bound(self) -> float:
        return 1.0 / self.visited_fraction if self.visited_fraction > 0 else math.inf

    @property
    def fully_block_sparse(self) -> bool:
        return self.dense_fraction == 1.0


@dataclass(frozen=True)
class GNAAnalysis:
    """:func:`analyze`'s result: element density, the FLOP bound, and block counts per layout.

    ``runs`` names the layout :class:`GNAMethod` runs for this configuration (tile-major when some tile makes the
    mask fully block-sparse, else row-major with in-kernel masking; dense when the window covers the grid).
    """

    grid: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    block: int
    density: float
    tiled: LayoutCost | None
    row_major: LayoutCost
    runs: str

    @property
    def flop_bound(self) -> float:
        """``1 / density``: the speedup if every masked element were free."""
        return 1.0 / self.density

    @property
    def best(self) -> LayoutCost:
        if self.tiled is not None and self.tiled.visited_fraction <= self.row_major.visited_fraction:
            return self.tiled
        return self.row_major


def analyze(
    grid: tuple[int, ...] | list[int],
    kernel_size: int | tuple[int, ...],
    stride: int | tuple[int, ...] = 1,
    dilation: int | tuple[int, ...] = 1,
    block: int | tuple[int, ...] = 128,
    *,
    is_causal: bool | tuple[bool, ...] = False,
) -> GNAAnalysis:
    """Kept-block fraction and ideal speedup bound of a GNA configuration (visual tokens only).

    The mask is the AND of per-axis masks, so the kept elements of a pair of boxes of the grid are a product of
    per-axis counts (2-D prefix sums of the axis masks). Tile-major blocks are single boxes; row-major blocks are
    split into at most ``2 * rank - 1`` boxes. Counts are exact; cost ``O(sum n^2 + blocks^2)``.

    Args:
        grid, kernel_size, stride, dilation, is_causal: as :func:`diffaccel.functional.neighborhood_attention`.
        block: kernel block volume in tokens (every tile shape of that volume dividing the grid is tried and the
            one with the fewest visited blocks is reported), or one tile shape.
    """
    grid = check_grid(tuple(grid) if isinstance(grid, list) else grid)
    ks, st, dl, ca = neighborhood_parameters(grid, kernel_size, stride, dilation, is_causal)
    if isinstance(block, (list, tuple)):
        tiles = [tuple(block)]
        if len(tiles[0]) != len(grid) or any(not isinstance(t, int) or t < 1 for t in tiles[0]):
            raise ConfigError(f"block as a tile shape needs one positive size per grid dimension, got {block!r}")
        if any(n % (t * d) for n, t, d in zip(grid, tiles[0], dl)):
            raise ConfigError(f"tile {tiles[0]} (times dilation {dl}) must divide the grid {grid} in every dimension")
        volume = math.prod(tiles[0])
    else:
        if not isinstance(block, int) or isinstance(block, bool) or block < 1:
            raise ConfigError(f"block must be a positive number of tokens or a tile shape, got {block!r}")
        volume = block
        tiles = tile_shapes(grid, dl, volume)
    masks = [axis_neighborhood_mask(n, k, s, d, c) for n, k, s, d, c in zip(grid, ks, st, dl, ca)]
    nv = math.prod(grid)
    density = math.prod(int(m.sum()) for m in masks) / nv**2
    tiled = None
    for tile in tiles:
        counts = tiled_block_counts(masks, grid, tile, dl)
        visited = int((counts > 0).sum())
        cost = LayoutCost(
            "tile-major " + "x".join(map(str, tile)), tile, visited / counts.numel(),
            int((counts == volume * volume).sum()) / max(visited, 1),
        )
        better = tiled is None or (cost.fully_block_sparse, -cost.visited_fraction) > (
            tiled.fully_block_sparse, -tiled.visited_fraction
        )
        if better:
            tiled = cost
    row = _row_major_cost(masks, grid, volume)
    if all(k == n and d == 1 and not c for n, k, d, c in zip(grid, ks, dl, ca)):
        runs = "dense (SDPA)"
    elif tiled is not None and tiled.fully_block_sparse and _kernel_block(volume):
        runs = tiled.layout
    else:
        runs = "row-major"
    return GNAAnalysis(grid, ks, st, dl, ca, volume, density, tiled, row, runs)


def _kernel_block(volume: int) -> bool:
    return volume >= 16 and volume & (volume - 1) == 0


def _range_boxes(a: int, b: int, shape: tuple[int, ...]) -> list[tuple[tuple[int, int], ...]]:
    """Boxes (per-axis half-open intervals) covering the row-major flat range ``[a, b)`` of ``shape``."""
    if a >= b:
        return []
    if len(shape) == 1:
        return [((a, b),)]
    inner = math.prod(shape[1:])
    a0, ra = divmod(a, inner)
    b0, rb = divmod(b, inner)
    rest = shape[1:]
    if a0 == b0:
        return [((a0, a0 + 1),) + box for box in _range_boxes(ra, rb, rest)]
    boxes = []
    if ra:
        boxes += [((a0, a0 + 1),) + box for box in _range_boxes(ra, inner, rest)]
        a0 += 1
    if b0 > a0:
        boxes.append(((a0, b0),) + tuple((0, n) for n in rest))
    if rb:
        boxes += [((b0, b0 + 1),) + box for box in _range_boxes(0, rb, rest)]
    return boxes


def _row_major_cost(masks: list[torch.Tensor], grid: tuple[int, ...], block: int) -> LayoutCost:
    nv = math.prod(grid)
    nb = -(-nv // block)
    boxes, owner = [], []
    for b in range(nb):
        for box in _range_boxes(b * block, min(nv, (b + 1) * block), grid):
            boxes.append(box)
            owner.append(b)
    box_t = torch.tensor(boxes, dtype=torch.long)  # (num_boxes, rank, 2)
    owner_t = torch.tensor(owner, dtype=torch.long)
    prefix = []
    for m in masks:
        p = torch.zeros(m.shape[0] + 1, m.shape[1] + 1, dtype=torch.long)
        p[1:, 1:] = m.long().cumsum(0).cumsum(1)
        prefix.append(p)
    counts = torch.zeros(nb, nb, dtype=torch.long)
    chunk = max(1, (1 << 22) // max(len(boxes), 1))
    for i0 in range(0, len(boxes), chunk):
        qb = box_t[i0:i0 + chunk]
        c = None
        for a, p in enumerate(prefix):
            q0, q1 = qb[:, a, 0:1], qb[:, a, 1:2]
            k0, k1 = box_t[None, :, a, 0], box_t[None, :, a, 1]
            rect = p[q1, k1] - p[q0, k1] - p[q1, k0] + p[q0, k0]
            c = rect if c is None else c * rect
        assert c is not None
        rows = owner_t[i0:i0 + chunk]
        block_rows = torch.zeros(nb, len(boxes), dtype=torch.long).index_add_(0, rows, c)
        counts += torch.zeros(nb, nb, dtype=torch.long).index_add_(1, owner_t, block_rows)
    sizes = torch.full((nb,), block, dtype=torch.long)
    sizes[-1] = nv - (nb - 1) * block
    full = counts == sizes[:, None] * sizes[None, :]
    visited = int((counts > 0).sum())
    return LayoutCost("row-major", None, visited / counts.numel(), int(full.sum()) / max(visited, 1))
