"""Tiny offline pipelines: the real diffusers pipeline classes around tiny, seeded, randomly initialised models.

Each tiny pipeline is built in memory from configs: no file and no network access. Tokenizers are built from
an in-memory vocabulary with the ``tokenizers``-backed transformers classes the real pipelines use
(byte-level BPE for CLIP, Unigram for T5/UMT5), so the pipelines run their own prompt encoding code. The
schedulers are the ones the real checkpoints ship with.

Random weights show the mechanics (processors, hooks, the token layout of each family, the speed path) and
exercise every line of the pipeline, not image quality. The latent grids are kept large enough for
block-sparse and local methods to have several blocks (FLUX at 64x64: 16x16 image tokens).

    pipe = build_tiny("tiny-flux")
    image = pipe("a cat", **tiny_spec("tiny-flux").call_kwargs()).images[0]
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from diffaccel.errors import ModelLoadError

# The in-memory tokenizers and TEXT_LEN live in their own module (the trained pipelines use them too).
from diffaccel.pipelines.tiny_tokenizers import TEXT_LEN, clip_tokenizer, llama_tokenizer, t5_tokenizer  # noqa: F401

_VOCAB_SIZE = 1024


# ----------------------------------------------------------------------------------------------- text encoders


def _clip_text_config(projection_dim: int = 32, hidden_size: int = 32, max_positions: int = TEXT_LEN):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=1,  # the tokenizer's <|endoftext|>: CLIP pools the hidden state at the first EOS
        pad_token_id=1,
    )


def _clip_text_model(with_projection: bool, max_positions: int = TEXT_LEN):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(_clip_text_config(max_positions=max_positions)).eval()


def _llama_model(hidden_size: int = 32):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=3,  # HunyuanVideo reads the third-to-last hidden state
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return LlamaModel(config).eval()


def _t5_encoder(d_model: int = 32, umt5: bool = False):
    kwargs = dict(
        vocab_size=_VOCAB_SIZE,
        d_model=d_model,
        d_ff=64,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    if umt5:
        from transformers import UMT5Config, UMT5EncoderModel

        return UMT5EncoderModel(UMT5Config(**kwargs)).eval()
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**kwargs)).eval()


# ----------------------------------------------------------------------------------------------- VAEs


def _image_vae(latent_channels: int, *, flow: bool):
    """A 2-level KL autoencoder (spatial factor 2). ``flow``: SD3/FLUX style (shift factor, no quant convs)."""
    from diffusers import AutoencoderKL

    kwargs: dict[str, Any] = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
    )
    if flow:
        kwargs.update(scaling_factor=1.5, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(**kwargs).eval()


# ----------------------------------------------------------------------------------------------- pipelines


def _tiny_sd3(dual_attention: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,  # the two CLIP projections concatenated
        out_channels=16,
        pos_embed_max_size=32,
        dual_attention_layers=(0,) if dual_attention else (),
        qk_norm="rms_norm" if dual_attention else None,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_image_vae(16, flow=True),
        text_encoder=_clip_text_model(True),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_text_model(True),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(),
        tokenizer_3=t5_tokenizer(),
    )


def _tiny_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2, as FLUX packs its 16
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,  # FLUX.1-dev style guidance distillation input
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_image_vae(4, flow=True),
        text_encoder=_clip_text_model(False),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5_encoder(),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )


def _tiny_wan():
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    # Two temporal+spatial downsamplings: 4x in time (frames must be 4k+1, as in Wan) and 4x in space.
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        scale_factor_temporal=4,
        scale_factor_spatial=4,
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=_t5_encoder(umt5=True),
        vae=vae.eval(),
        scheduler=scheduler,
        transformer=transformer,
    )


def _tiny_cogvideox():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=32,
        num_layers=2,
        sample_width=16,  # latent size at 64x64
        sample_height=16,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT_LEN,
        use_rotary_positional_embeddings=True,  # CogVideoX-5B style
    )
    # Three levels: 4x in space, and the first two levels also halve time (4x, frames 4k+1).
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        clip_sample=False,
        timestep_spacing="trailing",
    )
    return CogVideoXPipeline(
        tokenizer=t5_tokenizer(), text_encoder=_t5_encoder(), vae=vae.eval(), transformer=transformer, scheduler=scheduler
    )


def _tiny_ltx():
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=32,
    )
    # Two space-time downsamplings: 4x in space and time (LTX-Video: 32x and 8x, with a 4x patchify inside).
    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        down_block_types=("LTXVideoDownBlock3D",) * 3,
        layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False),
        decoder_spatio_temporal_scaling=(True, True, False),
        decoder_inject_noise=(False, False, False, False),
        downsample_type=("conv", "conv", "conv"),
        upsample_residual=(False, False, False),
        upsample_factor=(1, 1, 1),
        patch_size=1,
        patch_size_t=1,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096
    )
    return LTXPipeline(
        scheduler=scheduler, vae=vae.eval(), text_encoder=_t5_encoder(), tokenizer=t5_tokenizer(), transformer=transformer
    )


def _tiny_hunyuan_video():
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=32,
        pooled_projection_dim=32,
        rope_axes_dim=(4, 6, 6),
    )
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
    )
    return HunyuanVideoPipeline(
        text_encoder=_llama_model(),
        tokenizer=llama_tokenizer(),
        transformer=transformer,
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=_clip_text_model(False, max_positions=77),  # the pipeline pads CLIP prompts to 77
        tokenizer_2=clip_tokenizer(77),
    )


def _unet(cross_attention_dim: int, sdxl: bool):
    from diffusers import UNet2DConditionModel

    kwargs: dict[str, Any] = dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
    )
    if sdxl:
        kwargs.update(
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 size/crop ids x 8 + pooled text (32)
        )
    return UNet2DConditionModel(**kwargs).eval()


def _sd_scheduler(cls_name: str, **extra: Any):
    """The SD 1.x / SDXL noise schedule (scaled-linear betas, leading timesteps) on scheduler ``cls_name``."""
    import diffusers

    return getattr(diffusers, cls_name)(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        **extra,
    )


def _tiny_sdxl():
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=_image_vae(4, flow=False),
        text_encoder=_clip_text_model(False),
        text_encoder_2=_clip_text_model(True),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=_unet(cross_attention_dim=64, sdxl=True),
        scheduler=_sd_scheduler("EulerDiscreteScheduler"),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _tiny_sd():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=_image_vae(4, flow=False),
        text_encoder=_clip_text_model(False),
        tokenizer=clip_tokenizer(),
        unet=_unet(cross_attention_dim=32, sdxl=False),
        scheduler=_sd_scheduler("PNDMScheduler", skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# ----------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TinySpec:
    """A tiny pipeline and the call settings it is meant to run with.

    Attributes:
        name: registry name (``tiny-flux``).
        pipeline_class: the real diffusers pipeline class it instantiates.
        family: the model family it stands for (matches the adapter families).
        height, width, steps, frames: default call size; ``frames`` is ``None`` for image pipelines.
        extra: further call keywords (short T5 prompts, a guidance scale).
        description: one line for ``diffaccel methods``-style listings.
        trained: the weights are trained (:mod:`diffaccel.pipelines.trained`): not sharpened, not re-drawn.
        prompt: the prompt ``diffaccel generate`` uses when none is given (``None``: the generic default).
    """

    name: str
    pipeline_class: str
    family: str
    build_fn: Callable[[], Any] = field(repr=False)
    height: int = 64
    width: int = 64
    steps: int = 2
    frames: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    trained: bool = False
    prompt: str | None = None

    def call_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keywords for ``pipe(prompt, **kwargs)``: the default size and steps, the extras, then ``overrides``."""
        kwargs: dict[str, Any] = dict(height=self.height, width=self.width, num_inference_steps=self.steps)
        if self.frames is not None:
            kwargs["num_frames"] = self.frames
        kwargs.update(self.extra)
        kwargs.update(overrides)
        return kwargs


TINY_PIPELINES: dict[str, TinySpec] = {
    spec.name: spec
    for spec in (
        TinySpec(
            "tiny-flux", "FluxPipeline", "flux", _tiny_flux,
            extra={"max_sequence_length": TEXT_LEN, "guidance_scale": 3.5},
            description="FLUX.1-like, 2 double + 2 single blocks, CLIP + T5, 16x16 image tokens",
        ),
        TinySpec(
            "tiny-sd3", "StableDiffusion3Pipeline", "sd3", lambda: _tiny_sd3(dual_attention=False),
            extra={"max_sequence_length": TEXT_LEN},
            description="SD3-like, 2 joint blocks, 2 CLIP + T5, 16x16 image tokens",
        ),
        TinySpec(
            "tiny-sd35", "StableDiffusion3Pipeline", "sd3", lambda: _tiny_sd3(dual_attention=True),
            extra={"max_sequence_length": TEXT_LEN},
            description="SD3.5-like: QK RMSNorm, image-only second attention in block 0",
        ),
        TinySpec(
            "tiny-wan", "WanPipeline", "wan", _tiny_wan, frames=9,
            extra={"max_sequence_length": TEXT_LEN},
            description="Wan 2.1-like, 2 blocks, UMT5, 3x8x8 video tokens",
        ),
        TinySpec(
            "tiny-cogvideox", "CogVideoXPipeline", "cogvideox", _tiny_cogvideox, frames=9,
            extra={"max_sequence_length": TEXT_LEN},
            description="CogVideoX-5B-like, 2 blocks with RoPE, T5, 3x8x8 video tokens",
        ),
        TinySpec(
            "tiny-ltx", "LTXPipeline", "ltx", _tiny_ltx, frames=9,
            extra={"max_sequence_length": TEXT_LEN},
            description="LTX-Video-like, 2 blocks, T5, 3x16x16 video tokens",
        ),
        TinySpec(
            "tiny-hunyuan-video", "HunyuanVideoPipeline", "hunyuan_video", _tiny_hunyuan_video, frames=9,
            # The real chat template's crop_start (95) counts Llama-3 tokens; the tiny tokenizer is byte-level.
            extra={"max_sequence_length": TEXT_LEN, "prompt_template": {"template": "{}", "crop_start": 0}},
            description="HunyuanVideo-like, 2 dual + 2 single blocks, Llama + CLIP, 3x8x8 tokens",
        ),
        TinySpec(
            "tiny-sdxl", "StableDiffusionXLPipeline", "unet", _tiny_sdxl,
            description="SDXL-like UNet, 2 levels, 2 CLIP, self-attention on 16x16 tokens",
        ),
        TinySpec(
            "tiny-sd", "StableDiffusionPipeline", "unet", _tiny_sd,
            description="SD 1.x-like UNet, 2 levels, CLIP, self-attention on 16x16 tokens",
        ),
    )
}


def _register_trained() -> None:
    from diffaccel.pipelines.trained import register

    register(TINY_PIPELINES, TinySpec)


_register_trained()  # the trained pipelines (shipped weights) join the registry


def tiny_names() -> list[str]:
    return list(TINY_PIPELINES)


def is_tiny(name: str) -> bool:
    return name in TINY_PIPELINES


def tiny_spec(name: str) -> TinySpec:
    """The registry entry of ``name``; a :class:`ModelLoadError` listing the tiny names otherwise."""
    if name not in TINY_PIPELINES:
        raise ModelLoadError(f"unknown tiny pipeline {name!r}; tiny pipelines: {', '.join(TINY_PIPELINES)}")
    return TINY_PIPELINES[name]


QK_GAIN = 2.5
"""Factor on the query and key scales of every denoiser attention (on the QK-norm weights where the model has
them, else on the q/k projections), so attention logits grow by about ``QK_GAIN**2``. At default init the
attention of a random model is nearly uniform (normalised entropy ~0.95); trained diffusion transformers
attend much more selectively, and sparse or local methods need something to select."""


def sharpen_attention(model: torch.nn.Module, gain: float = QK_GAIN) -> None:
    """Scale the query/key paths of every attention module of ``model`` by ``gain`` (in place)."""
    pairs = (("norm_q", "to_q"), ("norm_k", "to_k"), ("norm_added_q", "add_q_proj"), ("norm_added_k", "add_k_proj"))
    with torch.no_grad():
        for module in model.modules():
            if not (hasattr(module, "set_processor") and hasattr(module, "processor")):
                continue
            for norm_name, proj_name in pairs:
                norm = getattr(module, norm_name, None)
                proj = getattr(module, proj_name, None)
                if norm is not None and getattr(norm, "weight", None) is not None:
                    norm.weight.mul_(gain)
                elif isinstance(proj, torch.nn.Linear):
                    proj.weight.mul_(gain)
                    if proj.bias is not None:
                        proj.bias.mul_(gain)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the CPU generator for weight initialisation without changing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tiny(name: str, *, seed: int = 0) -> Any:
    """Build the tiny pipeline ``name`` on the CPU in float32 with weights drawn from ``seed``.

    The same name and seed give the same weights, in any process. Denoiser attention is sharpened
    (:data:`QK_GAIN`). Trained pipelines load their shipped weights (``seed`` does not change them).
    """
    spec = tiny_spec(name)
    with _seeded(seed):
        pipe = spec.build_fn()
    for attr in ("transformer", "transformer_2", "unet"):
        if spec.trained:
            break
        denoiser = getattr(pipe, attr, None)
        if denoiser is not None:
            sharpen_attention(denoiser)
    pipe.set_progress_bar_config(disable=None)  # tqdm's auto mode: a bar on terminals, none in logs
    return pipe

from diffaccel.pipelines import tiny_families as _tiny_families  # noqa: E402  (the recent families' tiny pipelines)

_tiny_families.register(TINY_PIPELINES, TinySpec)
