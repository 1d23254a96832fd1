"""SD3 / SD3.5 joint attention (MMDiT): image and text streams attend jointly, text tokens after image tokens.

Mirrors ``diffusers.models.attention_processor.JointAttnProcessor2_0`` (and ``FusedJointAttnProcessor2_0``,
which ``SD3Transformer2DModel.fuse_qkv_projections`` installs). The same processor also runs image-only
attention: SD3.5's second attention in the dual-attention blocks (``attn2``) and the SD3 ControlNet's single
blocks call it without ``encoder_hidden_states``.

Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3, 2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffaccel.context import RunContext
from diffaccel.errors import LayoutError, UnsupportedModelError
from diffaccel.layout import Grid, TokenLayout
from diffaccel.pipelines.adapters.base import (
    Adapter,
    AttentionCall,
    ModelFamily,
    Projected,
    merge_heads,
    register_adapter,
    register_family,
    grid_or_unknown,
    register_processor_inference,
    split_heads,
)


@dataclass(frozen=True)
class JointCarry:
    """What the SD3 adapters' ``finish`` needs: the image tokens at the front of the output, whether the call was
    joint (text after them: split and project both streams) and the projections' dtype."""

    num_image: int
    joint: bool
    dtype: torch.dtype


def joint_layout(ctx: RunContext, num_image: int, num_text: int | None) -> TokenLayout:
    """Layout of ``num_image`` image tokens followed by ``num_text`` text tokens (``None``: image-only call); the
    grid from the run context, or unknown (:attr:`TokenLayout.unknown`) when it cannot be derived."""
    grid, _, unknown = grid_or_unknown(ctx, num_image)
    if num_text is None:
        return TokenLayout(num_tokens=num_image, grid=grid, unknown=unknown)
    return TokenLayout(
        num_tokens=num_image + num_text, grid=grid, text=slice(num_image, num_image + num_text), unknown=unknown
    )


@register_adapter
class JointAttentionAdapter(Adapter):
    """``JointAttnProcessor2_0``: QK-norm per stream, ``[image, text]`` concatenation, split output projections.

    The stock processor ignores ``attention_mask``; so does this adapter. The last SD3 block is
    ``context_pre_only``: its text output skips ``to_add_out`` (the module has none).
    """

    family = "sd3"
    stock_processors = ("JointAttnProcessor2_0",)

    def project(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext) -> Projected:
        hidden_states = call.hidden_states
        encoder_hidden_states = call.encoder_hidden_states
        if hidden_states.ndim != 3:
            raise LayoutError(
                "JointAttnProcessor2_0 takes hidden_states shaped (batch, tokens, channels), got "
                f"{tuple(hidden_states.shape)}"
            )
        num_image = hidden_states.shape[1]

        query = split_heads(attn.to_q(hidden_states), attn.heads)
        key = split_heads(attn.to_k(hidden_states), attn.heads)
        value = split_heads(attn.to_v(hidden_states), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        num_text = None
        if encoder_hidden_states is not None:
            num_text = encoder_hidden_states.shape[1]
            text_query = split_heads(attn.add_q_proj(encoder_hidden_states), attn.heads)
            text_key = split_heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
            text_value = split_heads(attn.add_v_proj(encoder_hidden_states), attn.heads)
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)

        return Projected(
            query, key, value, joint_layout(ctx, num_image, num_text),
            carry=JointCarry(num_image=num_image, joint=num_text is not None, dtype=query.dtype),
        )

    def finish(self, attn: torch.nn.Module, out: torch.Tensor, projected: Projected) -> Any:
        carry: JointCarry = projected.carry
        hidden_states = merge_heads(out).to(carry.dtype)
        encoder_hidden_states = None
        if carry.joint:
            num_image = carry.num_image
            hidden_states, encoder_hidden_states = hidden_states[:, :num_image], hidden_states[:, num_image:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if carry.joint:
            return hidden_states, encoder_hidden_states
        return hidden_states


@register_adapter
class FusedJointAttentionAdapter(Adapter):
    """``FusedJointAttnProcessor2_0``: one ``to_qkv`` and one ``to_added_qkv`` projection, concatenated before
    the head split. Like the stock processor it applies no QK-norm and needs ``encoder_hidden_states``.
    """

    family = "sd3"
    stock_processors = ("FusedJointAttnProcessor2_0",)

    def project(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext) -> Projected:
        hidden_states = call.hidden_states
        encoder_hidden_states = call.encoder_hidden_states
        if encoder_hidden_states is None:
            raise UnsupportedModelError(
                "FusedJointAttnProcessor2_0 needs encoder_hidden_states; diffusers' fused SD3 processor cannot run "
                "image-only attention (SD3.5's attn2). Call transformer.unfuse_qkv_projections() before diffaccel.apply"
            )
        if hidden_states.ndim != 3 or encoder_hidden_states.ndim != 3:
            # The stock processor also flattens 4-D (batch, channels, height, width) inputs; SD3 never passes them.
            raise LayoutError(
                "FusedJointAttnProcessor2_0 inputs must be shaped (batch, tokens, channels), got "
                f"{tuple(hidden_states.shape)} and {tuple(encoder_hidden_states.shape)}"
            )
        num_image, num_text = hidden_states.shape[1], encoder_hidden_states.shape[1]

        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        text_query, text_key, text_value = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        query = split_heads(torch.cat([query, text_query], dim=1), attn.heads)
        key = split_heads(torch.cat([key, text_key], dim=1), attn.heads)
        value = split_heads(torch.cat([value, text_value], dim=1), attn.heads)

        return Projected(
            query, key, value, joint_layout(ctx, num_image, num_text),
            carry=JointCarry(num_image=num_image, joint=True, dtype=query.dtype),
        )

    def finish(self, attn: torch.nn.Module, out: torch.Tensor, projected: Projected) -> Any:
        carry: JointCarry = projected.carry
        hidden_states = merge_heads(out).to(carry.dtype)
        num_image = carry.num_image
        hidden_states, encoder_hidden_states = hidden_states[:, :num_image], hidden_states[:, num_image:]
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def _read_sd3_inputs(model: torch.nn.Module, args: dict[str, Any]) -> tuple[tuple[int, int], int | None]:
    """Grid: the latent ``(H, W)`` divided by the patch size (``PatchEmbed`` is a stride-``patch`` conv)."""
    hidden_states = args["hidden_states"]
    if hidden_states.ndim != 4:
        raise LayoutError(
            "SD3 transformer input must be a latent shaped (batch, channels, height, width), got "
            f"{tuple(hidden_states.shape)}"
        )
    patch = int(model.config.patch_size)
    grid = (int(hidden_states.shape[-2]) // patch, int(hidden_states.shape[-1]) // patch)
    encoder_hidden_states = args.get("encoder_hidden_states")
    text_len = None if encoder_hidden_states is None else int(encoder_hidden_states.shape[1])
    return grid, text_len


register_family(
    ModelFamily(
        name="sd3",
        model_classes=("SD3Transformer2DModel",),
        read_inputs=_read_sd3_inputs,
        description="Stable Diffusion 3 / 3.5 MMDiT (joint attention, text tokens after image tokens)",
    )
)


@register_processor_inference(priority=10)
def _joint_attention(attn: torch.nn.Module, call: AttentionCall | None) -> str | None:
    """A generic ``Attention`` with text projections for joint attention (``context_pre_only`` set) runs
    ``JointAttnProcessor2_0`` in SD3, unless the call shows another family.

    HunyuanVideo's (and HunyuanImage's, QwenImage's, EasyAnimate's) double-stream ``Attention`` is built the
    same way as SD3.5's (``added_kv_proj_dim``, ``context_pre_only=False``, RMS QK-norm, biased projections),
    so the module alone cannot tell them apart; their processors always receive rotary embeddings, which SD3
    never passes. AuraFlow's joint ``Attention`` has bias-free projections. Without the call, no guess.
    """
    if type(attn).__name__ != "Attention" or call is None:
        return None
    if getattr(attn, "added_kv_proj_dim", None) is None or getattr(attn, "context_pre_only", None) is None:
        return None
    if getattr(attn, "add_q_proj", None) is None or not getattr(attn, "use_bias", False):
        return None
    if call.image_rotary_emb is not None:
        return None
    return "JointAttnProcessor2_0"
