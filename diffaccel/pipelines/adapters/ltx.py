"""LTX-Video attention (``LTXAttention`` with ``LTXVideoAttnProcessor``).

Self-attention (``attn1``) runs on the packed video tokens with RMS QK-norm across heads and LTX's RoPE
(applied before the heads are split); its layout has the latent grid ``(F, H, W)`` and no text.
Cross-attention (``attn2``) attends to the prompt tokens with the prompt padding mask, laid out as
``is_cross``.

The latents arrive already packed (``(B, tokens, channels)``), so the grid is read from the ``num_frames``,
``height`` and ``width`` forward arguments, which also size the model's RoPE and therefore are the token grid.
``LTXConditionPipeline`` passes ``video_coords`` instead; the grid is recovered from them when they form a
regular grid, and the self-attention falls back to dense (with a warning) when they do not (conditioning
tokens prepended to the video).

Mirrors ``diffusers.models.transformers.transformer_ltx.LTXVideoAttnProcessor``.
HaCohen et al., "LTX-Video: Realtime Video Latent Diffusion" (2024).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb as ltx_rotary

from diffaccel.context import RunContext
from diffaccel.errors import LayoutError
from diffaccel.layout import Grid, TokenLayout
from diffaccel.pipelines.adapters.base import (
    Adapter,
    AttentionCall,
    ModelFamily,
    Projected,
    TensorMemo,
    merge_heads,
    register_adapter,
    grid_or_unknown,
    register_family,
)


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
class LTXVideoAttentionAdapter(Adapter):
    """``LTXVideoAttnProcessor``: QK-norm and RoPE on the full projections, then heads; masks as stock prepares them."""

    family = "ltx"
    stock_processors = ("LTXVideoAttnProcessor",)

    def project(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext) -> Projected:
        hidden_states = call.hidden_states
        context = call.encoder_hidden_states
        batch_size, sequence_length, _ = hidden_states.shape if context is None else context.shape
        attention_mask = call.attention_mask
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        source = hidden_states if context is None else context
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(source))
        value = attn.to_v(source)
        if call.image_rotary_emb is not None:
            query = ltx_rotary(query, call.image_rotary_emb)
            key = ltx_rotary(key, call.image_rotary_emb)
        query, key, value = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (query, key, value))

        num_tokens = query.shape[2]
        if context is not None:
            layout = TokenLayout(num_tokens=num_tokens, grid=None, is_cross=True, num_keys=key.shape[2])
        else:
            grid, unknown = _self_attention_grid(ctx, num_tokens)
            layout = TokenLayout(num_tokens=num_tokens, grid=grid, unknown=unknown)
        return Projected(query, key, value, layout, attn_mask=attention_mask, carry=query.dtype)  # finish needs only the projections' dtype

    def finish(self, attn: torch.nn.Module, out: torch.Tensor, projected: Projected) -> Any:
        hidden_states = merge_heads(out).to(projected.carry)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


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
