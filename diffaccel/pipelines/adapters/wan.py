"""Wan 2.1 / 2.2 attention (``WanAttention`` with ``WanAttnProcessor``).

Self-attention (``attn1``) runs on the visual tokens only, with Wan's 3-D RoPE; its layout has the latent
grid ``(F, H, W)`` and no text. Cross-attention (``attn2``) attends from the visual tokens to the text
encoder's tokens and is laid out as ``is_cross`` (dense unless a method says otherwise). In the I2V models
(``added_kv_proj_dim`` set) the cross-attention context starts with CLIP image tokens, which the stock
processor attends to in a second, separate attention through ``add_k_proj``/``add_v_proj``; the adapter
computes that one densely in :meth:`finish`, exactly as stock, and hands the text part to the method.

Mirrors ``diffusers.models.transformers.transformer_wan.WanAttnProcessor`` (fused projections included).
Wan Team, "Wan: Open and Advanced Large-Scale Video Generative Models" (2025).
"""

from __future__ import annotations

from typing import Any

import torch

from diffaccel.context import RunContext
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import sdpa
from diffaccel.pipelines.adapters.base import (
    Adapter,
    AttentionCall,
    ModelFamily,
    Projected,
    merge_heads,
    patchified_video_grid,
    register_adapter,
    register_family,
    grid_or_unknown,
)

WAN_TEXT_TOKENS = 512
"""Text-encoder context length that the stock processor hard-codes to split I2V context into image + text."""


def wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on ``(batch, tokens, heads, head_dim)``: channel pairs ``(2i, 2i+1)`` rotate as complex numbers.

    The model's tables repeat each pair's cos and sin twice along the last axis; the rotation is computed in
    the tables' precision (float64 in Wan's rope module) and cast back to ``x``'s dtype once, as stock does.
    """
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2)
    return rotated.type_as(x)


def _text_projections(
    attn: torch.nn.Module, hidden_states: torch.Tensor, context: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q from the visual tokens, k and v from ``context`` (the visual tokens themselves in self-attention)."""
    source = hidden_states if context is None else context
    if getattr(attn, "fused_projections", False):
        if not attn.is_cross_attention:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        key, value = attn.to_kv(source).chunk(2, dim=-1)
        return attn.to_q(hidden_states), key, value
    return attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)


def _image_projections(attn: torch.nn.Module, image_context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v of the I2V image-context tokens (``add_k_proj``/``add_v_proj``)."""
    if getattr(attn, "fused_projections", False):
        key, value = attn.to_added_kv(image_context).chunk(2, dim=-1)
        return key, value
    return attn.add_k_proj(image_context), attn.add_v_proj(image_context)


@register_adapter
class WanAttentionAdapter(Adapter):
    """``WanAttnProcessor``: RMS QK-norm across heads, 3-D RoPE, and the I2V image-context attention."""

    family = "wan"
    stock_processors = ("WanAttnProcessor",)

    def project(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext) -> Projected:
        hidden_states = call.hidden_states
        context = call.encoder_hidden_states
        image_context = None
        if attn.add_k_proj is not None:
            # I2V: [image tokens, WAN_TEXT_TOKENS text tokens], split where stock splits it
            num_image = context.shape[1] - WAN_TEXT_TOKENS
            image_context, context = context[:, :num_image], context[:, num_image:]

        query, key, value = _text_projections(attn, hidden_states, context)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if call.image_rotary_emb is not None:
            query = wan_rotary(query, *call.image_rotary_emb)
            key = wan_rotary(key, *call.image_rotary_emb)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))

        num_tokens = query.shape[2]
        if context is not None:
            layout = TokenLayout(num_tokens=num_tokens, grid=None, is_cross=True, num_keys=key.shape[2])
        else:
            grid, _, unknown = grid_or_unknown(ctx, num_tokens, video=True)
            layout = TokenLayout(num_tokens=num_tokens, grid=grid, unknown=unknown)
        return Projected(query, key, value, layout, attn_mask=call.attention_mask, carry=image_context)  # the I2V image context (None for T2V)

    def finish(self, attn: torch.nn.Module, out: torch.Tensor, projected: Projected) -> Any:
        query = projected.q
        hidden_states = merge_heads(out).type_as(query)
        image_context: torch.Tensor | None = projected.carry
        if image_context is not None:
            key_img, value_img = _image_projections(attn, image_context)
            key_img = attn.norm_added_k(key_img)
            key_img = key_img.unflatten(2, (attn.heads, -1)).transpose(1, 2)
            value_img = value_img.unflatten(2, (attn.heads, -1)).transpose(1, 2)
            # a second cross-attention to the image tokens, kept dense like every cross-attention
            hidden_states_img = merge_heads(sdpa(query, key_img, value_img)).type_as(query)
            hidden_states = hidden_states + hidden_states_img
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


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
