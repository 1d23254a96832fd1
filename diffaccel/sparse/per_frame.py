"""CLEAR's 2-D circle inside each frame of a ``(frames, height, width)`` video grid, text rows and columns dense.

Liu et al., "CLEAR" (arXiv 2412.16112) defines the window on images; on video it is applied frame by frame.

One launch when frames are block-aligned: if ``height * width`` is a multiple of the kernel block, every visual
kernel block lies inside one frame. Inside a frame the 3-D circle ``CircleMask((F, H, W), r)`` keeps exactly the
2-D circle (frame distance 0), so that spec is the element mask of the partial blocks, and cross-frame block pairs
are dropped at the block level. Text keeps its sequence place unless a prefix would misalign the frames (then it
runs after the video in kernel order, through the token order: no extra pass).

Otherwise (a block straddles two frames, where the 3-D circle would keep cross-frame pairs) the plan folds
frames into the batch: one launch over the visual tokens of every frame with one frame's mask, one dense pass of
the visual queries over the text keys merged by log-sum-exp, and SDPA for the text queries. Expressing "same frame"
as an element mask needs a kernel mask kind (a kernel-side change), so this path stays for unaligned frames.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from diffaccel.kernels.masks import CircleMask, SparseBlockMask, TextSpec
from diffaccel.sparse.checks import check_block_size
from diffaccel.sparse.permutations import full_order
from diffaccel.sparse.plans import (
    AttentionPlan,
    FoldedFrames,
    classify_in_order,
    dense_block_mask,
    plan_for,
)

__all__ = ["per_frame_circle_mask_mod", "per_frame_plan"]


def per_frame_circle_mask_mod(grid: tuple[int, int, int], radius: float, text: TextSpec | None) -> Callable:
    """The per-frame circle as one FlexAttention ``mask_mod`` over the sequence (the plan's semantics)."""
    frames, height, width = grid
    hw, nv = height * width, frames * height * width
    nt = 0 if text is None else text.length
    prefix = text is not None and text.position == "prefix"
    circle = CircleMask((height, width), radius).mask_mod

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        qv, kv = (q_idx - nt, kv_idx - nt) if prefix else (q_idx, kv_idx)
        is_text = (qv < 0) | (qv >= nv) | (kv < 0) | (kv >= nv)
        qv, kv = qv.clamp(0, nv - 1), kv.clamp(0, nv - 1)
        return is_text | ((qv // hw == kv // hw) & circle(b, h, qv % hw, kv % hw))

    return mask_mod


def per_frame_plan(
    grid: tuple[int, int, int], radius: float, text: TextSpec | None, block_size: int, device: torch.device | str
) -> AttentionPlan:
    """The cached plan of the per-frame circle: one launch when frames are block-aligned, else folded frames."""
    check_block_size(block_size)
    return _per_frame_cached(tuple(grid), float(radius), text, int(block_size), str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _per_frame_cached(
    grid: tuple[int, int, int], radius: float, text: TextSpec | None, block_size: int, device: str
) -> AttentionPlan:
    frames, height, width = grid
    hw, nv = height * width, frames * height * width
    mask_mod = per_frame_circle_mask_mod(grid, radius, text)
    if hw % block_size:
        frame = plan_for(CircleMask((height, width), radius), block_size, device)
        bm = frame.block_mask if frame.block_mask is not None else dense_block_mask(hw, hw, block_size, device)
        return AttentionPlan("per-frame folded", bm, None, spec=frame.spec, mask_mod=mask_mod,
                             folded=FoldedFrames(grid, text))
    spec = CircleMask(grid, radius, text=text)
    order, start = full_order(torch.arange(nv), text, nv, block_size)
    full, partial = classify_in_order(spec, order, block_size)
    nb = full.shape[-1]
    frame_of = torch.full((nb,), -1, dtype=torch.long)  # -1: a text block (dense both ways)
    v0, per_frame = start // block_size, hw // block_size
    frame_of[v0:v0 + nv // block_size] = torch.arange(nv // block_size) // per_frame
    same = (frame_of[:, None] == frame_of[None, :]) | (frame_of[:, None] < 0) | (frame_of[None, :] < 0)
    full, partial = full & same, partial & same
    n = nv + (0 if text is None else text.length)
    has_partial = bool(partial.any())
    bm = SparseBlockMask.from_block_keep(
        full.to(device), partial.to(device) if has_partial else None, q_len=n, kv_len=n, q_block_size=block_size,
        kv_block_size=block_size, spec=spec if has_partial else None,
    )
    order_dev = None if torch.equal(order, torch.arange(n)) else order.to(device)
    return AttentionPlan("per-frame", bm, order_dev, spec=spec, mask_mod=mask_mod)


