"""FLUX.3 (``Flux3Transformer2DModel``): routed through the stock processor (transformer only: diffusers 0.42 ships
no FLUX.3 pipeline).

Every attention runs ``Flux3AttnProcessor``. Per-mode blocks attend within one token mode: the text blocks
(``txt_mode_blocks``, dense), the image blocks (``mode_blocks.image``: the image grid, no text) and the reference-image
blocks (``mode_blocks.image_cond``: dense). The joint single-stream blocks attend over ``[text, image]`` (text first,
its length from the hook); with reference tokens appended (``[text, image, reference]``) they have no single grid
and run dense (said once). The grid comes from the 4-axis ``img_ids`` as in FLUX.2.

Black Forest Labs, FLUX.3 (diffusers ``transformer_flux3.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_flux3 import Flux3AttnProcessor

from diffaccel.context import RunContext
from diffaccel.layout import TokenLayout
from diffaccel.pipelines.adapters.base import (
    AttentionCall,
    ModelFamily,
    is_text_only,
    register_adapter,
    register_family,
)
from diffaccel.pipelines.adapters.dispatch import RoutedAdapter, grid_or_none, joint_layout, prepare_routed
from diffaccel.pipelines.adapters.flux2 import ReadIdsGrid

IMAGE_MODE_BLOCKS = "mode_blocks.image."
JOINT_BLOCKS = "single_transformer_blocks."


@register_adapter
class Flux3Adapter(RoutedAdapter):
    family = "flux3"
    stock_processors = ("Flux3AttnProcessor",)
    positional_calls = {"Flux3Attention": ("attention_mask", "image_rotary_emb")}

    def layout(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext, query: torch.Tensor,
               key: torch.Tensor, attn_mask: torch.Tensor | None, index: int) -> tuple[TokenLayout, Any]:
        num_tokens = query.shape[1]
        name = ctx.layer or ""
        if is_text_only(attn) or not (IMAGE_MODE_BLOCKS in name or name.startswith(JOINT_BLOCKS)):
            return TokenLayout(num_tokens=num_tokens, grid=None), attn_mask  # text / reference-image mode blocks
        num_text = 0 if IMAGE_MODE_BLOCKS in name else int(ctx.text_len or 0)
        num_text = min(num_text, num_tokens)
        grid = grid_or_none(ctx, num_tokens - num_text, "FLUX.3")
        return joint_layout(num_tokens, grid, num_text, text_first=True), attn_mask


_read_flux3_inputs = ReadIdsGrid("FLUX.3")


register_family(
    ModelFamily(
        name="flux3",
        model_classes=("Flux3Transformer2DModel",),
        read_inputs=_read_flux3_inputs,
        description="FLUX.3 (per-mode image blocks and joint [text, image] single-stream blocks; text and "
        "reference-image blocks dense)",
        text_only_modules=("txt_mode_blocks",),
    )
)

prepare_routed(Flux3AttnProcessor)
