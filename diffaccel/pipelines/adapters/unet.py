"""SD / SDXL UNet attention (diffusers ``Attention`` with ``AttnProcessor2_0``): self- and cross-attention.

Also serves every other place diffusers runs ``AttnProcessor2_0`` on visual tokens (SD3.5's second
attention in the dual-attention blocks). Mirrors ``diffusers.models.attention_processor.AttnProcessor2_0``.

Self-attention layouts say which UNet level the call runs at: ``downsample`` is the level's factor versus the
latent grid (2**k after k stride-2 downsamplers, from the grid :func:`~diffaccel.layout.downsampled_level`
resolves), and ``hierarchical`` is True on UNet families (``ModelFamily.hierarchical``; SD3.5's image-only
attention says False). Methods read both instead of guessing the level from token counts.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from diffaccel.context import RunContext
from diffaccel.errors import LayoutError
from diffaccel.layout import TokenLayout
from diffaccel.pipelines.adapters.base import (
    Adapter,
    AttentionCall,
    ModelFamily,
    Projected,
    is_hierarchical,
    is_text_only,
    register_adapter,
    register_family,
    register_processor_inference,
    resolve_level,
    split_heads,
    merge_heads,
)
from diffaccel.layout import Grid, downsampled_level


@dataclass(frozen=True)
class UNetCarry:
    """What :meth:`UNetAttentionAdapter.finish` needs: the input before the norms (residual), the 4-D input shape
    ``(batch, channels, height, width)`` to restore (``None`` for 3-D inputs) and the projections' dtype."""

    residual: torch.Tensor
    shape4d: tuple[int, int, int, int] | None
    dtype: torch.dtype


@register_adapter
class UNetAttentionAdapter(Adapter):
    """``AttnProcessor2_0``: optional spatial/group norm, 4-D inputs, cross-attention, residual and rescale."""

    family = "unet"
    stock_processors = ("AttnProcessor2_0", "AttnProcessor")

    def __init__(self) -> None:
        # Without the diffaccel.apply hook there is no latent grid: the largest self-attention grid of the current
        # forward stands for it (a UNet's first attention runs at the highest resolution), so lower levels still get
        # their factor. Per run context: (layer of the forward's first call, largest grid); that layer seen again
        # means a new forward, whose resolution may differ.
        self._largest: weakref.WeakKeyDictionary[RunContext, tuple[str | None, Grid]] = weakref.WeakKeyDictionary()
        # Per run context: (denoiser forward, smallest factor of its self-attention calls so far). A UNet runs its
        # down path first, so the forward's first self-attention call is at its highest-resolution attention level.
        self._finest: weakref.WeakKeyDictionary[RunContext, tuple[int, int]] = weakref.WeakKeyDictionary()

    def _finest_factor(self, ctx: RunContext, factor: int) -> int:
        """The smallest factor of the current forward's self-attention levels (``TokenLayout.finest_downsample``).

        Without the hook, factors are measured from the forward's first (largest) grid, so the finest is 1.
        """
        if ctx.denoiser_calls == 0:
            return 1
        seen = self._finest.get(ctx)
        finest = factor if seen is None or seen[0] != ctx.denoiser_calls else min(seen[1], factor)
        self._finest[ctx] = (ctx.denoiser_calls, finest)
        return finest

    def _level(self, ctx: RunContext, num_tokens: int, shape4d: tuple[int, ...] | None) -> tuple[Grid, int]:
        """The grid of a self-attention call and its factor versus the latent grid (``TokenLayout.downsample``)."""
        if shape4d is not None:
            grid: Grid = (shape4d[2], shape4d[3])
            base = ctx.grid
            level = downsampled_level(base, num_tokens) if base is not None else None
            if level is not None and level[0] == grid:
                return grid, level[1]
            if base is not None:
                return grid, 1  # a 4-D input that is no level of the latent grid (a VAE-style block): no factor
        elif ctx.grid is not None:
            return resolve_level(ctx, num_tokens, allow_downsample=True)
        else:
            grid = resolve_level(ctx, num_tokens)[0]
        first, largest = self._largest.get(ctx, (None, None))
        if largest is None or ctx.layer == first:  # the first call of a (new) forward: its highest resolution
            first, largest = ctx.layer, grid
            self._largest[ctx] = (first, largest)
        level = downsampled_level(largest, num_tokens)
        return (grid, level[1]) if level is not None and level[0] == grid else (grid, 1)

    def qkv(
        self, attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The projections, ``(batch, tokens, channels)`` each; keys and values from the (normed) text for
        cross-attention."""
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        return query, attn.to_k(context), attn.to_v(context)

    def project(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext) -> Projected:
        hidden_states = call.hidden_states
        encoder_hidden_states = call.encoder_hidden_states
        attention_mask = call.attention_mask
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, call.temb)

        input_ndim = hidden_states.ndim
        shape4d = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            shape4d = (batch_size, channel, height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        if is_cross and attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value = self.qkv(attn, hidden_states, encoder_hidden_states)

        query, key, value = (split_heads(t, attn.heads) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        num_tokens = query.shape[2]
        if is_cross:
            layout = TokenLayout(num_tokens=num_tokens, grid=None, is_cross=True, num_keys=key.shape[2])
        elif is_text_only(attn):
            # a text-only self-attention (HunyuanVideo's token refiner): no visual grid, so methods keep it dense
            layout = TokenLayout(num_tokens=num_tokens, grid=None, text=slice(0, num_tokens))
        else:
            try:
                grid, factor = self._level(ctx, num_tokens, shape4d)
            except LayoutError as exc:  # stock runs any token count: dense runs, grid methods fall back
                layout = TokenLayout(num_tokens=num_tokens, grid=None, unknown=str(exc))
            else:
                layout = TokenLayout(
                    num_tokens=num_tokens, grid=grid, downsample=factor, hierarchical=is_hierarchical(attn, True),
                    finest_downsample=self._finest_factor(ctx, factor),
                )
        return Projected(
            query, key, value, layout, attn_mask=attention_mask,
            carry=UNetCarry(residual=residual, shape4d=shape4d, dtype=query.dtype),
        )

    def finish(self, attn: torch.nn.Module, out: torch.Tensor, projected: Projected) -> Any:
        carry: UNetCarry = projected.carry
        hidden_states = merge_heads(out).to(carry.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if carry.shape4d is not None:
            batch_size, channel, height, width = carry.shape4d
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + carry.residual
        return hidden_states / attn.rescale_output_factor


@register_adapter
class FusedUNetAttentionAdapter(UNetAttentionAdapter):
    """``FusedAttnProcessor2_0`` (``UNet2DConditionModel.fuse_qkv_projections``): one ``to_qkv`` projection for
    self-attention, ``to_q`` and one ``to_kv`` for cross-attention; otherwise ``AttnProcessor2_0``."""

    stock_processors = ("FusedAttnProcessor2_0",)

    def qkv(
        self, attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            qkv = attn.to_qkv(hidden_states)
            query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
            return query, key, value
        kv = attn.to_kv(encoder_hidden_states)
        key, value = torch.split(kv, kv.shape[-1] // 2, dim=-1)
        return attn.to_q(hidden_states), key, value


def _read_unet_inputs(model: torch.nn.Module, args: dict[str, Any]) -> tuple[tuple[int, int], None]:
    sample = args["sample"]
    return (int(sample.shape[-2]), int(sample.shape[-1])), None


register_family(
    ModelFamily(
        name="unet",
        model_classes=("UNet2DConditionModel",),
        read_inputs=_read_unet_inputs,
        description="SD 1.x/2.x and SDXL UNets (self-attention on image tokens, cross-attention to text)",
        hierarchical=True,
    )
)


@register_processor_inference(priority=-100)
def _plain_attention(attn: torch.nn.Module, call: AttentionCall) -> str | None:
    """Last rule: a generic ``Attention`` with no joint-text projections runs ``AttnProcessor2_0`` (UNets)."""
    if type(attn).__name__ != "Attention":
        return None
    if getattr(attn, "pre_only", False) or (call is not None and call.image_rotary_emb is not None):
        return None  # AttnProcessor2_0 never takes RoPE and needs to_out
    if getattr(attn, "added_kv_proj_dim", None) is None and getattr(attn, "context_pre_only", None) is None:
        return "AttnProcessor2_0"
    return None
