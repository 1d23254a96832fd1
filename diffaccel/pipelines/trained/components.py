"""Components of the trained tiny pipelines: pixel-packing autoencoders, word-level tokenizers, model configs.

Autoencoders (the "VAE" slot). The trained models run in pixel space: their autoencoders are fixed, invertible,
parameter-free pixel packers, not trained VAEs. Why: a VAE good enough not to blur 32x32 shapes would cost more
CPU training time than the denoiser, and a lossless packer keeps every error a sparse method causes visible in
the output instead of hiding it under reconstruction error. Both classes expose the config fields and the
``encode``/``decode`` methods the diffusers pipelines read, so ``FluxPipeline`` and ``WanPipeline`` run unchanged:

* :class:`PixelAutoencoder` (FLUX): the identity on RGB with one "block" (``vae_scale_factor`` 1); FluxPipeline
  itself packs 2x2 pixels into one 12-channel token, exactly as it packs 2x2 latents for FLUX.1.
* :class:`CausalPixelPacker` (Wan): packs 2 frames x 2x2 pixels into 24 channels, with Wan's causal convention
  (the first frame alone: it is duplicated), so ``num_frames`` is ``2k+1`` (Wan: ``4k+1``) and the latent
  of 9 frames at 32x32 is ``5 x 16 x 16``; the transformer's ``(1, 2, 2)`` patches give ``5 x 8 x 8`` tokens.

Tokenizers hold one token per caption word (:func:`~diffaccel.pipelines.trained.data.vocabulary`) plus
character fallbacks, so any prompt tokenizes (built by :mod:`diffaccel.pipelines.tiny_tokenizers`). The text
encoders are small and seeded, trained with the denoiser; their weights ship with it, so nothing depends on the
random stream of a torch version.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin

from diffaccel.pipelines.tiny_tokenizers import clip_tokenizer, t5_tokenizer
from diffaccel.pipelines.trained.data import vocabulary


class _IdentityLatentDist:
    """Stands in for ``DiagonalGaussianDistribution``: a packer's latent is exact (sample == mode)."""

    def __init__(self, z: torch.Tensor) -> None:
        self.z = z

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.z

    def mode(self) -> torch.Tensor:
        return self.z


class _EncoderOutput:
    def __init__(self, z: torch.Tensor) -> None:
        self.latent_dist = _IdentityLatentDist(z)


class PixelAutoencoder(ModelMixin, ConfigMixin):
    """Identity autoencoder on RGB pixels (FLUX slot): ``decode(encode(x)) == x`` exactly; no parameters.

    ``block_out_channels`` has one entry so FluxPipeline's ``vae_scale_factor`` is 1 (latents at pixel size).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 3,
        block_out_channels: tuple[int, ...] = (3,),
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(1))  # .device, .dtype; persistent: save_pretrained writes a file

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        return _EncoderOutput(x) if return_dict else (_IdentityLatentDist(x),)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        out = z.clamp(-1, 1)
        return DecoderOutput(sample=out) if return_dict else (out,)


class CausalPixelPacker(ModelMixin, ConfigMixin):
    """Wan-slot packer: ``(B, 3, 2k+1, H, W)`` <-> ``(B, 24, k+1, H/2, W/2)``; lossless, no parameters.

    The first frame is duplicated into the first 2-frame group (Wan's causal VAE also encodes it alone); decoding
    averages the two copies. Channel order: ``(rgb, frame-in-group, row-in-2x2, col-in-2x2)``.
    """

    @register_to_config
    def __init__(
        self,
        z_dim: int = 24,
        scale_factor_temporal: int = 2,
        scale_factor_spatial: int = 2,
        latents_mean: tuple[float, ...] = (0.0,) * 24,
        latents_std: tuple[float, ...] = (1.0,) * 24,
    ) -> None:
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(1))  # persistent: save_pretrained needs a weights file

    def pack(self, video: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = video.shape
        if (f - 1) % 2:
            raise ValueError(f"num_frames={f}: the packer needs 2k+1 frames")
        x = torch.cat([video[:, :, :1], video], dim=2)  # (b, c, 2(k+1), h, w)
        g = (f + 1) // 2
        x = x.view(b, c, g, 2, h // 2, 2, w // 2, 2)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # b, c, t2, r, s, g, h2, w2
        return x.reshape(b, c * 8, g, h // 2, w // 2)

    def unpack(self, z: torch.Tensor) -> torch.Tensor:
        b, ch, g, h2, w2 = z.shape
        c = ch // 8
        x = z.view(b, c, 2, 2, 2, g, h2, w2).permute(0, 1, 5, 2, 6, 3, 7, 4)  # b, c, g, t2, h2, r, w2, s
        x = x.reshape(b, c, g * 2, h2 * 2, w2 * 2)
        first = 0.5 * (x[:, :, :1] + x[:, :, 1:2])
        return torch.cat([first, x[:, :, 2:]], dim=2)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        z = self.pack(x)
        return _EncoderOutput(z) if return_dict else (_IdentityLatentDist(z),)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> Any:
        out = self.unpack(z).clamp(-1, 1)
        return DecoderOutput(sample=out) if return_dict else (out,)


# ----------------------------------------------------------------------------------------------- tokenizers


def word_t5_tokenizer(model_max_length: int):
    """A T5 Unigram tokenizer with one piece per caption word (``▁red``) and character fallbacks."""
    return t5_tokenizer(model_max_length, words=vocabulary())


T5_VOCAB = 256
"""Embedding rows of the tiny T5/UMT5 encoders (the word tokenizer has ~220 pieces)."""


def t5_encoder(d_model: int, *, umt5: bool, layers: int = 2):
    kwargs = dict(
        vocab_size=T5_VOCAB, d_model=d_model, d_ff=2 * d_model, d_kv=d_model // 4, num_layers=layers, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    if umt5:
        from transformers import UMT5Config, UMT5EncoderModel

        return UMT5EncoderModel(UMT5Config(**kwargs)).eval()
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**kwargs)).eval()


def clip_encoder(hidden: int, max_positions: int = 77):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=max_positions, projection_dim=hidden, hidden_act="gelu",
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return CLIPTextModel(cfg).eval()


# ----------------------------------------------------------------------------------------------- pipelines

FLUX_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=12, num_layers=2, num_single_layers=3, attention_head_dim=32, num_attention_heads=3,
    joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=(8, 12, 12),
)
"""Image denoiser: FLUX.1 architecture (2 double + 3 single blocks, width 96), ~1.1 M parameters, no guidance
distillation (true classifier-free guidance with the null caption instead). A 2.5-minute CPU pilot at equal wall
time: this size at batch 16, lr 2e-3 reached eval loss 0.214; 2 + 4 blocks of width 128 at lr 1e-3: 0.265;
this size at batch 32: 0.276 (fewer, larger steps)."""

WAN_TRANSFORMER: dict[str, Any] = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=24, out_channels=24,
    text_dim=64, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)
"""Video denoiser: Wan 2.1 architecture (4 blocks, width 128), ~1 M parameters."""

FLUX_TEXT_LEN = 24
WAN_TEXT_LEN = 16


def flux_pipeline(transformer_config: dict[str, Any] | None = None):
    """A FluxPipeline of the trained image model's architecture with fresh (untrained) denoiser weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    cfg = dict(FLUX_TRANSFORMER, **(transformer_config or {}))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # FLUX.1's own schedule: at 256 image tokens, shift exp(0.5) = 1.65
    return FluxPipeline(
        scheduler=scheduler,
        vae=PixelAutoencoder(),
        text_encoder=clip_encoder(cfg["pooled_projection_dim"]),
        tokenizer=clip_tokenizer(77),
        text_encoder_2=t5_encoder(cfg["joint_attention_dim"], umt5=False),
        tokenizer_2=word_t5_tokenizer(FLUX_TEXT_LEN),
        transformer=FluxTransformer2DModel(**cfg),
    )


def wan_pipeline(transformer_config: dict[str, Any] | None = None):
    """A WanPipeline of the trained video model's architecture with fresh (untrained) denoiser weights."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    cfg = dict(WAN_TRANSFORMER, **(transformer_config or {}))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=2.0)
    return WanPipeline(
        tokenizer=word_t5_tokenizer(WAN_TEXT_LEN),
        text_encoder=t5_encoder(cfg["text_dim"], umt5=True),
        vae=CausalPixelPacker(),
        scheduler=scheduler,
        transformer=WanTransformer3DModel(**cfg),
    )
