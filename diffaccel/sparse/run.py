"""Running attention plans: one kernel call per plan (two for a folded per-frame plan, merged by log-sum-exp).

Kept apart from :mod:`diffaccel.sparse.plans` (building plans) and :mod:`diffaccel.sparse.per_frame` (the per-frame
plan) so that the import arrows inside ``sparse`` stay acyclic: run -> per_frame -> plans.
"""

from __future__ import annotations

import torch

from diffaccel.kernels import block_sparse_attention_unchecked
from diffaccel.kernels.masks import MaskSpec, TextSpec
from diffaccel.sparse.merge import merge_by_lse
from diffaccel.sparse.per_frame import per_frame_plan
from diffaccel.sparse.plans import AttentionPlan, dense_attention, dense_block_mask, plan_for


def run_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    *,
    scale: float | None,
    backend: str,
) -> torch.Tensor:
    """Attention of ``q`` over ``k``/``v`` under ``plan``: one kernel call (two for a folded per-frame plan).

    Tensors are ``(batch, heads, tokens, head_dim)``; arguments are not re-validated (the plan was).
    """
    if plan.block_mask is None:
        return dense_attention(q, k, v, scale=scale)
    if plan.folded is not None:
        return run_folded(q, k, v, plan, scale=scale, backend=backend)
    return block_sparse_attention_unchecked(
        q, k, v, plan.block_mask, scale=scale, token_order=plan.order, backend=backend
    )


def run_spec(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, *, block_size: int, scale: float | None,
    backend: str,
) -> torch.Tensor:
    """Plan ``spec`` (cached) and run it."""
    return run_plan(q, k, v, plan_for(spec, block_size, q.device), scale=scale, backend=backend)


def run_folded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *, scale: float | None, backend: str
) -> torch.Tensor:
    """Run a folded per-frame plan: frames folded into the batch, text merged by log-sum-exp."""
    assert plan.folded is not None and plan.block_mask is not None
    grid, text = plan.folded.grid, plan.folded.text
    B, H, N, D = q.shape
    F_, Hh, W = grid
    hw = Hh * W
    nv, nt = F_ * hw, (0 if text is None else text.length)
    prefix = text is not None and text.position == "prefix"
    vis = slice(nt, N) if prefix else slice(0, nv)
    txt = slice(0, nt) if prefix else slice(nv, N)

    def fold(t: torch.Tensor) -> torch.Tensor:
        return t[:, :, vis].unflatten(2, (F_, hw)).transpose(1, 2).reshape(B * F_, H, hw, D)

    out_local, lse_local = block_sparse_attention_unchecked(
        fold(q), fold(k), fold(v), plan.block_mask, scale=scale, return_lse=True, backend=backend
    )
    out_local = out_local.reshape(B, F_, H, hw, D).transpose(1, 2).reshape(B, H, nv, D)
    lse_local = lse_local.reshape(B, F_, H, hw).transpose(1, 2).reshape(B, H, nv)
    if nt == 0:
        return out_local
    q_vis = q[:, :, vis]
    text_mask = dense_block_mask(nv, nt, plan.block_mask.q_block_size, q.device)
    out_text, lse_text = block_sparse_attention_unchecked(
        q_vis, k[:, :, txt], v[:, :, txt], text_mask, scale=scale, return_lse=True, backend=backend
    )
    out = torch.empty_like(q)
    out[:, :, vis] = merge_by_lse([(out_local, lse_local), (out_text, lse_text)], q.dtype)
    out[:, :, txt] = dense_attention(q[:, :, txt], k, v, scale=scale)
    return out


def per_frame_circle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    radius: float,
    text: TextSpec | None,
    *,
    block_size: int,
    scale: float | None,
    backend: str,
) -> torch.Tensor:
    """CLEAR's per-frame circle on a video sequence (see the module docstring), through its cached plan."""
    return run_plan(q, k, v, per_frame_plan(grid, radius, text, block_size, q.device), scale=scale, backend=backend)
