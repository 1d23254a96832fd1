"""Build a denoiser from a :class:`~diffaccel.bench.model_configs.ModelConfig` and random inputs for one call.

The model is constructed directly on the target device in the target dtype (``torch.device`` context and the
default dtype set for the construction; no float32 copy on the host), its parameters then redrawn from a seeded
normal distribution (std 0.02, the usual transformer init): a step's compute does not depend on the values.
Inputs follow what each family's diffusers pipeline passes to the denoiser (latents, prompt embeddings, pooled
embeddings, timesteps, position ids, RoPE tables, guidance), with random normal values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from diffaccel.bench.model_configs import Geometry, ModelConfig

__all__ = ["build_denoiser", "denoiser_inputs"]

INIT_STD = 0.02
"""Standard deviation of the random weights."""


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_denoiser(mc: ModelConfig, *, scale: str, dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    """The denoiser of ``mc`` at ``scale`` on ``device`` in ``dtype``, random weights, in eval mode."""
    import diffusers

    cls = getattr(diffusers, mc.model_class)
    kwargs = mc.constructor_kwargs(scale)
    with torch.device(device), _default_dtype(dtype):
        model = cls(**kwargs)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.normal_(0.0, INIT_STD, generator=gen)
    # what from_pretrained(torch_dtype=...) keeps in float32 (Wan: rope, time embedder, norms)
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    if keep and dtype != torch.float32:
        for name, module in model.named_modules():
            if any(part in keep for part in name.split(".")):
                module.float()
    return model.eval()


def _randn(shape: tuple[int, ...], gen: torch.Generator, device: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


def denoiser_inputs(
    mc: ModelConfig, model: torch.nn.Module, geo: Geometry, *, batch: int, dtype: torch.dtype, device: str, seed: int = 0
) -> dict[str, Any]:
    """Keyword arguments of one denoiser call of ``mc`` at ``geo`` with ``batch`` rows (random values).

    The timestep is a mid-schedule value (500 of 1000, or 0.5 where the pipeline passes t/1000).
    """
    cfg = model.config
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    f_lat, h_lat, w_lat = geo.latent
    text = geo.text_len
    b = batch

    def randn(*shape: int) -> torch.Tensor:
        return _randn(tuple(shape), gen, device, dtype)

    def timestep(value: float, tdtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.full((b,), value, device=device, dtype=tdtype)

    if mc.family == "flux":
        gh, gw = geo.grid
        img_ids = torch.zeros(gh, gw, 3, device=device)
        img_ids[..., 1] += torch.arange(gh, device=device)[:, None]
        img_ids[..., 2] += torch.arange(gw, device=device)[None, :]
        kwargs = dict(
            hidden_states=randn(b, gh * gw, cfg.in_channels),
            encoder_hidden_states=randn(b, text, cfg.joint_attention_dim),
            pooled_projections=randn(b, cfg.pooled_projection_dim),
            timestep=timestep(0.5, dtype),
            img_ids=img_ids.reshape(gh * gw, 3).to(dtype),
            txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
        )
        if cfg.guidance_embeds:
            kwargs["guidance"] = timestep(3.5)
        return kwargs
    if mc.family == "sd3":
        return dict(
            hidden_states=randn(b, cfg.in_channels, h_lat, w_lat),
            encoder_hidden_states=randn(b, text, cfg.joint_attention_dim),
            pooled_projections=randn(b, cfg.pooled_projection_dim),
            timestep=timestep(500.0, dtype),
        )
    if mc.family == "wan":
        return dict(
            hidden_states=randn(b, cfg.in_channels, f_lat, h_lat, w_lat),
            encoder_hidden_states=randn(b, text, cfg.text_dim),
            timestep=timestep(500.0),
        )
    if mc.family == "hunyuan_video":
        kwargs = dict(
            hidden_states=randn(b, cfg.in_channels, f_lat, h_lat, w_lat),
            encoder_hidden_states=randn(b, text, cfg.text_embed_dim),
            encoder_attention_mask=torch.ones(b, text, device=device, dtype=dtype),
            pooled_projections=randn(b, cfg.pooled_projection_dim),
            timestep=timestep(500.0, dtype),
        )
        if cfg.guidance_embeds:
            kwargs["guidance"] = timestep(6.0 * 1000.0, dtype)
        return kwargs
    if mc.family == "cogvideox":
        return dict(
            hidden_states=randn(b, f_lat, cfg.in_channels, h_lat, w_lat),
            encoder_hidden_states=randn(b, text, cfg.text_embed_dim),
            timestep=timestep(500.0, torch.int64),
            image_rotary_emb=_cogvideox_rope(mc, model, geo, device) if cfg.use_rotary_positional_embeddings else None,
        )
    if mc.family == "ltx":
        return dict(
            hidden_states=randn(b, f_lat * h_lat * w_lat, cfg.in_channels),
            encoder_hidden_states=randn(b, text, cfg.caption_channels),
            encoder_attention_mask=torch.ones(b, text, device=device, dtype=torch.int64),
            timestep=timestep(500.0),
            num_frames=f_lat,
            height=h_lat,
            width=w_lat,
            # LTXPipeline: (vae_temporal / frame_rate, vae_spatial, vae_spatial) at its default 25 fps
            rope_interpolation_scale=(mc.vae_temporal / 25.0, mc.vae_spatial, mc.vae_spatial),
        )
    raise ValueError(f"no input builder for family {mc.family!r}")  # a ModelConfig bug, not user input


def _cogvideox_rope(mc: ModelConfig, model: torch.nn.Module, geo: Geometry, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CogVideoX's 3-D RoPE tables as CogVideoXPipeline._prepare_rotary_positional_embeddings builds them (1.0)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    cfg = model.config
    _, gh, gw = geo.grid
    base_w, base_h = cfg.sample_width // cfg.patch_size, cfg.sample_height // cfg.patch_size
    crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
    return get_3d_rotary_pos_embed(
        embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=(gh, gw), temporal_size=geo.latent[0],
        device=torch.device(device),
    )  # fmt: skip
