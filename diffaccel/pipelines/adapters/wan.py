"""Wan 2.1 / 2.2 attention (``WanAttention`` with ``WanAttnProcessor``), routed through the stock processor.

Self-attention (``attn1``) runs on the visual tokens only, with Wan's 3-D RoPE; its layout has the latent grid
``(F, H, W)`` and no text. Cross-attention (``attn2``) attends from the visual tokens to the text encoder's tokens
and is laid out as ``is_cross`` (dense unless a method says otherwise). In the I2V models (``added_kv_proj_dim``
set) the context starts with CLIP image tokens, which the stock processor attends to in a separate dispatch call
(``add_k_proj``/``add_v_proj``) before the text one: that call stays stock (diffusers' dispatcher, dense), the
text call is a cross layout. The stock processor runs as it is
(projections, fused projections, QK-norm, RoPE, output projections: ``adapters/dispatch.py``); this module holds
the layout and the grid read from the latent shape.

Wan Team, "Wan: Open and Advanced Large-Scale Video Generative Models" (2025).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from diffaccel.context import RunContext
from diffaccel.layout import TokenLayout
from diffaccel.pipelines.adapters.base import (
    AttentionCall,
    ModelFamily,
    grid_or_unknown,
    patchified_video_grid,
    register_adapter,
    register_family,
)
from diffaccel.pipelines.adapters.dispatch import RoutedAdapter, prepare_routed

WAN_TEXT_TOKENS = 512
"""Text-encoder context length that the stock processor hard-codes to split I2V context into image + text."""


@register_adapter
class WanAdapter(RoutedAdapter):
    """``WanAttnProcessor``: self-attention on the video grid; text (and I2V image) cross-attention dense."""

    family = "wan"
    stock_processors = ("WanAttnProcessor",)

    def stock_call(self, attn: torch.nn.Module, call: AttentionCall, slots: tuple[Any, ...] | None) -> AttentionCall:
        """``WanAttention`` passes its RoPE positionally in the slot diffaccel's processor names
        ``image_rotary_emb``; the stock processor calls it ``rotary_emb``."""
        if call.image_rotary_emb is None:
            return call
        return dataclasses.replace(call, image_rotary_emb=None, extra=dict(call.extra, rotary_emb=call.image_rotary_emb))

    def layout(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext, query: torch.Tensor,
               key: torch.Tensor, attn_mask: torch.Tensor | None, index: int
               ) -> tuple[TokenLayout | None, torch.Tensor | None]:
        num_tokens = query.shape[1]
        if index == 0 and attn.add_k_proj is not None:  # I2V: the image-context call comes first; stock, as before
            return None, attn_mask
        if call.encoder_hidden_states is not None:  # attn2: the text keys
            return TokenLayout(num_tokens=num_tokens, grid=None, is_cross=True, num_keys=key.shape[1]), attn_mask
        grid, _, unknown = grid_or_unknown(ctx, num_tokens, video=True)
        return TokenLayout(num_tokens=num_tokens, grid=grid, unknown=unknown), attn_mask


def _read_wan_inputs(model: torch.nn.Module, args: dict[str, Any]) -> tuple[tuple[int, int, int], None]:
    grid = patchified_video_grid(
        args["hidden_states"], tuple(model.config.patch_size), frames_dim=2, model=type(model).__name__
    )
    return grid, None


register_family(
    ModelFamily(
        name="wan",
        model_classes=("WanTransformer3DModel",),
        read_inputs=_read_wan_inputs,
        description="Wan 2.1 / 2.2 T2V, I2V, TI2V (self-attention on video tokens, cross-attention to text [+ image])",
    )
)

prepare_routed(WanAttnProcessor)
