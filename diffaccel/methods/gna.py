"""Generalized Neighborhood Attention (GNA): NATTEN's sliding, strided and blocked local attention.

Hassani et al., "Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light"
(arXiv 2504.16922); semantics of NATTEN's masks (``natten/backends/flex.py``, ``research/locality.md`` §1.2). Each
visual query attends to a ``kernel_size`` window per grid dimension around its stride-group leader, clamped inside
the grid; text tokens of joint attention are dense (text queries see everything, visual queries see all text).

Fast path: when the stride makes the mask fully block-sparse on a multi-dimensional tile (the GNA paper's point),
tokens are permuted tile-major with one cached gather per call and the kernel visits only dense blocks; otherwise
the kernel runs in the model's order and masks partial blocks from token coordinates.

:func:`analyze` gives the kept-block fraction and the ideal speedup bound of a configuration: the tile-counting
idea of the GNA paper's simulator (NATTENSim, not released; ``research/locality.md`` §1.10), exact for both the
tile-major and the row-major layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.kernels.masks import NeighborhoodMask
from diffaccel.layout import TokenLayout
from diffaccel.methods._locality import (
    LocalityConfig,
    LocalityMethod,
    as_int_tuple,
    axis_neighborhood_mask,
    layout_text_spec,
    run_spec,
    tile_shapes,
    tiled_block_counts,
)
from diffaccel.methods.base import check_choice, config_help, register_method

# ----------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class GNAPreset:
    """A published configuration on its base grid, scaled to other grids with Cosmos-Predict2's rule."""

    base_grid: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    source: str


PRESETS: dict[str, GNAPreset] = {
    # GNA paper, FLUX.1-dev at 4K (256x256 tokens): window 80x80, stride 16x16 ("the same configuration as in the
    # GNA paper", NATTEN docs/profiler.md; research/locality.md §1.8-1.9). Fully block-sparse on 16x8 tiles.
    "image": GNAPreset((256, 256), (80, 80), (16, 16), (1, 1), "GNA paper, FLUX.1-dev 4K (NATTEN profiler docs)"),
    # GNA paper, HunyuanVideo 720p (30x48x80 tokens): window 18x24x24, stride 16x8x8 (same source).
    "video": GNAPreset(
        (30, 48, 80), (18, 24, 24), (16, 8, 8), (1, 1, 1), "GNA paper, HunyuanVideo 720p (NATTEN profiler docs)"
    ),
}
PRESET_NAMES = ("auto", "image", "video")


def scale_preset(preset: GNAPreset, grid: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Kernel, stride and dilation of ``preset`` on ``grid``.

    Cosmos-Predict2's resolution rule (``neighborhood_attn.py::get_adaptive_parameters``, research/locality.md
    §1.9): per dimension ``scale = size / base``, ``window = clamp(round(w * scale), 2, size)``, ``stride =
    clamp(round(s * scale), 1, window)``, ``dilation = clamp(round(d * scale), 1, size // window)``. A dimension of
    size 1 keeps a window of 1.
    """
    ks, st, dl = [], [], []
    for n, b, w, s, d in zip(grid, preset.base_grid, preset.kernel_size, preset.stride, preset.dilation):
        scale = n / b
        k = min(max(round(w * scale), min(2, n)), n)
        ks.append(k)
        st.append(min(max(round(s * scale), 1), k))
        dl.append(min(max(round(d * scale), 1), max(n // k, 1)))
    return tuple(ks), tuple(st), tuple(dl)


# ----------------------------------------------------------------------------------------------- config


@dataclass
class GNAConfig(LocalityConfig):
    """GNA parameters. Leave ``kernel_size`` unset to take the GNA paper's configuration for the grid's rank.

    Defaults (``preset="auto"``): 2-D grids take ``"image"`` (FLUX.1-dev 4K: window 80x80, stride 16x16 on
    256x256 tokens), 3-D grids ``"video"`` (HunyuanVideo 720p: window 18x24x24, stride 16x8x8 on 30x48x80), both
    from the GNA paper as reproduced in NATTEN's profiler docs (research/locality.md §1.8), scaled to the actual
    grid with Cosmos-Predict2's rule (§1.9). A given ``kernel_size`` is used as is, with ``stride`` and
    ``dilation`` defaulting to 1. ``dense_steps`` defaults to 0: the GNA paper's count of dense warm-up steps is not
    verified (STA keeps 15 of 50 on HunyuanVideo, 12 of 50 on Wan, §3.2).
    """

    kernel_size: int | tuple[int, ...] | None = field(default=None, metadata=config_help(
        "window per grid dimension (one int or one per dimension); None: the preset scaled to the grid"))
    stride: int | tuple[int, ...] | None = field(default=None, metadata=config_help(
        "query groups sharing one window (1 = sliding window, kernel_size = blocked); None: preset or 1"))
    dilation: int | tuple[int, ...] | None = field(default=None, metadata=config_help(
        "dilation per dimension; None: preset or 1"))
    is_causal: bool | tuple[bool, ...] = field(default=False, metadata=config_help(
        "causal per dimension, e.g. [true, false, false] for causal time"))
    preset: str = field(default="auto", metadata=config_help(
        "'auto' (by grid rank), 'image' (GNA FLUX 4K: 80x80/16x16 on 256x256) or 'video' (GNA HunyuanVideo: "
        "18x24x24/16x8x8 on 30x48x80), used when kernel_size is None"))

    def validate(self) -> None:
        super().validate()
        for name in ("kernel_size", "stride", "dilation"):
            setattr(self, name, as_int_tuple(name, getattr(self, name)))
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (value,) if value is not None else ()
            minimum = 2 if name == "kernel_size" else 1
            if any(x < minimum for x in values):
                raise ConfigError(f"{name} must be >= {minimum} in every dimension, got {value!r}")
        c = self.is_causal
        if isinstance(c, list):
            c = tuple(c)
        if not (isinstance(c, bool) or (isinstance(c, tuple) and c and all(isinstance(x, bool) for x in c))):
            raise ConfigError(f"is_causal must be a bool or a list of bools (one per dimension), got {self.is_causal!r}")
        self.is_causal = c
        check_choice("preset", self.preset, PRESET_NAMES)

    def parameters_for(self, grid: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
        """Kernel, stride, dilation and causality on ``grid``, checked with NATTEN's rules (ConfigError)."""
        nd = len(grid)
        if self.kernel_size is None:
            name = self.preset if self.preset != "auto" else {2: "image", 3: "video"}.get(nd)
            if name is None:
                raise ConfigError(f"gna has no default window for a {nd}-D grid {grid}: set kernel_size")
            preset = PRESETS[name]
            if len(preset.base_grid) != nd:
                raise ConfigError(f"gna preset {name!r} is {len(preset.base_grid)}-D but the grid {grid} is {nd}-D")
            ks, st, dl = scale_preset(preset, grid)
            if self.stride is not None:
                st = _broadcast("stride", self.stride, grid)
            if self.dilation is not None:
                dl = _broadcast("dilation", self.dilation, grid)
        else:
            ks = _broadcast("kernel_size", self.kernel_size, grid)
            st = _broadcast("stride", 1 if self.stride is None else self.stride, grid)
            dl = _broadcast("dilation", 1 if self.dilation is None else self.dilation, grid)
        causal = self.is_causal
        ca = (causal,) * nd if isinstance(causal, bool) else tuple(causal)
        if len(ca) != nd:
            raise ConfigError(f"is_causal has {len(ca)} entries but the grid {grid} has {nd} dimensions")
        for i, (n, k, s, d) in enumerate(zip(grid, ks, st, dl)):
            if k * d > n:
                raise ConfigError(
                    f"gna: kernel_size {ks} with dilation {dl} does not fit the grid {grid} (dimension {i}: "
                    f"{k} * {d} > {n}); use a smaller window, a per-layer override, or exclude the layer"
                )
            if not 1 <= s <= k:
                raise ConfigError(f"gna: stride {st} must be in [1, kernel_size {ks}] in every dimension")
        return ks, st, dl, ca


def _broadcast(name: str, value: int | tuple[int, ...], grid: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * len(grid)
    if len(value) != len(grid):
        raise ConfigError(f"gna: {name} {value} has {len(value)} entries but the grid {grid} has {len(grid)} dimensions")
    return tuple(value)


# ----------------------------------------------------------------------------------------------- method


@register_method
class GNAMethod(LocalityMethod):
    """Generalized Neighborhood Attention (NATTEN semantics) on image and video grids; text tokens dense."""

    name = "gna"
    config_class = GNAConfig
    config: GNAConfig

    def spec_for(self, layout: TokenLayout, cfg: GNAConfig) -> NeighborhoodMask:
        assert layout.grid is not None
        ks, st, dl, ca = cfg.parameters_for(layout.grid)
        return NeighborhoodMask(layout.grid, ks, st, dl, ca, text=layout_text_spec(layout))

    def local_attention(self, q, k, v, layout: TokenLayout, ctx: RunContext, cfg, *, scale):  # type: ignore[override]
        spec = self.spec_for(layout, cfg)
        return run_spec(q, k, v, spec, block_size=cfg.block_size, scale=scale, backend=cfg.backend)


# ----------------------------------------------------------------------------------------------- analysis


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
    from diffaccel.functional import check_grid, neighborhood_parameters

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


# ----------------------------------------------------------------------------------------------- CLI


def _parse_sizes(name: str, text: str, *, kind: type = int) -> tuple:
    try:
        parts = [p.strip() for p in str(text).lower().replace(",", "x").split("x") if p.strip()]
        if kind is bool:
            values = []
            for p in parts:
                if p not in ("0", "1", "true", "false"):
                    raise ValueError(p)
                values.append(p in ("1", "true"))
            out = tuple(values)
        else:
            out = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--{name.replace('_', '-')} must look like 21x30x52 (or one value), got {text!r}") from None
    if not out:
        raise ConfigError(f"--{name.replace('_', '-')} must not be empty")
    return out


def _fit(name: str, values: tuple, ndim: int) -> Any:
    if len(values) == 1:
        return values[0]
    if len(values) != ndim:
        raise ConfigError(f"--{name.replace('_', '-')} has {len(values)} values but the grid has {ndim} dimensions")
    return values


def _typer_option(*names: str, help: str) -> Any:
    import typer

    return typer.Option(*names, help=help)


def analyze_command(
    grid: Annotated[str, _typer_option("--grid", help="Token grid, e.g. 21x30x52 (frames x height x width).")],
    kernel_size: Annotated[str, _typer_option("--kernel-size", help="Window per dimension, e.g. 9x15x15 or 9.")],
    stride: Annotated[str, _typer_option("--stride", help="Stride per dimension (1 = sliding window).")] = "1",
    dilation: Annotated[str, _typer_option("--dilation", help="Dilation per dimension.")] = "1",
    causal: Annotated[str, _typer_option("--causal", help="Causal per dimension as 0/1, e.g. 1x0x0.")] = "0",
    block: Annotated[int, _typer_option("--block", help="Kernel block in tokens (tile volume).")] = 128,
) -> None:
    """Kept-block fraction and ideal speedup bound of a GNA configuration (GNA simulator idea)."""
    from rich.console import Console
    from rich.table import Table

    g = _parse_sizes("grid", grid)
    nd = len(g)
    result = analyze(
        g, _fit("kernel_size", _parse_sizes("kernel_size", kernel_size), nd),
        _fit("stride", _parse_sizes("stride", stride), nd), _fit("dilation", _parse_sizes("dilation", dilation), nd),
        block, is_causal=_fit("causal", _parse_sizes("causal", causal, kind=bool), nd),
    )
    table = Table(title=(
        f"GNA grid {'x'.join(map(str, result.grid))}, window {'x'.join(map(str, result.kernel_size))}, stride "
        f"{'x'.join(map(str, result.stride))}, dilation {'x'.join(map(str, result.dilation))}, block {result.block}"
    ))
    for column in ("layout", "visited blocks", "dense of visited", "speedup bound"):
        table.add_column(column)
    table.add_row("element mask (FLOPs)", f"{result.density:.2%}", "", f"{result.flop_bound:.2f}x")
    for cost in (result.tiled, result.row_major):
        if cost is not None:
            table.add_row(cost.layout, f"{cost.visited_fraction:.2%}", f"{cost.dense_fraction:.1%}",
                          f"{cost.speedup_bound:.2f}x")
    console = Console()
    console.print(table)
    if result.tiled is None:
        console.print(f"no tile of {result.block} tokens divides the grid (per dilation group)")
    console.print(f"diffaccel runs: {result.runs}")
