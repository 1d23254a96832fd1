"""The real denoiser configurations the end-to-end benchmark builds, and their latent geometry.

Each :class:`ModelConfig` holds the constructor arguments of one diffusers denoiser, copied from the
``transformer/config.json`` of the model's Hugging Face repository (``source``; the numbers are written here so
nothing is downloaded), the VAE factors and patch sizes that turn a height/width/frame count into the denoiser's
input shapes, the pipeline's default size, prompt length and classifier-free-guidance mode, and a ``tiny`` variant
(same family and code path, a few layers, 2 heads, 16-32 channels, a small size) for CPU runs
(``--scale tiny``). Random weights stand in for the real ones: the compute of a step does not depend on the weight
values (BENCHMARKS.md, "End-to-end").

Only torch-free data lives here; :mod:`diffaccel.bench.e2e_inputs` builds the tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from diffaccel.errors import ConfigError

__all__ = ["MODEL_CONFIGS", "Geometry", "ModelConfig", "geometry", "model_config", "model_config_names"]

SCALES = ("full", "tiny")
"""``full``: the real configuration and size; ``tiny``: the same family shrunk to run in seconds on a CPU."""

CFG_MODES = ("none", "batched", "sequential")
"""How one denoising step calls the denoiser in the model's diffusers pipeline: ``none`` (guidance-distilled, one
call at batch 1), ``batched`` (conditional and unconditional rows in one call at batch 2: SD3, CogVideoX, LTX),
``sequential`` (two calls at batch 1: Wan)."""


@dataclass(frozen=True)
class ModelConfig:
    """One denoiser: its diffusers class and configuration, and how a size becomes its inputs.

    Attributes:
        name: the ``--model-config`` name.
        family: input convention (``flux``, ``sd3``, ``wan``, ``hunyuan_video``, ``cogvideox``, ``ltx``).
        model_class: the diffusers class name.
        source: where the configuration numbers come from.
        config: constructor keywords at full size.
        tiny: keyword overrides at ``--scale tiny``.
        vae_spatial: pixels per latent pixel (height and width).
        vae_temporal: frames per latent frame (``None`` for image models); frame counts are ``vae_temporal*k + 1``.
        patch: (frames, height, width) latent pixels per token (the denoiser's patchify or FLUX's 2x2 packing).
        latent_channels: VAE latent channels (before FLUX's packing).
        size: default (height, width, frames) at full size (frames 1 for images); ``tiny_size`` at tiny scale.
        text_len: prompt tokens the pipeline passes (its ``max_sequence_length`` default); ``tiny_text_len``.
        cfg: one of :data:`CFG_MODES`.
        num_steps: the pipeline's default number of denoising steps (the step schedule methods see).
        size_multiple: height and width must be multiples of this (VAE factor times patch, or what the pipeline
            itself requires).
    """

    name: str
    family: str
    model_class: str
    source: str
    config: dict[str, Any]
    tiny: dict[str, Any]
    vae_spatial: int
    vae_temporal: int | None
    patch: tuple[int, int, int]
    latent_channels: int
    size: tuple[int, int, int]
    tiny_size: tuple[int, int, int]
    text_len: int
    tiny_text_len: int
    cfg: str
    num_steps: int
    size_multiple: int
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_video(self) -> bool:
        return self.vae_temporal is not None

    def constructor_kwargs(self, scale: str) -> dict[str, Any]:
        """The denoiser's constructor keywords at ``scale``."""
        check_scale(scale)
        return {**self.config, **self.tiny} if scale == "tiny" else dict(self.config)

    def default_size(self, scale: str) -> tuple[int, int, int]:
        check_scale(scale)
        return self.tiny_size if scale == "tiny" else self.size

    def prompt_len(self, scale: str) -> int:
        check_scale(scale)
        return self.tiny_text_len if scale == "tiny" else self.text_len

    def batch(self) -> int:
        """Rows of one denoiser call (2 with batched CFG)."""
        return 2 if self.cfg == "batched" else 1

    def calls_per_step(self) -> int:
        """Denoiser calls of one denoising step (2 with sequential CFG)."""
        return 2 if self.cfg == "sequential" else 1


@dataclass(frozen=True)
class Geometry:
    """The denoiser's input sizes for one pixel size.

    Attributes:
        height, width, frames: the pixel size (frames 1 for images).
        latent: (frames, height, width) of the VAE latent.
        grid: visual token grid after patchifying, ``(H, W)`` for images, ``(F, H, W)`` for videos.
        text_len: prompt tokens.
    """

    height: int
    width: int
    frames: int
    latent: tuple[int, int, int]
    grid: tuple[int, ...]
    text_len: int

    @property
    def visual_tokens(self) -> int:
        return math.prod(self.grid)

    def to_dict(self) -> dict[str, Any]:
        return {
            "height": self.height, "width": self.width, "frames": self.frames, "latent": list(self.latent),
            "grid": list(self.grid), "visual_tokens": self.visual_tokens, "text_tokens": self.text_len,
        }  # fmt: skip


def check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ConfigError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")


def geometry(
    mc: ModelConfig, *, scale: str = "full", height: int | None = None, width: int | None = None, frames: int | None = None
) -> Geometry:
    """The latent and token sizes of ``mc`` at a pixel size (the scale's default where ``None``); sizes checked.

    Raises:
        ConfigError: a size that is not a positive multiple of ``mc.size_multiple``, or a frame count that the VAE
            cannot encode (not ``vae_temporal*k + 1``; not 1 for an image model).
    """
    h0, w0, f0 = mc.default_size(scale)
    height, width, frames = height or h0, width or w0, frames or f0
    for label, value in (("--height", height), ("--width", width)):
        if value <= 0 or value % mc.size_multiple:
            raise ConfigError(f"{label} {value} is not allowed for {mc.name}: use a positive multiple of {mc.size_multiple}")
    if mc.vae_temporal is None:
        if frames != 1:
            raise ConfigError(f"--frames {frames} is not allowed for {mc.name}, an image model: use 1 (or leave it out)")
        latent_frames = 1
    else:
        if frames <= 0 or (frames - 1) % mc.vae_temporal:
            raise ConfigError(
                f"--frames {frames} is not allowed for {mc.name}: use {mc.vae_temporal}k+1 frames (the VAE compresses "
                f"{mc.vae_temporal} frames into one latent frame), e.g. {mc.default_size(scale)[2]}"
            )
        latent_frames = (frames - 1) // mc.vae_temporal + 1
    latent = (latent_frames, height // mc.vae_spatial, width // mc.vae_spatial)
    pt, ph, pw = mc.patch
    if latent[0] % pt:
        raise ConfigError(f"--frames {frames} gives {latent[0]} latent frames, not a multiple of {mc.name}'s temporal patch {pt}")
    grid3 = (latent[0] // pt, latent[1] // ph, latent[2] // pw)
    grid = grid3 if mc.is_video else grid3[1:]
    return Geometry(height, width, frames, latent, grid, mc.prompt_len(scale))


_TINY_TEXT = 16
"""Prompt tokens at tiny scale."""


MODEL_CONFIGS: dict[str, ModelConfig] = {}


def _register(mc: ModelConfig) -> None:
    MODEL_CONFIGS[mc.name] = mc


_register(ModelConfig(
    name="flux-dev",
    family="flux",
    model_class="FluxTransformer2DModel",
    source="black-forest-labs/FLUX.1-dev, transformer/config.json",
    config=dict(
        patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    tiny=dict(
        in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ),
    # 16 latent channels packed 2x2 into one token (FluxPipeline._pack_latents); tiny: 4 channels packed
    vae_spatial=8, vae_temporal=None, patch=(1, 2, 2), latent_channels=16,
    size=(1024, 1024, 1), tiny_size=(128, 128, 1), text_len=512, tiny_text_len=_TINY_TEXT,
    cfg="none", num_steps=28, size_multiple=16,
    notes="guidance-distilled: one call per step (guidance 3.5 as an input)",
))

_register(ModelConfig(
    name="sd3.5-large",
    family="sd3",
    model_class="SD3Transformer2DModel",
    source="stabilityai/stable-diffusion-3.5-large, transformer/config.json",
    config=dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm",
    ),
    tiny=dict(
        sample_size=16, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16,
    ),
    vae_spatial=8, vae_temporal=None, patch=(1, 2, 2), latent_channels=16,
    # 77 CLIP tokens + 256 T5 tokens (StableDiffusion3Pipeline, max_sequence_length=256)
    size=(1024, 1024, 1), tiny_size=(128, 128, 1), text_len=333, tiny_text_len=_TINY_TEXT,
    cfg="batched", num_steps=28, size_multiple=16,
))

_WAN_TINY = dict(
    num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1,
    rope_max_seq_len=32,
)

_register(ModelConfig(
    name="wan21-1.3b",
    family="wan",
    model_class="WanTransformer3DModel",
    source="Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json",
    config=dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
    ),
    tiny=_WAN_TINY,
    vae_spatial=8, vae_temporal=4, patch=(1, 2, 2), latent_channels=16,
    size=(480, 832, 81), tiny_size=(128, 128, 9), text_len=512, tiny_text_len=_TINY_TEXT,
    cfg="sequential", num_steps=50, size_multiple=16,
))

_register(ModelConfig(
    name="wan21-14b",
    family="wan",
    model_class="WanTransformer3DModel",
    source="Wan-AI/Wan2.1-T2V-14B-Diffusers, transformer/config.json",
    config=dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
    ),
    tiny=_WAN_TINY,
    vae_spatial=8, vae_temporal=4, patch=(1, 2, 2), latent_channels=16,
    size=(720, 1280, 81), tiny_size=(128, 128, 9), text_len=512, tiny_text_len=_TINY_TEXT,
    cfg="sequential", num_steps=50, size_multiple=16,
))

_register(ModelConfig(
    name="hunyuan-video",
    family="hunyuan_video",
    model_class="HunyuanVideoTransformer3DModel",
    source="hunyuanvideo-community/HunyuanVideo, transformer/config.json",
    config=dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
        rope_axes_dim=(16, 56, 56),
    ),
    tiny=dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6),
    ),
    vae_spatial=8, vae_temporal=4, patch=(1, 2, 2), latent_channels=16,
    size=(720, 1280, 129), tiny_size=(128, 128, 9), text_len=256, tiny_text_len=_TINY_TEXT,
    cfg="none", num_steps=50, size_multiple=16,
    notes="guidance-distilled: one call per step (embedded guidance 6.0)",
))

_register(ModelConfig(
    name="cogvideox-5b",
    family="cogvideox",
    model_class="CogVideoXTransformer3DModel",
    source="THUDM/CogVideoX-5b, transformer/config.json",
    config=dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True,
        freq_shift=0, time_embed_dim=512, text_embed_dim=4096, num_layers=42, dropout=0.0, attention_bias=True,
        sample_width=90, sample_height=60, sample_frames=49, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=226, activation_fn="gelu-approximate", timestep_activation_fn="silu",
        norm_elementwise_affine=True, norm_eps=1e-5, spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False,
    ),
    tiny=dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=1, sample_width=16, sample_height=16, sample_frames=9,
        max_text_seq_length=_TINY_TEXT,
    ),
    vae_spatial=8, vae_temporal=4, patch=(1, 2, 2), latent_channels=16,
    size=(480, 720, 49), tiny_size=(128, 128, 9), text_len=226, tiny_text_len=_TINY_TEXT,
    cfg="batched", num_steps=50, size_multiple=16,
))

_register(ModelConfig(
    name="ltx-video",
    family="ltx",
    model_class="LTXVideoTransformer3DModel",
    source="Lightricks/LTX-Video (0.9.1), transformer/config.json",
    config=dict(
        in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32, attention_head_dim=64,
        cross_attention_dim=2048, num_layers=28, activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096, attention_bias=True,
        attention_out_bias=True,
    ),
    tiny=dict(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=1, caption_channels=32,
    ),
    # the VAE compresses 32x in space and 8x in time; its latent is the token grid (patch 1)
    vae_spatial=32, vae_temporal=8, patch=(1, 1, 1), latent_channels=128,
    size=(480, 704, 161), tiny_size=(256, 256, 17), text_len=128, tiny_text_len=_TINY_TEXT,
    cfg="batched", num_steps=50, size_multiple=32,
))


def model_config_names() -> list[str]:
    return list(MODEL_CONFIGS)


def model_config(name: str) -> ModelConfig:
    """The configuration called ``name``; :class:`ConfigError` listing the known ones otherwise."""
    try:
        return MODEL_CONFIGS[name]
    except KeyError:
        raise ConfigError(
            f"--model-config {name!r} is not known: use one of {', '.join(MODEL_CONFIGS)}"
        ) from None
