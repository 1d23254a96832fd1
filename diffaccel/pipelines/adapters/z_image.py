"""Z-Image (``ZImageTransformer2DModel``): routed through the stock processor.

``ZSingleStreamAttnProcessor`` runs three kinds of calls: the noise refiner (image tokens only, 2 of the real
model's 34 layers), the context refiner (caption tokens only) and the main layers over the unified sequence
``[image, caption]``. The method runs on the main layers; both refiners stay dense (one token geometry for every
layer, which calibrated methods such as PARO need). The model pads the
image tokens and the caption each to a multiple of 32 with learned pad tokens that stay attended; in the layout the
grid covers the image tokens and the image pads plus the caption form the suffix of global (text) tokens. A batch
whose samples have different caption lengths gets a trailing key mask, which becomes the valid text lengths.
Omni (multi-image) inputs have no single grid and run dense.

Tongyi-MAI, Z-Image (2025), arXiv:2511.22699.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

from diffaccel.context import RunContext
from diffaccel.layout import Grid, TokenLayout
from diffaccel.pipelines.adapters.base import AttentionCall, ModelFamily, register_processor_inference, is_text_only, register_adapter, register_family
from diffaccel.pipelines.adapters.dispatch import RoutedAdapter, grid_or_none, prepare_routed
from diffaccel.pipelines.adapters.padding import trailing_padding_lengths


DENSE_REFINERS = ("noise_refiner.", "context_refiner.", "siglip_refiner.")
"""Module-name prefixes of Z-Image's refiner layers, which stay dense."""


@register_adapter
class ZImageAdapter(RoutedAdapter):
    family = "z_image"
    stock_processors = ("ZSingleStreamAttnProcessor",)

    def layout(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext, query: torch.Tensor,
               key: torch.Tensor, attn_mask: torch.Tensor | None, index: int) -> tuple[TokenLayout, Any]:
        num_tokens = query.shape[1]
        refiner = (ctx.layer or "").startswith(DENSE_REFINERS)
        if refiner or is_text_only(attn) or ctx.grid is None or math.prod(ctx.grid) > num_tokens:
            return TokenLayout(num_tokens=num_tokens, grid=None), attn_mask
        num_visual = math.prod(ctx.grid)
        num_text = num_tokens - num_visual
        grid = grid_or_none(ctx, num_visual, "Z-Image")
        lengths = None
        if attn_mask is not None and num_text:
            lengths = trailing_padding_lengths(attn_mask, num_visual, num_text)
        text = slice(num_visual, num_tokens) if num_text else None
        return TokenLayout(num_tokens=num_tokens, grid=grid, text=text, text_lengths=lengths), attn_mask


def z_image_grid(x: Any, patch_size: int, f_patch_size: int) -> Grid | None:
    """The token grid of the latents list ``x`` (one ``(C, F, H, W)`` tensor per sample, all the same shape)."""
    if not isinstance(x, (list, tuple)) or not x or not all(isinstance(t, torch.Tensor) for t in x):
        return None  # omni mode passes nested lists (several images per sample)
    shapes = {tuple(t.shape[1:]) for t in x}
    if len(shapes) != 1:
        return None
    frames, height, width = next(iter(shapes))
    grid = (frames // f_patch_size, height // patch_size, width // patch_size)
    return grid[1:] if grid[0] == 1 else grid


def _read_z_image_inputs(model: torch.nn.Module, args: dict[str, Any]) -> tuple[Grid | None, int | None]:
    return z_image_grid(args.get("x"), int(args.get("patch_size", 2)), int(args.get("f_patch_size", 1))), None


register_family(
    ModelFamily(
        name="z_image",
        model_classes=("ZImageTransformer2DModel",),
        read_inputs=_read_z_image_inputs,
        description="Z-Image (single-stream: image tokens then caption tokens, each padded to 32; context refiner "
        "dense)",
        text_only_modules=("context_refiner",),
    )
)

@register_processor_inference(priority=5)
def _infer_z_image(attn: torch.nn.Module, call: AttentionCall | None) -> str | None:
    """Z-Image's layers run the generic ``Attention``; only its processor takes ``freqs_cis``."""
    if call is not None and "freqs_cis" in call.extra:
        return "ZSingleStreamAttnProcessor"
    return None

prepare_routed(ZSingleStreamAttnProcessor)
