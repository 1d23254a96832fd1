"""LTX-Video (``LTXVideoTransformer3DModel``, ``LTXAttention``): routed through the stock ``LTXVideoAttnProcessor``.

diffusers' processor runs as is (its projections, the RMS QK-norm across heads, LTX's RoPE on the full projections,
the prompt mask it prepares, the output projections); only its ``dispatch_attention_fn`` call reaches the method
(``adapters/dispatch.py``, docs/adapters.md). This module holds the layout of that call:

- self-attention (``attn1``): the packed video tokens, grid ``(F, H, W)``, no text;
- cross-attention (``attn2``): video queries, prompt keys (``is_cross``), with the mask exactly as the stock processor
  passes it (the prompt padding as an additive bias repeated per head, ``(batch, heads, 1, text)``).

The latents arrive already packed (``(B, tokens, channels)``), so the grid is read from the ``num_frames``,
``height`` and ``width`` forward arguments, which also size the model's RoPE and therefore are the token grid.
``LTXConditionPipeline`` passes ``video_coords`` instead; the grid is recovered from them when they form a
regular grid, and the self-attention's grid is unknown (dense, said once; ``strict=True`` raises) when they do not
(conditioning tokens prepended to the video).

HaCohen et al., "LTX-Video: Realtime Video Latent Diffusion" (2024).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

from diffaccel.context import RunContext
from diffaccel.errors import LayoutError
from diffaccel.layout import Grid, TokenLayout
from diffaccel.pipelines.adapters.base import (
    AttentionCall,
    ModelFamily,
    TensorMemo,
    grid_or_unknown,
    register_adapter,
    register_family,
)
from diffaccel.pipelines.adapters.dispatch import RoutedAdapter, prepare_routed


def _self_attention_grid(ctx: RunContext, num_tokens: int) -> tuple[Grid | None, str | None]:
    """The grid of a self-attention call, or ``(None, reason)`` when it cannot be derived (the hook ran but found
    no regular grid, or no hook ran): the call then runs dense, methods that need a grid fall back or, strict, raise."""
    if ctx.grid is None and ctx.denoiser_calls > 0:
        return None, (
            "LTX-Video's token grid is unknown for this call (no num_frames/height/width, and video_coords that "
            "do not form a regular grid, e.g. with conditioning tokens prepended)"
        )
    grid, _, unknown = grid_or_unknown(ctx, num_tokens, video=True)
    return grid, unknown


@register_adapter
class LTXVideoAttentionAdapter(RoutedAdapter):
    """``LTXVideoAttnProcessor``: ``attn1`` on the video grid, ``attn2`` cross-attention to the prompt."""

    family = "ltx"
    stock_processors = ("LTXVideoAttnProcessor",)

    def layout(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext, query: torch.Tensor,
               key: torch.Tensor, attn_mask: torch.Tensor | None, index: int) -> tuple[TokenLayout, Any]:
        num_tokens = query.shape[1]
        if call.encoder_hidden_states is not None:
            return TokenLayout(num_tokens=num_tokens, grid=None, is_cross=True, num_keys=key.shape[1]), attn_mask
        grid, unknown = _self_attention_grid(ctx, num_tokens)
        return TokenLayout(num_tokens=num_tokens, grid=grid, unknown=unknown), attn_mask


def grid_from_video_coords(video_coords: torch.Tensor) -> Grid | None:
    """The ``(F, H, W)`` grid of ``video_coords`` (``(B, 3, tokens)``) when they enumerate a regular grid in
    frame-major order, the same for every batch item; ``None`` otherwise."""
    if video_coords.ndim != 3 or video_coords.shape[1] != 3:
        return None
    first = video_coords[0]
    if not torch.equal(video_coords, first.expand_as(video_coords)):
        return None
    axes = [torch.unique(first[i]) for i in range(3)]
    grid = tuple(int(a.numel()) for a in axes)
    if math.prod(grid) != first.shape[1]:
        return None
    expected = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).reshape(3, -1)
    return grid if torch.equal(expected, first) else None


_GRIDS = TensorMemo()
"""``grid_from_video_coords`` per ``video_coords`` object: LTXConditionPipeline builds the coordinates once per run,
so only the first denoiser call reads them (``torch.unique``/``torch.equal`` synchronise with the device)."""


def _read_ltx_inputs(model: torch.nn.Module, args: dict[str, Any]) -> tuple[Grid | None, None]:
    num_tokens = int(args["hidden_states"].shape[1])
    sizes = tuple(args.get(name) for name in ("num_frames", "height", "width"))
    if all(s is not None for s in sizes):
        # the model's RoPE enumerates exactly this grid, so it is the token grid (patch sizes already applied)
        grid = tuple(int(s) for s in sizes)
        if math.prod(grid) != num_tokens:
            raise LayoutError(
                f"LTXVideoTransformer3DModel got num_frames, height, width = {grid} ({math.prod(grid)} tokens) "
                f"for {num_tokens} video tokens; pass the patchified latent sizes, as LTXPipeline does"
            )
        return grid, None
    video_coords = args.get("video_coords")
    if video_coords is not None:
        return _GRIDS.get(video_coords, grid_from_video_coords), None
    return None, None


register_family(
    ModelFamily(
        name="ltx",
        model_classes=("LTXVideoTransformer3DModel",),
        read_inputs=_read_ltx_inputs,
        description="LTX-Video (self-attention on packed video tokens, cross-attention to text)",
    )
)

prepare_routed(LTXVideoAttnProcessor)
