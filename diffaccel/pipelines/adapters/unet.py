"""SD / SDXL UNet attention (diffusers ``Attention`` with ``AttnProcessor2_0``): self- and cross-attention.

Also serves every other place diffusers runs ``AttnProcessor2_0`` on visual tokens (SD3.5's second
attention in the dual-attention blocks). Mirrors ``diffusers.models.attention_processor.AttnProcessor2_0``.
"""

from __future__ import annotations

from typing import Any

import torch

from diffaccel.context import RunContext
from diffaccel.layout import TokenLayout
from diffaccel.pipelines.adapters.base import (
    Adapter,
    AttentionCall,
    ModelFamily,
    Projected,
    is_text_only,
    register_adapter,
    register_family,
    register_processor_inference,
    resolve_grid,
    split_heads,
    merge_heads,
)


@register_adapter
class UNetAttentionAdapter(Adapter):
    """``AttnProcessor2_0``: optional spatial/group norm, 4-D inputs, cross-attention, residual and rescale."""

    family = "unet"
    stock_processors = ("AttnProcessor2_0", "AttnProcessor")

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

        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

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
        elif shape4d is not None:
            layout = TokenLayout(num_tokens=num_tokens, grid=(shape4d[2], shape4d[3]))
        else:
            layout = TokenLayout(num_tokens=num_tokens, grid=resolve_grid(ctx, num_tokens, allow_downsample=True))
        return Projected(
            query, key, value, layout, attn_mask=attention_mask,
            carry={"residual": residual, "shape4d": shape4d, "dtype": query.dtype},
        )

    def finish(self, attn: torch.nn.Module, out: torch.Tensor, projected: Projected) -> Any:
        carry = projected.carry
        hidden_states = merge_heads(out).to(carry["dtype"])
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if carry["shape4d"] is not None:
            batch_size, channel, height, width = carry["shape4d"]
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + carry["residual"]
        return hidden_states / attn.rescale_output_factor


def _read_unet_inputs(model: torch.nn.Module, args: dict[str, Any]) -> tuple[tuple[int, int], None]:
    sample = args["sample"]
    return (int(sample.shape[-2]), int(sample.shape[-1])), None


register_family(
    ModelFamily(
        name="unet",
        model_classes=("UNet2DConditionModel",),
        read_inputs=_read_unet_inputs,
        description="SD 1.x/2.x and SDXL UNets (self-attention on image tokens, cross-attention to text)",
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
