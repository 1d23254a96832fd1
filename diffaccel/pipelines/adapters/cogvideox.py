"""CogVideoX attention (generic ``Attention`` with ``CogVideoXAttnProcessor2_0``): text prefix, then video.

The processor concatenates ``[text tokens, video tokens]`` itself, projects them with one set of weights,
applies per-head LayerNorm QK-norm, and rotates only the video part (CogVideoX 5B and 1.5; the 2B model
has no RoPE). The layout's text slice is the prefix ``[0, text_len)``, the grid is the patchified latent
``(F, H, W)``. ``FusedCogVideoXAttnProcessor2_0`` (after ``fuse_qkv_projections``) is the same math with one
fused QKV projection.

Mirrors ``diffusers.models.attention_processor.CogVideoXAttnProcessor2_0`` and its fused variant.
Yang et al., "CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer" (2024).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers.models.embeddings import apply_rotary_emb

from diffaccel.context import RunContext
from diffaccel.layout import TokenLayout
from diffaccel.pipelines.adapters.base import (
    Adapter,
    AttentionCall,
    ModelFamily,
    Projected,
    merge_heads,
    patchified_video_grid,
    register_adapter,
    register_family,
    register_processor_inference,
    grid_or_unknown,
)


@register_adapter
class CogVideoXAttentionAdapter(Adapter):
    """``CogVideoXAttnProcessor2_0``: ``[text, video]`` joint self-attention, RoPE on the video tokens."""

    family = "cogvideox"
    stock_processors = ("CogVideoXAttnProcessor2_0",)
    fused: ClassVar[bool] = False

    def project(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext) -> Projected:
        text = call.encoder_hidden_states
        num_text = text.size(1)
        hidden_states = torch.cat([text, call.hidden_states], dim=1)

        # the fused stock processor reads the mask's batch and length from the text (kept for exactness)
        batch_size, sequence_length, _ = text.shape if self.fused else hidden_states.shape
        attention_mask = call.attention_mask
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if self.fused:
            qkv = attn.to_qkv(hidden_states)
            query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        batch_size = hidden_states.shape[0]
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        rotary = call.image_rotary_emb
        if rotary is not None:
            query = torch.cat([query[:, :, :num_text], apply_rotary_emb(query[:, :, num_text:], rotary)], dim=2)
            if not attn.is_cross_attention:
                key = torch.cat([key[:, :, :num_text], apply_rotary_emb(key[:, :, num_text:], rotary)], dim=2)

        num_tokens = query.shape[2]
        grid, _, unknown = grid_or_unknown(ctx, num_tokens - num_text, video=True)
        layout = TokenLayout(num_tokens=num_tokens, grid=grid, text=slice(0, num_text), unknown=unknown)
        return Projected(query, key, value, layout, attn_mask=attention_mask, carry=num_text)  # finish needs only the text length (text first)

    def finish(self, attn: torch.nn.Module, out: torch.Tensor, projected: Projected) -> Any:
        hidden_states = merge_heads(out)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        num_text: int = projected.carry
        text, hidden_states = hidden_states.split([num_text, hidden_states.size(1) - num_text], dim=1)
        return hidden_states, text


@register_adapter
class FusedCogVideoXAttentionAdapter(CogVideoXAttentionAdapter):
    """``FusedCogVideoXAttnProcessor2_0``: the same attention with one fused QKV projection."""

    stock_processors = ("FusedCogVideoXAttnProcessor2_0",)
    fused = True


def _read_cogvideox_inputs(model: torch.nn.Module, args: dict[str, Any]) -> tuple[tuple[int, int, int], int]:
    config = model.config
    patch = (config.patch_size_t or 1, config.patch_size, config.patch_size)
    grid = patchified_video_grid(args["hidden_states"], patch, frames_dim=1, model=type(model).__name__)
    return grid, int(args["encoder_hidden_states"].shape[1])


register_family(
    ModelFamily(
        name="cogvideox",
        model_classes=("CogVideoXTransformer3DModel",),
        read_inputs=_read_cogvideox_inputs,
        description="CogVideoX 1.0 / 1.5 (joint attention, text tokens before video tokens)",
    )
)


@register_processor_inference(priority=20)
def _cogvideox_attention(attn: torch.nn.Module, call: AttentionCall | None) -> str | None:
    """A generic self-``Attention`` (no text projections, not a cross-attention module) that is handed text runs
    CogVideoX's processor, which prepends the text to the video tokens.

    UNet cross-attention modules are built with ``cross_attention_dim`` (``is_cross_attention``); SD3 and
    HunyuanVideo dual-stream modules have ``added_kv_proj_dim``; HunyuanVideo single-stream ones are
    ``pre_only``. Without the call, no guess.
    """
    if type(attn).__name__ != "Attention" or call is None or call.encoder_hidden_states is None:
        return None
    if attn.is_cross_attention or attn.added_kv_proj_dim is not None or attn.pre_only:
        return None
    if attn.context_pre_only is not None:
        return None
    if attn.norm_q is not None and not isinstance(attn.norm_q, torch.nn.LayerNorm):
        return None
    if getattr(attn, "fused_projections", False):
        return "FusedCogVideoXAttnProcessor2_0"
    return "CogVideoXAttnProcessor2_0"
