"""Attention plans: how the block-sparse kernel runs one mask spec (token order + block mask), built once, cached.

A plan keeps the mask spec in **sequence** coordinates (the model's token order) and the block mask in **kernel**
order; ``order[i]`` is the sequence position the kernel holds at position ``i``. It runs as one kernel call with
``token_order=plan.order`` (:func:`run_plan`): the kernel reads Q/K/V rows through the order and writes output rows
back through it, and it evaluates the element mask of partial blocks on sequence positions, so the plan needs no
gather before the kernel and no scatter after it. Layouts:

- ``"dense"``: the spec keeps every pair (plain SDPA, as NATTEN does for a window covering the grid);
- ``"row-major"``: the model's order, partial blocks masked in the kernel from token coordinates;
- ``"tile-major AxB"`` (GNA, NATTEN's token permutation, ``research/locality.md`` §1.4): chosen when a tile shape
  makes the neighborhood mask *fully* block-sparse (every visited block dense), the GNA paper's target;
- ``"window-major"`` (MSW-MSA): windows of the rolled grid contiguous in kernel order;
- ``"per-frame"``: CLEAR's 2-D circle inside each frame of a video (:mod:`diffaccel.sparse.per_frame`).

Validation happens here, once per plan; methods then call the unchecked kernel entry.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from diffaccel.kernels.masks import (
    CircleMask,
    MaskSpec,
    NeighborhoodMask,
    ShiftedWindowMask,
    SparseBlockMask,
    TextSpec,
)
from diffaccel.sparse.checks import check_block_size
from diffaccel.sparse.permutations import (
    axis_neighborhood_mask,
    full_order,
    tile_shapes,
    tiled_block_counts,
    tiled_token_order,
    window_token_order,
)

__all__ = [
    "AttentionPlan",
    "FoldedFrames",
    "classify_in_order",
    "dense_attention",
    "dense_block_mask",
    "plan_for",
]


@dataclass(frozen=True)
class FoldedFrames:
    """A per-frame plan run with frames folded into the batch (two launches merged by log-sum-exp).

    ``grid`` is the video grid ``(frames, height, width)``, ``text`` the text placement of the whole sequence; the
    plan's block mask is one frame's.
    """

    grid: tuple[int, int, int]
    text: TextSpec | None


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """How to run one mask spec: the kernel's token order and the block mask in that order.

    Attributes:
        layout: ``"dense"``, ``"row-major"``, ``"tile-major <tile>"``, ``"window-major"``, ``"per-frame"`` or
            ``"per-frame folded"``.
        block_mask: the block mask in kernel order (``None`` when dense).
        order: kernel position -> sequence position, ``(tokens,)`` int64 on the plan's device (``None``: the
            sequence order itself).
        spec: the mask spec in sequence coordinates (``None`` for a plan built without one).
        tile: the tile shape of a tile-major plan.
        mask_mod: the element mask in sequence coordinates (FlexAttention signature); ``spec.mask_mod`` unless the
            plan's semantics is not one spec (per-frame CLEAR).
        folded: set for a per-frame plan that folds frames into the batch.
    """

    layout: str
    block_mask: SparseBlockMask | None = None
    order: torch.Tensor | None = None
    spec: MaskSpec | None = None
    tile: tuple[int, ...] | None = None
    mask_mod: Callable | None = None
    folded: FoldedFrames | None = None

    def __post_init__(self) -> None:
        if self.mask_mod is None and self.spec is not None:
            object.__setattr__(self, "mask_mod", self.spec.mask_mod)

    @property
    def dense(self) -> bool:
        """The plan runs plain dense attention (SDPA)."""
        return self.block_mask is None

    @property
    def kept_block_fraction(self) -> float:
        """Fraction of (query block, key block) pairs the kernel visits (1 when dense)."""
        return 1.0 if self.block_mask is None else self.block_mask.density

    @functools.cached_property
    def kernel_mask_mod(self) -> Callable | None:
        """The element mask in kernel coordinates: ``mask_mod(b, h, order[i], order[j])`` (FlexAttention signature),
        for a peer that runs on inputs gathered into kernel order."""
        if self.mask_mod is None or self.order is None:
            return self.mask_mod
        mod, order = self.mask_mod, self.order

        def kernel_order_mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
            return mod(b, h, order[q_idx], order[kv_idx])

        return kernel_order_mask_mod

    @functools.cached_property
    def inverse(self) -> torch.Tensor | None:
        """Sequence position -> kernel position (for inspection; running a plan never needs it)."""
        if self.order is None:
            return None
        inv = torch.empty_like(self.order)
        inv[self.order] = torch.arange(self.order.numel(), device=self.order.device)
        return inv


def plan_for(spec: MaskSpec, block_size: int, device: torch.device | str) -> AttentionPlan:
    """The cached :class:`AttentionPlan` of ``spec`` with square kernel blocks of ``block_size`` tokens.

    Cached per (spec, block size, device); a spec holds the grid, the method's parameters and the text length.
    """
    check_block_size(block_size)
    return _plan_cached(spec, int(block_size), str(torch.device(device)))


@functools.lru_cache(maxsize=256)
def _plan_cached(spec: MaskSpec, block_size: int, device: str) -> AttentionPlan:
    if isinstance(spec, NeighborhoodMask):
        if _neighborhood_is_dense(spec):
            return AttentionPlan("dense", spec=spec)
        tiled = _tile_major_neighborhood(spec, block_size, device)
        if tiled is not None:
            return tiled
    elif isinstance(spec, ShiftedWindowMask):
        if tuple(spec.window) == tuple(spec.grid):
            return AttentionPlan("dense", spec=spec)  # one window: the roll permutes tokens inside it only
        if all(n % w == 0 for n, w in zip(spec.grid, spec.window)):
            return _window_major(spec, block_size, device)
    elif isinstance(spec, CircleMask):
        if spec.max_sq_dist >= sum((n - 1) ** 2 for n in spec.grid):
            return AttentionPlan("dense", spec=spec)
    block_mask = SparseBlockMask.from_spec(spec, block_size, device=device)
    if _all_full(block_mask):
        return AttentionPlan("dense", spec=spec)
    return AttentionPlan("row-major", block_mask, spec=spec)


def _all_full(block_mask: SparseBlockMask) -> bool:
    return block_mask.num_partial == 0 and block_mask.num_full == block_mask.kv_num_blocks.numel() * block_mask.num_kv_blocks


def _neighborhood_is_dense(spec: NeighborhoodMask) -> bool:
    return all(
        k == n and d == 1 and not c for n, k, d, c in zip(spec.grid, spec.kernel_size, spec.dilation, spec.is_causal)
    )


def _order_on(order: torch.Tensor, device: str) -> torch.Tensor | None:
    """The order on ``device``, or None when it is the identity (the kernel's contiguous fast path)."""
    if torch.equal(order, torch.arange(order.numel())):
        return None
    return order.to(device=device, dtype=torch.long).contiguous()


# -- block classification in kernel order --------------------------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 24


def classify_in_order(
    spec: Any, order: torch.Tensor, block_size: int, device: torch.device | str = "cpu", *,
    mask_mod: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(full, partial)`` bool ``(num_mask_heads, nb, nb)`` of the kernel blocks of ``order`` under ``spec``.

    Kernel block ``i`` holds the sequence positions ``order[i * block_size : (i + 1) * block_size]``; the element
    mask (``mask_mod``, default ``spec.mask_mod``) is evaluated on those sequence positions, as the kernel does.
    Positions past the sequence end are ignored (a tail block whose in-bounds elements are kept is full).
    """
    dev = torch.device(device)
    mod = spec.mask_mod if mask_mod is None else mask_mod
    n = order.numel()
    nb = -(-n // block_size)
    hs = getattr(spec, "num_mask_heads", 1)
    heads = torch.arange(hs, device=dev).view(hs, 1, 1)
    pos = torch.arange(nb * block_size, device=dev)
    inb = pos < n
    seq = order.to(dev).long()[pos.clamp(max=n - 1)]
    full = torch.empty(hs, nb, nb, dtype=torch.bool, device=dev)
    anyk = torch.empty_like(full)
    step = max(1, _CHUNK_ELEMENTS // (hs * block_size * nb * block_size))
    zero = torch.zeros((), dtype=torch.long, device=dev)
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        rows = slice(b0 * block_size, b1 * block_size)
        m = mod(zero, heads, seq[rows].view(1, -1, 1), seq.view(1, 1, -1)).expand(hs, -1, seq.numel())
        ok = inb[rows].view(1, -1, 1) & inb.view(1, 1, -1)
        shape = (hs, b1 - b0, block_size, nb, block_size)
        full[:, b0:b1] = (m | ~ok).view(shape).transpose(2, 3).reshape(hs, b1 - b0, nb, -1).all(-1)
        anyk[:, b0:b1] = (m & ok).view(shape).transpose(2, 3).reshape(hs, b1 - b0, nb, -1).any(-1)
    return full, anyk & ~full


def _ordered_plan(
    layout: str, spec: MaskSpec, order: torch.Tensor, full: torch.Tensor, partial: torch.Tensor, block_size: int,
    device: str, tile: tuple[int, ...] | None = None,
) -> AttentionPlan:
    n = spec.num_tokens
    has_partial = bool(partial.any())
    block_mask = SparseBlockMask.from_block_keep(
        full.to(device), partial.to(device) if has_partial else None, q_len=n, kv_len=n, q_block_size=block_size,
        kv_block_size=block_size, spec=spec if has_partial else None,
    )
    if _all_full(block_mask):
        return AttentionPlan("dense", spec=spec)
    return AttentionPlan(layout, block_mask, _order_on(order, device), spec=spec, tile=tile)


# -- GNA: tile-major ---------------------------------------------------------------------------------------------------


def _tile_major_neighborhood(spec: NeighborhoodMask, block_size: int, device: str) -> AttentionPlan | None:
    """The fully block-sparse tile-major plan with the fewest visited blocks, if some tile shape gives one."""
    grid, dil = spec.grid, spec.dilation
    shapes = tile_shapes(grid, dil, block_size)
    if not shapes:
        return None
    axis_masks = [
        axis_neighborhood_mask(n, k, s, d, c)
        for n, k, s, d, c in zip(grid, spec.kernel_size, spec.stride, dil, spec.is_causal)
    ]
    best = None
    for tile in shapes:
        counts = tiled_block_counts(axis_masks, grid, tile, dil)
        full = counts == block_size * block_size
        if bool(((counts > 0) & ~full).any()):
            continue  # partially kept tiles: the row-major plan with in-kernel masking is used instead
        visited = int(full.sum())
        if best is None or visited < best[0]:
            best = (visited, tile, full)
    if best is None:
        return None
    _, tile, visual_full = best
    nv, nt = spec.num_visual, spec.num_text
    order, start = full_order(tiled_token_order(grid, tile, dil), spec.text, nv, block_size)
    nbv = visual_full.shape[0]
    nb = -(-(nv + nt) // block_size)
    keep = torch.ones(nb, nb, dtype=torch.bool)  # text blocks dense both ways
    v0 = start // block_size
    keep[v0:v0 + nbv, v0:v0 + nbv] = visual_full
    return _ordered_plan("tile-major " + "x".join(map(str, tile)), spec, order, keep.unsqueeze(0),
                         torch.zeros_like(keep).unsqueeze(0), block_size, device, tile)


# -- MSW-MSA: window-major -------------------------------------------------------------------------------------------


def _window_major(spec: ShiftedWindowMask, block_size: int, device: str) -> AttentionPlan:
    order, _ = full_order(window_token_order(spec.grid, spec.window, spec.shift), spec.text, spec.num_visual,
                          block_size)
    full, partial = classify_in_order(spec, order, block_size)
    return _ordered_plan("window-major", spec, order, full, partial, block_size, device)


# -- running -----------------------------------------------------------------------------------------------------------


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None) -> torch.Tensor:
    """Plain SDPA, called as diffusers' stock processors call it (default scale when ``scale`` is None)."""
    if scale is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False, scale=scale)


def dense_block_mask(q_len: int, kv_len: int, block_size: int, device: torch.device | str) -> SparseBlockMask:
    """A cached all-full block mask (for the dense passes that return a log-sum-exp)."""
    return _dense_cached(q_len, kv_len, block_size, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _dense_cached(q_len: int, kv_len: int, block_size: int, device: str) -> SparseBlockMask:
    return SparseBlockMask.dense(q_len, kv_len, block_size, device=device)
