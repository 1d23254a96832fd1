"""Tiny offline pipelines of the recent families (FLUX.2 Klein, Qwen-Image, Z-Image, HunyuanVideo-1.5, LTX-2).

Same rules as :mod:`diffaccel.pipelines.tiny`: the real diffusers pipeline classes around tiny, seeded, randomly
initialised models built from configs in memory (no file, no network). The text encoders are tiny configs of the
transformers classes the real checkpoints use (Qwen3, Qwen2.5-VL, Gemma 3, ByT5); the Qwen tokenizer is a
byte-level BPE over the 256 byte symbols with the special tokens and a minimal chat template of the real one, so
the pipelines run their own prompt encoding (chat template, padding to ``max_sequence_length``, masks).

:func:`register` adds the specs to ``TINY_PIPELINES`` (called once from ``tiny.py``, which passes its ``TinySpec``
class, so this module does not import ``tiny`` back).
"""

from __future__ import annotations

from typing import Any, Callable

VOCAB_SIZE = 1024

QWEN_TEXT_LEN = 48
"""``max_sequence_length`` of the tiny Qwen-tokenized prompts: the chat template adds ~20 byte tokens to a prompt."""

_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<think>", "</think>")

_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def qwen_tokenizer(model_max_length: int = QWEN_TEXT_LEN):
    """A Qwen2 byte-level BPE tokenizer (no merges) with Qwen's special tokens, pad token and a chat template."""
    from tokenizers import pre_tokenizers
    from transformers import AddedToken, Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", model_max_length=model_max_length)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in _QWEN_SPECIALS]})
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    return tok


def _qwen3(causal_lm: bool, hidden_size: int = 32, layers: int = 3):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=256, tie_word_embeddings=False)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config).eval()


def _image_vae(latent_channels: int):
    """A 2-level KL autoencoder (spatial factor 2), FLUX/SD3 style (shift factor, no quant convs)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=64, scaling_factor=1.5,
                         shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False).eval()


def _flow_scheduler(**extra: Any):
    from diffusers import FlowMatchEulerDiscreteScheduler

    kwargs: dict[str, Any] = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                  base_image_seq_len=256, max_image_seq_len=4096)
    kwargs.update(extra)
    return FlowMatchEulerDiscreteScheduler(**kwargs)


# ----------------------------------------------------------------------------------------------- FLUX.2 Klein


def _tiny_flux2():
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel

    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                             sample_size=64, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2).eval()
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16,  # 4 latent channels packed 2x2
        num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * 32,  # three stacked Qwen3 hidden states (text_encoder_out_layers)
        timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    return Flux2KleinPipeline(scheduler=_flow_scheduler(), vae=vae, text_encoder=_qwen3(True),
                              tokenizer=qwen_tokenizer(), transformer=transformer, is_distilled=False)


# ----------------------------------------------------------------------------------------------- Z-Image


def _tiny_z_image():
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=(4, 6, 6), axes_lens=(256, 64, 64),
    )
    return ZImagePipeline(scheduler=_flow_scheduler(shift=3.0, use_dynamic_shifting=False),
                          vae=_image_vae(4), text_encoder=_qwen3(False),
                          tokenizer=qwen_tokenizer(), transformer=transformer)


# ----------------------------------------------------------------------------------------------- Qwen-Image


def _qwen25_vl_config(hidden_size: int = 32, layers: int = 2):
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=256, eos_token_id=258, pad_token_id=256, rope_parameters={
                    "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden_size,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=VOCAB_SIZE - 1,
                              video_token_id=VOCAB_SIZE - 2, vision_start_token_id=VOCAB_SIZE - 3)
    config.vocab_size = VOCAB_SIZE  # the composite config names it only in text_config; readers expect it on top
    return config


def _qwen_image_vae(z_dim: int = 4):
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=8, z_dim=z_dim, dim_mult=[1, 2], num_res_blocks=1,
                                  temperal_downsample=[False], latents_mean=[0.0] * z_dim,
                                  latents_std=[1.0] * z_dim).eval()


def pin_prefix_tokens(tokenizer: Any, prefix: str, segment: str, count: int) -> None:
    """Make ``prefix`` tokenize to exactly ``count`` tokens: the head of ``segment`` (a part of ``prefix``) becomes one
    added token, its tail stays one byte token per character. The real pipelines crop a fixed number of template
    tokens counted with the real BPE (Qwen-Image 34, HunyuanVideo-1.5 108); so the byte-level tiny tokenizer crops
    exactly the template too, and the setting survives ``save_pretrained`` (it is the tokenizer's)."""
    from transformers import AddedToken

    tail = count - len(tokenizer(prefix.replace(segment, "")).input_ids) - 1
    if not 0 <= tail < len(segment) or not segment.isascii():
        raise ValueError(f"cannot make the {len(segment)}-character template segment {count - tail - 1} + {tail} tokens")
    tokenizer.add_tokens([AddedToken(segment[: len(segment) - tail], normalized=False, special=False)])
    got = len(tokenizer(prefix).input_ids)
    if got != count:
        raise ValueError(f"template prefix tokenizes to {got} tokens, expected {count}")


def _tiny_qwen_image():
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(_qwen25_vl_config()).eval()
    pipe = QwenImagePipeline(scheduler=_flow_scheduler(), vae=_qwen_image_vae(), text_encoder=text_encoder,
                             tokenizer=qwen_tokenizer(model_max_length=4096), transformer=transformer)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    system = prefix.split("<|im_start|>")[1].split("<|im_end|>")[0]
    pin_prefix_tokens(pipe.tokenizer, prefix, system, pipe.prompt_template_encode_start_idx)
    return pipe


# ----------------------------------------------------------------------------------------------- HunyuanVideo-1.5


def _tiny_hunyuan_video15():
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                      spatial_compression_ratio=2, temporal_compression_ratio=2).eval()
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * 4 + 1, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, text_embed_dim=32, text_embed_2_dim=24, image_embed_dim=20, rope_axes_dim=(4, 6, 6),
        target_size=32, task_type="t2v",
    )
    glyph_encoder = T5EncoderModel(T5Config(vocab_size=384, d_model=24, d_ff=48, d_kv=8, num_layers=1, num_heads=3,
                                            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                            decoder_start_token_id=0)).eval()
    pipe = HunyuanVideo15Pipeline(
        text_encoder=Qwen2_5_VLTextModel(_qwen25_vl_config().text_config).eval(),
        tokenizer=qwen_tokenizer(model_max_length=4096), transformer=transformer, vae=vae,
        scheduler=_flow_scheduler(shift=7.0, use_dynamic_shifting=False), text_encoder_2=glyph_encoder,
        tokenizer_2=ByT5Tokenizer(model_max_length=256), guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    # The real pipeline pads prompts to 1000 Qwen tokens (plus 256 glyph and 729 image tokens) and crops the
    # system template's first 108: the tiny tokenizer crops exactly the template too (pin_prefix_tokens).
    rendered = pipe.tokenizer.apply_chat_template(format_text_input(["\x00"], pipe.system_message),
                                                  add_generation_prompt=True, tokenize=False)[0]
    prefix = rendered.split("\x00")[0]
    system = prefix.split("<|im_start|>")[1].split("<|im_end|>")[0]  # the system turn as the template renders it
    pin_prefix_tokens(pipe.tokenizer, prefix, system, pipe.prompt_template_encode_start_idx)
    return pipe


# ----------------------------------------------------------------------------------------------- LTX-2

LTX2_TEXT_LEN = 32
"""``max_sequence_length`` of the tiny Gemma-tokenized prompts (the real pipeline pads to 1024 tokens)."""

LTX2_CALL = {
    "max_sequence_length": LTX2_TEXT_LEN, "frame_rate": 24.0, "guidance_scale": 3.0,
    # The pipeline's own spatio-temporal guidance (STG) and modality-isolation guidance each call the transformer
    # again per step (with STG on block 28 by default, which the 2-block tiny model lacks): off, so a step is one
    # call with the batch [uncond, cond], as for the other tiny pipelines.
    "stg_scale": 0.0, "audio_stg_scale": 0.0, "spatio_temporal_guidance_blocks": None,
    "modality_scale": 1.0, "audio_modality_scale": 1.0,
}
"""Call settings of ``tiny-ltx2`` besides the size: classifier-free guidance on (video and audio), STG and
modality guidance off."""


def gemma_tokenizer(model_max_length: int = LTX2_TEXT_LEN):
    """A Gemma byte-fallback BPE tokenizer over printable ASCII (``<pad>``=0, ``<eos>``=1, ``<bos>``=2 as in Gemma;
    other characters fall back to byte tokens), adding ``<bos>`` like the real one; Gemma pads on the left."""
    from transformers import GemmaTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in range(33, 127):
        vocab[chr(c)] = len(vocab)
        vocab["\u2581" + chr(c)] = len(vocab)
    return GemmaTokenizerFast(vocab=vocab, merges=[], model_max_length=model_max_length, add_bos_token=True,
                              padding_side="left")


def _gemma3(hidden_size: int = 32, layers: int = 2):
    """A 2-layer Gemma 3 with a 1-layer SigLIP tower (never run: LTX-2 encodes text only), ids inside the vocab."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                max_position_embeddings=256, sliding_window=16)
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=VOCAB_SIZE - 3, eoi_token_index=VOCAB_SIZE - 2,
                          image_token_index=VOCAB_SIZE - 1)
    config.vocab_size = VOCAB_SIZE  # the composite config names it only in text_config; readers expect it on top
    return Gemma3ForConditionalGeneration(config).eval()


def _tiny_ltx2():
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    text_encoder = _gemma3()
    hidden, layers = text_encoder.config.text_config.hidden_size, text_encoder.config.text_config.num_hidden_layers
    # The pipeline stacks every hidden state of Gemma (layers + 1) before the connectors project them.
    connectors = LTX2TextConnectors(
        caption_channels=hidden, text_proj_in_factor=layers + 1, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=16, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=16, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=LTX2_TEXT_LEN,
        rope_double_precision=False, rope_type="split",
    ).eval()
    # Two space-time downsamplings: 4x in space and time (LTX-2: 32x and 8x).
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, True),
        decoder_spatio_temporal_scaling=(True, True), decoder_inject_noise=(False, False, False),
        downsample_type=("spatiotemporal", "spatiotemporal"), upsample_residual=(False, False), upsample_factor=(1, 1),
        timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ).eval()
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    ).eval()
    latent_mel_bins = audio_vae.config.mel_bins // audio_vae.mel_compression_ratio
    vocoder = LTX2Vocoder(
        in_channels=audio_vae.config.output_channels * audio_vae.config.mel_bins, hidden_channels=32, out_channels=2,
        upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
        output_sampling_rate=16000,
    ).eval()
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, audio_in_channels=2 * latent_mel_bins, audio_out_channels=2 * latent_mel_bins,
        audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2,
        caption_channels=hidden, rope_double_precision=False, rope_type="split",
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                base_image_seq_len=1024, max_image_seq_len=4096)
    return LTX2Pipeline(scheduler=scheduler, vae=vae, audio_vae=audio_vae, text_encoder=text_encoder,
                        tokenizer=gemma_tokenizer(), connectors=connectors, transformer=transformer, vocoder=vocoder)


# ----------------------------------------------------------------------------------------------- registry


def specs(TinySpec: Callable[..., Any]) -> tuple[Any, ...]:  # noqa: N803 (the class tiny.py passes)
    return (
        TinySpec(
            "tiny-flux2", "Flux2KleinPipeline", "flux2", _tiny_flux2,
            extra={"max_sequence_length": QWEN_TEXT_LEN, "text_encoder_out_layers": (1, 2, 3),
                   "guidance_scale": 4.0},
            description="FLUX.2 Klein-like, 2 double + 2 single blocks, Qwen3, 16x16 image tokens",
        ),
        TinySpec(
            "tiny-z-image", "ZImagePipeline", "z_image", _tiny_z_image,
            extra={"max_sequence_length": QWEN_TEXT_LEN, "guidance_scale": 4.0},
            description="Z-Image-like, 1+1 refiners + 2 single-stream layers, Qwen3, 16x16 image tokens",
        ),
        TinySpec(
            "tiny-qwen-image", "QwenImagePipeline", "qwenimage", _tiny_qwen_image,
            extra={"max_sequence_length": QWEN_TEXT_LEN, "true_cfg_scale": 4.0, "negative_prompt": " "},
            description="Qwen-Image-like, 2 double-stream blocks, Qwen2.5-VL, 16x16 image tokens",
        ),
        TinySpec(
            "tiny-hunyuan-video15", "HunyuanVideo15Pipeline", "hunyuan_video15", _tiny_hunyuan_video15,
            height=16, width=24, frames=5, steps=1,  # one step: the stock prompt lengths make ~2000 text tokens
            description="HunyuanVideo-1.5-like, 2 blocks, Qwen2.5-VL + ByT5, 3x8x12 video tokens (1 step)",
        ),
        TinySpec(
            "tiny-ltx2", "LTX2Pipeline", "ltx2", _tiny_ltx2, height=32, width=64, frames=9,
            extra=dict(LTX2_CALL),
            description="LTX-2-like audio-video, 2 blocks, Gemma 3 + connectors, 3x8x16 video + 9 audio tokens",
        ),
    )


def register(registry: dict[str, Any], spec_class: Callable[..., Any]) -> None:
    """Add the tiny pipelines of the recent families to ``registry`` (``tiny.TINY_PIPELINES``, ``tiny.TinySpec``)."""
    for spec in specs(spec_class):
        registry.setdefault(spec.name, spec)
