"""Tiny random image denoisers (SD3/SD3.5, FLUX.1, SD1.5-/SDXL-like UNets) and their forward inputs, for tests.

Sizes are the smallest that still exercise every code path: two heads, head_dim 8, one or two blocks, latents
of 8x8 (square) and 8x12 (non-square).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

TEXT_LEN = 5
"""Text tokens of the joint-attention models (not a multiple of anything, so a misplaced slice shows)."""


def tiny_sd3(*, sd35: bool = False) -> SD3Transformer2DModel:
    """SD3 (two joint blocks, the last ``context_pre_only``) or SD3.5-like (RMS QK-norm, dual attention in block 0)."""
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,) if sd35 else (),
        qk_norm="rms_norm" if sd35 else None,
    ).eval()


def sd3_inputs(height: int, width: int, *, batch: int = 2, timestep: float = 500.0) -> dict[str, Any]:
    return {
        "hidden_states": torch.randn(batch, 4, height, width),
        "encoder_hidden_states": torch.randn(batch, TEXT_LEN, 12),
        "pooled_projections": torch.randn(batch, 8),
        "timestep": torch.full((batch,), timestep),
    }


def tiny_flux(*, guidance_embeds: bool = False) -> FluxTransformer2DModel:
    """FLUX.1 with one double-stream and one single-stream block; RoPE axes (2, 2, 4) over head_dim 8."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=8,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def flux_image_ids(rows: int, cols: int) -> torch.Tensor:
    """Position ids as ``FluxPipeline._prepare_latent_image_ids`` builds them: row-major, (rows*cols, 3)."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] += torch.arange(rows)[:, None]
    ids[..., 2] += torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


def flux_inputs(
    rows: int, cols: int, *, batch: int = 2, timestep: float = 0.5, guidance: bool = False
) -> dict[str, Any]:
    """Inputs for a packed latent of ``rows x cols`` tokens (the pipeline's latent is twice that in pixels/8)."""
    inputs = {
        "hidden_states": torch.randn(batch, rows * cols, 8),
        "encoder_hidden_states": torch.randn(batch, TEXT_LEN, 12),
        "pooled_projections": torch.randn(batch, 8),
        "timestep": torch.full((batch,), timestep),
        "img_ids": flux_image_ids(rows, cols),
        "txt_ids": torch.zeros(TEXT_LEN, 3),
    }
    if guidance:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


def tiny_unet(*, sdxl: bool = False) -> UNet2DConditionModel:
    """Two levels with attention at both (full and half resolution) plus the mid block.

    ``sdxl``: linear projections, two transformer layers at the second level, ``text_time`` added conditioning.
    """
    common = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        cross_attention_dim=12,
        attention_head_dim=2,  # diffusers' UNet calls the head count attention_head_dim
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    if sdxl:
        common.update(
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=8 + 6 * 4,
        )
    return UNet2DConditionModel(**common).eval()


def unet_inputs(
    height: int, width: int, *, batch: int = 2, timestep: float = 500.0, sdxl: bool = False
) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, 4, height, width),
        "timestep": torch.full((batch,), timestep),
        "encoder_hidden_states": torch.randn(batch, 7, 12),
    }
    if sdxl:
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 8), "time_ids": torch.randn(batch, 6)}
    return inputs


# name -> (build model, build inputs(height, width, **kw)); height and width are latent pixels for every model
# (FLUX's packed latent has one token per 2x2 latent pixels, as SD3's patch size 2 gives).
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[..., dict[str, Any]]]] = {
    "sd3": (lambda: tiny_sd3(), lambda h, w, **kw: sd3_inputs(h, w, **kw)),
    "sd35": (lambda: tiny_sd3(sd35=True), lambda h, w, **kw: sd3_inputs(h, w, **kw)),
    "flux": (lambda: tiny_flux(), lambda h, w, **kw: flux_inputs(h // 2, w // 2, **kw)),
    "flux-guidance": (
        lambda: tiny_flux(guidance_embeds=True),
        lambda h, w, **kw: flux_inputs(h // 2, w // 2, guidance=True, **kw),
    ),
    "sd15-unet": (lambda: tiny_unet(), lambda h, w, **kw: unet_inputs(h, w, **kw)),
    "sdxl-unet": (lambda: tiny_unet(sdxl=True), lambda h, w, **kw: unet_inputs(h, w, sdxl=True, **kw)),
}

TRANSFORMERS = ("sd3", "sd35", "flux", "flux-guidance")
"""The DiTs among :data:`MODELS` (their attention sees flattened tokens: no grid without diffaccel.apply's hook)."""

LATENT_SIZES = {"square": (8, 8), "non-square": (8, 12)}


def run(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "NaN or inf in an output"
    return float((a - b).abs().max())
