"""Efficient-vDiT attention tiles (Ding et al., arXiv 2502.06155): spec, torch ``mask_mod`` and Triton predicate."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from diffaccel.kernels.masks._triton import jit, tl
from diffaccel.kernels.masks.base import KIND_TILE, MaskSpec, TextSpec, _check_grid, _is_int


@jit
def tile_keep(q0, q1, q2, k0, k1, k2, h, Params, G0, G1, G2, NDIM: tl.constexpr, VARIANT: tl.constexpr):
    """Predicate of :class:`TileMask`. ``Params``: (head stride of the table (0: shared by all heads), then the
    global-frame table, ``table[head * G0 + frame] != 0`` for global frames)."""
    row = Params + 1 + h * tl.load(Params)
    gq = tl.load(row + q0) != 0
    gk = tl.load(row + k0) != 0
    return (q0[:, None] == k0[None, :]) | gq[:, None] | gk[None, :]


@dataclass(frozen=True)
class TileMask(MaskSpec):
    """Efficient-vDiT "attention tile" mask (the ``g : (T - g)`` family) on a ``(frames, ...)`` grid.

    A query in frame ``f`` attends to keys of frame ``f`` and of every global frame; queries in a global frame
    attend to every frame. ``global_frames`` is one tuple of frame indices shared by all heads, or one tuple per
    head (then the mask has ``len(global_frames)`` heads). Which frames are global is the caller's choice (the
    paper's choice is not stated; see ``research/locality.md`` §2.2).
    """

    kind: ClassVar[int] = KIND_TILE
    mask_fn: ClassVar = tile_keep
    grid: tuple[int, ...]
    global_frames: tuple[int, ...] | tuple[tuple[int, ...], ...] = ()
    text: TextSpec | None = None

    def __post_init__(self) -> None:
        grid = _check_grid(self.grid)
        object.__setattr__(self, "grid", grid)
        gf = self.global_frames
        if not isinstance(gf, (list, tuple)):
            raise TypeError(f"global_frames must be a tuple of frame indices (or one tuple per head), got {gf!r}")
        per_head = len(gf) > 0 and all(isinstance(x, (list, tuple)) for x in gf)
        rows = [tuple(x) for x in gf] if per_head else [tuple(gf)]
        for row in rows:
            for f in row:
                if not _is_int(f) or not (0 <= f < grid[0]):
                    raise ValueError(f"global_frames entries must be frame indices in [0, {grid[0]}), got {gf!r}")
        object.__setattr__(self, "global_frames", tuple(rows) if per_head else rows[0])
        self._check_text()

    @property
    def per_head(self) -> bool:
        return len(self.global_frames) > 0 and isinstance(self.global_frames[0], tuple)

    @property
    def num_mask_heads(self) -> int:
        return len(self.global_frames) if self.per_head else 1

    def kernel_table(self, device: torch.device | str) -> torch.Tensor:
        return _tile_table(self, str(torch.device(device)))

    @functools.cached_property
    def _bool_tables(self) -> dict[torch.device, torch.Tensor]:
        """The global-frame table as bool, per device, filled on first eager use there (and by ``kernel_table``'s
        users through :meth:`bool_table`). ``mask_mod`` reads it with a plain dict lookup, no cached call, so
        torch.compile (FlexAttention) traces it: the table becomes a captured constant."""
        return {}

    def bool_table(self, device: torch.device | str) -> torch.Tensor:
        """``kernel_table(device)`` as bool, created once per device."""
        device = torch.device(device)
        table = self._bool_tables.get(device)
        if table is None:
            table = self._bool_tables[device] = _tile_table(self, str(device)).bool()
        return table

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_bool_tables", None)
        return state

    def _visual_mask(self, h, qc, kc):
        tables = self._bool_tables
        table = tables.get(qc[0].device)
        if table is None:  # first eager use on this device; traced calls find it filled
            table = self.bool_table(qc[0].device)
        fq, fk = qc[0], kc[0]
        head = h if self.per_head else torch.zeros_like(fq)
        gq = table[head, fq]
        gk = table[head, fk]
        return (fq == fk) | gq | gk

    def kernel_grid(self) -> tuple[int, int, int]:
        # frames first, everything else flattened: the kernel only needs the frame index.
        return (self.grid[0], 1, math.prod(self.grid[1:]))

    def kernel_params(self) -> tuple[int, ...]:
        """(head stride: ``frames`` if per head else 0, then the (heads, frames) global-frame table, row-major)."""
        table = _tile_table(self, "cpu")
        return (self.grid[0] if self.per_head else 0, *table.reshape(-1).tolist())


@functools.lru_cache(maxsize=64)
def _tile_table(spec: TileMask, device: str) -> torch.Tensor:
    rows = spec.global_frames if spec.per_head else (spec.global_frames,)
    table = torch.zeros(len(rows), spec.grid[0], dtype=torch.int32)
    for i, row in enumerate(rows):
        for f in row:
            table[i, f] = 1
    return table.to(device)

