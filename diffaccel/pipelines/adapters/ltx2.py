"""LTX-2 (``LTX2VideoTransformer3DModel``, joint audio-video): routed through the stock processor.

Every attention of LTX-2 runs ``LTX2AudioVideoAttnProcessor``. The method runs on the video self-attention
(``attn1`` of each block: packed video tokens, no text, the grid from ``num_frames``/``height``/``width``); the
audio self-attention, the text cross-attentions and the audio-video cross-modal attentions stay dense (said once),
as no method here is written for audio tokens.

Lightricks, LTX-2 (2025), https://github.com/Lightricks/LTX-2.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoAttnProcessor

from diffaccel.context import RunContext
from diffaccel.errors import LayoutError
from diffaccel.layout import Grid, TokenLayout
from diffaccel.pipelines.adapters.base import AttentionCall, ModelFamily, register_adapter, register_family
from diffaccel.pipelines.adapters.dispatch import RoutedAdapter, grid_or_none, prepare_routed
from diffaccel.warn import warn_once

VIDEO_SELF_ATTENTION = "attn1"
"""The attribute name of the video self-attention in ``LTX2VideoTransformerBlock``."""


@register_adapter
class LTX2Adapter(RoutedAdapter):
    family = "ltx2"
    stock_processors = ("LTX2AudioVideoAttnProcessor",)
    positional_calls = {
        "LTX2Attention": ("encoder_hidden_states", "attention_mask", "query_rotary_emb", "key_rotary_emb")
    }

    def layout(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext, query: torch.Tensor,
               key: torch.Tensor, attn_mask: torch.Tensor | None, index: int) -> tuple[TokenLayout, Any]:
        num_tokens, num_keys = query.shape[1], key.shape[1]
        name = ctx.layer or ""
        if name.rsplit(".", 1)[-1] == VIDEO_SELF_ATTENTION and call.encoder_hidden_states is None:
            return TokenLayout(num_tokens=num_tokens, grid=grid_or_none(ctx, num_tokens, "LTX-2")), attn_mask
        warn_once(
            "ltx2-dense-streams",
            "diffaccel: LTX-2 runs the method on the video self-attention only; its audio self-attention, text "
            "cross-attentions and audio-video cross-modal attentions stay dense",
        )
        if call.encoder_hidden_states is not None:
            return TokenLayout(num_tokens=num_tokens, grid=None, is_cross=True, num_keys=num_keys), attn_mask
        return TokenLayout(num_tokens=num_tokens, grid=None), attn_mask


def _read_ltx2_inputs(model: torch.nn.Module, args: dict[str, Any]) -> tuple[Grid | None, None]:
    num_tokens = int(args["hidden_states"].shape[1])
    sizes = tuple(args.get(name) for name in ("num_frames", "height", "width"))
    if any(s is None for s in sizes):
        return None, None
    cfg = model.config
    grid = (int(sizes[0]) // cfg.patch_size_t, int(sizes[1]) // cfg.patch_size, int(sizes[2]) // cfg.patch_size)
    if math.prod(grid) != num_tokens:
        raise LayoutError(
            f"LTX2VideoTransformer3DModel got num_frames, height, width = {sizes} ({math.prod(grid)} tokens after "
            f"patching) for {num_tokens} video tokens; pass the latent sizes, as LTX2Pipeline does"
        )
    return grid, None


register_family(
    ModelFamily(
        name="ltx2",
        model_classes=("LTX2VideoTransformer3DModel",),
        read_inputs=_read_ltx2_inputs,
        description="LTX-2 (video self-attention runs the method; audio and cross-modal attention dense)",
    )
)

prepare_routed(LTX2AudioVideoAttnProcessor)
