"""HunyuanVideo-1.5 (``HunyuanVideo15Transformer3DModel``): routed through the stock processor.

``HunyuanVideo15AttnProcessor2_0`` attends over ``[video, text]`` (text after the video tokens). The model reorders
its prompt tokens (LLM text, ByT5 glyph text, image embeddings) so the valid ones come first and passes the prompt's
``(batch, text)`` key mask; the processor turns it into a query x key mask that also hides the padded text rows. The
method gets the layout's valid text lengths and the equivalent key-padding mask: every valid row attends exactly as
in the stock call, and the padded text rows (never attended to, as keys they are masked) get finite values instead of
the fully-masked rows' output. The token refiner attends over text only and stays dense.

Tencent Hunyuan, HunyuanVideo 1.5 Technical Report (2025), arXiv:2511.18870.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

from diffaccel.context import RunContext
from diffaccel.layout import Grid, TokenLayout
from diffaccel.pipelines.adapters.base import (
    AttentionCall,
    ModelFamily,
    is_text_only,
    patchified_video_grid,
    register_adapter,
    register_family,
)
from diffaccel.pipelines.adapters.dispatch import RoutedAdapter, grid_or_none, joint_layout, prefix_lengths, prepare_routed


@register_adapter
class HunyuanVideo15Adapter(RoutedAdapter):
    family = "hunyuan_video15"
    stock_processors = ("HunyuanVideo15AttnProcessor2_0",)

    def layout(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext, query: torch.Tensor,
               key: torch.Tensor, attn_mask: torch.Tensor | None, index: int) -> tuple[TokenLayout, Any]:
        num_tokens = query.shape[1]
        if is_text_only(attn) or call.encoder_hidden_states is None:
            return TokenLayout(num_tokens=num_tokens, grid=None), attn_mask
        num_text = int(call.encoder_hidden_states.shape[1])
        grid = grid_or_none(ctx, num_tokens - num_text, "HunyuanVideo-1.5")
        text_mask = call.attention_mask
        lengths = prefix_lengths(text_mask) if text_mask is not None and text_mask.shape[-1] == num_text else None
        if lengths is None:
            return joint_layout(num_tokens, grid, num_text, text_first=False), attn_mask
        keys = torch.ones(query.shape[0], num_tokens, dtype=torch.bool, device=query.device)
        keys[:, num_tokens - num_text:] = text_mask.bool()
        mask = None if all(n == num_text for n in lengths) else keys[:, None, None, :]
        if mask is None:
            lengths = None
        return joint_layout(num_tokens, grid, num_text, text_first=False, text_lengths=lengths), mask


def _read_hv15_inputs(model: torch.nn.Module, args: dict[str, Any]) -> tuple[Grid | None, int | None]:
    cfg = model.config
    grid = patchified_video_grid(args["hidden_states"], (cfg.patch_size_t, cfg.patch_size, cfg.patch_size),
                                 frames_dim=2, model="HunyuanVideo15Transformer3DModel")
    return grid, None


register_family(
    ModelFamily(
        name="hunyuan_video15",
        model_classes=("HunyuanVideo15Transformer3DModel",),
        read_inputs=_read_hv15_inputs,
        description="HunyuanVideo-1.5 (joint attention, video tokens then padded prompt tokens; token refiner dense)",
        text_only_modules=("context_embedder",),
    )
)

prepare_routed(HunyuanVideo15AttnProcessor2_0)
