"""Video-DiT adapters (Wan, HunyuanVideo, CogVideoX, LTX-Video) on tiny random models, fp32.

With the ``dense`` method every adapter must reproduce its stock diffusers processor bit for bit (``torch.equal``:
the adapters run the stock ops in the stock order),
``remove()`` must restore the stock processors, and the layout each adapter hands the method must say where
the text sits and what the latent grid is. The latent grid after patchifying is 3 x 4 x 6 (frames, height,
width: all different, so a transposed grid would be caught); prompts have 7 tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    WanTransformer3DModel,
)
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import get_3d_rotary_pos_embed

import diffaccel
from diffaccel.context import RunContext
from diffaccel.errors import LayoutError
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import MethodBase, sdpa
from diffaccel.pipelines.adapters.base import AttentionCall, mark_text_only
from diffaccel.pipelines.adapters.cogvideox import _cogvideox_attention
from diffaccel.pipelines.adapters.hunyuan_video import _hunyuan_video_attention
from diffaccel.pipelines.adapters.ltx import grid_from_video_coords
from diffaccel.pipelines.adapters.wan import WAN_TEXT_TOKENS
from diffaccel.pipelines.hooks import attention_modules
from diffaccel.pipelines.processor import DiffAccelAttnProcessor
from diffaccel.warn import DiffAccelWarning, reset_warnings

GRID = (3, 4, 6)
NUM_VIDEO = math.prod(GRID)
TEXT = 7
BATCH = 2


# ----------------------------------------------------------------------------------------------- methods


@dataclass
class Record:
    layer: str
    layout: TokenLayout
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    attn_mask: torch.Tensor | None


class RecordingMethod(MethodBase):
    """Dense SDPA that records what each adapter hands the method."""

    name = "test-recording"

    def __init__(self) -> None:
        super().__init__()
        self.records: list[Record] = []

    def __call__(self, q, k, v, layout, ctx, *, attn_mask=None, scale=None):
        self.records.append(Record(ctx.layer, layout, tuple(q.shape), tuple(k.shape), attn_mask))
        return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)

    def by_layer(self) -> dict[str, Record]:
        return {r.layer: r for r in self.records}


class SharperMethod(MethodBase):
    """SDPA with twice the default scale: a wrong method, so the dense comparison is shown to be able to fail."""

    name = "test-sharper"

    def __call__(self, q, k, v, layout, ctx, *, attn_mask=None, scale=None):
        return sdpa(q, k, v, attn_mask=attn_mask, scale=2.0 / math.sqrt(q.shape[-1]))


# ----------------------------------------------------------------------------------------------- tiny models


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Seeded random parameters everywhere (no zero-initialised projection hides an attention difference)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _prompt_mask() -> torch.Tensor:
    mask = torch.ones(BATCH, TEXT)
    mask[1, 4:] = 0  # the second prompt is padded
    return mask


def _wan(*, i2v: bool = False, ti2v: bool = False, fused: bool = False):
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
        image_dim=16 if i2v else None, added_kv_proj_dim=24 if i2v else None,
    )
    model = _randomize(model)
    if fused:
        model.fuse_qkv_projections()
    f, h, w = GRID
    timestep = torch.full((BATCH, NUM_VIDEO), 700.0) if ti2v else torch.tensor([700.0, 700.0])
    inputs = {
        "hidden_states": torch.randn(BATCH, 4, f, 2 * h, 2 * w),
        "timestep": timestep,
        "encoder_hidden_states": torch.randn(BATCH, WAN_TEXT_TOKENS if i2v else TEXT, 16),
    }
    if i2v:
        inputs["encoder_hidden_states_image"] = torch.randn(BATCH, 5, 16)
    return model, inputs


def _hunyuan(*, token_replace: bool = False):
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=2, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 4, 4), guidance_embeds=not token_replace,
        image_condition_type="token_replace" if token_replace else None,
    )
    f, h, w = GRID
    inputs = {
        "hidden_states": torch.randn(BATCH, 4, 2 * f, 2 * h, 2 * w),  # patch_size_t=2 halves the frames
        "timestep": torch.tensor([700.0, 700.0]),
        "encoder_hidden_states": torch.randn(BATCH, TEXT, 16),
        "encoder_attention_mask": _prompt_mask(),
        "pooled_projections": torch.randn(BATCH, 8),
    }
    if not token_replace:
        inputs["guidance"] = torch.tensor([4.0, 4.0])
    return _randomize(model), inputs


def _cogvideox(*, patch_size_t: int | None = None, rope: bool = True, fused: bool = False):
    head_dim = 16
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=1, sample_width=12, sample_height=8, sample_frames=9, patch_size=2,
        patch_size_t=patch_size_t, use_rotary_positional_embeddings=rope, max_text_seq_length=TEXT,
    )
    model = _randomize(model)
    if fused:
        model.fuse_qkv_projections()
    f, h, w = GRID
    frames = f * (patch_size_t or 1)
    inputs = {
        "hidden_states": torch.randn(BATCH, frames, 4, 2 * h, 2 * w),
        "encoder_hidden_states": torch.randn(BATCH, TEXT, 16),
        "timestep": torch.tensor([700, 700]),
    }
    if rope:
        inputs["image_rotary_emb"] = get_3d_rotary_pos_embed(
            embed_dim=head_dim, crops_coords=((0, 0), (h, w)), grid_size=(h, w), temporal_size=f
        )
    return model, inputs


def _ltx_coords(extra: int = 0) -> torch.Tensor:
    """Pixel-space coordinates like LTXConditionPipeline's, optionally with ``extra`` conditioning tokens first."""
    f, h, w = GRID
    axes = (torch.arange(f) * 8.0, torch.arange(h) * 32.0, torch.arange(w) * 32.0)
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).reshape(3, -1)
    if extra:
        coords = torch.cat([coords[:, :extra], coords], dim=1)
    return coords.unsqueeze(0).repeat(BATCH, 1, 1)


def _ltx(*, coords: bool = False, extra: int = 0):
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
        num_layers=1, caption_channels=16,
    )
    inputs = {
        "hidden_states": torch.randn(BATCH, NUM_VIDEO + extra, 8),
        "encoder_hidden_states": torch.randn(BATCH, TEXT, 16),
        "timestep": torch.tensor([700.0, 700.0]),
        "encoder_attention_mask": _prompt_mask(),
    }
    if coords:
        inputs["video_coords"] = _ltx_coords(extra)
    else:
        f, h, w = GRID
        inputs.update(num_frames=f, height=h, width=w, rope_interpolation_scale=(8 / 25, 32.0, 32.0))
    return _randomize(model), inputs


CASES: dict[str, Callable[[], tuple[torch.nn.Module, dict[str, Any]]]] = {
    "wan": _wan,
    "wan-i2v": lambda: _wan(i2v=True),
    "wan-i2v-fused": lambda: _wan(i2v=True, fused=True),
    "wan-ti2v": lambda: _wan(ti2v=True),
    "hunyuan_video": _hunyuan,
    "hunyuan_video-token-replace": lambda: _hunyuan(token_replace=True),
    "cogvideox": _cogvideox,
    "cogvideox-no-rope": lambda: _cogvideox(rope=False),
    "cogvideox-1.5": lambda: _cogvideox(patch_size_t=2),
    "cogvideox-fused": lambda: _cogvideox(fused=True),
    "ltx": _ltx,
    "ltx-video-coords": lambda: _ltx(coords=True),
}


def _run(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert not math.isnan(diff)
    return diff


# ----------------------------------------------------------------------------------------------- dense == stock


@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_equals_stock_and_remove_restores(case):
    model, inputs = CASES[case]()
    stock_processors = {name: m.processor for name, m in attention_modules(model).items()}
    expected = _run(model, inputs)

    diffaccel.apply(model, "dense")
    assert _max_diff(_run(model, inputs), expected) == 0.0  # bitwise: the same ops as stock

    diffaccel.apply(model, SharperMethod())  # the comparison can fail: a wrong method is caught
    assert _max_diff(_run(model, inputs), expected) > 1e-3

    diffaccel.remove(model)
    assert {name: m.processor for name, m in attention_modules(model).items()} == stock_processors
    assert _max_diff(_run(model, inputs), expected) == 0.0


# ----------------------------------------------------------------------------------------------- layouts


def _record(case: str) -> tuple[RecordingMethod, DiffAccelAttnProcessor, torch.nn.Module]:
    model, inputs = CASES[case]()
    expected = _run(model, inputs)
    method = RecordingMethod()
    processor = diffaccel.apply(model, method)
    assert _max_diff(_run(model, inputs), expected) == 0.0  # bitwise: the same ops as stock
    # every attention module went through the method, once
    assert sorted(r.layer for r in method.records) == sorted(attention_modules(model))
    return method, processor, model


def _assert_video_self(record: Record, *, text: slice | None = None) -> None:
    layout = record.layout
    assert layout.grid == GRID and not layout.is_cross
    assert layout.text == text
    assert layout.num_tokens == NUM_VIDEO + layout.num_text == record.q_shape[2] == record.k_shape[2]


def _assert_cross(record: Record, num_keys: int) -> None:
    layout = record.layout
    assert layout.is_cross and layout.grid is None and layout.text is None
    assert layout.num_tokens == NUM_VIDEO == record.q_shape[2]
    assert layout.num_keys == num_keys == record.k_shape[2]


@pytest.mark.parametrize("case", ["wan", "wan-i2v"])
def test_wan_layouts(case):
    method, processor, _ = _record(case)
    records = method.by_layer()
    assert processor.context.grid == GRID and processor.context.text_len is None
    _assert_video_self(records["blocks.0.attn1"])
    assert records["blocks.0.attn1"].attn_mask is None
    # I2V: the method sees the text keys only; the image-context attention stays inside the adapter
    _assert_cross(records["blocks.0.attn2"], TEXT if case == "wan" else WAN_TEXT_TOKENS)


@pytest.mark.parametrize("case", ["hunyuan_video", "hunyuan_video-token-replace"])
def test_hunyuan_video_layouts(case):
    method, processor, _ = _record(case)
    records = method.by_layer()
    assert processor.context.grid == GRID and processor.context.text_len == TEXT
    text = slice(NUM_VIDEO, NUM_VIDEO + TEXT)  # text after the video tokens, in both block kinds
    for name in ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn"):
        _assert_video_self(records[name], text=text)
        mask = records[name].attn_mask
        assert mask is not None and mask.shape == (BATCH, 1, 1, NUM_VIDEO + TEXT)
        assert mask[0].all() and not mask[1, ..., NUM_VIDEO + 4 :].any()  # the padded prompt tokens are masked
        assert records[name].layout.text_lengths == (TEXT, 4)  # the same padding, as host ints for methods
    refiner = records["context_embedder.token_refiner.refiner_blocks.0.attn"]
    assert refiner.layout.grid is None and refiner.layout.text == slice(0, TEXT)
    assert refiner.layout.num_tokens == TEXT and refiner.attn_mask is not None


@pytest.mark.parametrize("case", ["cogvideox", "cogvideox-1.5"])
def test_cogvideox_layouts(case):
    method, processor, _ = _record(case)
    record = method.by_layer()["transformer_blocks.0.attn1"]
    assert processor.context.grid == GRID and processor.context.text_len == TEXT
    _assert_video_self(record, text=slice(0, TEXT))
    assert record.layout.text_first


@pytest.mark.parametrize("case", ["ltx", "ltx-video-coords"])
def test_ltx_layouts(case):
    method, processor, _ = _record(case)
    records = method.by_layer()
    assert processor.context.grid == GRID
    _assert_video_self(records["transformer_blocks.0.attn1"])
    _assert_cross(records["transformer_blocks.0.attn2"], TEXT)
    mask = records["transformer_blocks.0.attn2"].attn_mask
    assert mask is not None and mask.shape == (BATCH, 2, 1, TEXT)


def test_ltx_irregular_video_coords_warns_and_runs_dense():
    model, inputs = _ltx(coords=True, extra=4)
    expected = _run(model, inputs)
    method = RecordingMethod()
    diffaccel.apply(model, method)
    out = _run(model, inputs)
    assert _max_diff(out, expected) == 0.0  # bitwise: the same ops as stock
    layout = method.by_layer()["transformer_blocks.0.attn1"].layout
    assert layout.grid is None and "video_coords" in layout.unknown
    # a method that needs the grid says so (once per layer) and runs dense, exactly
    reset_warnings()
    diffaccel.apply(model, "tile", backend="reference")
    with pytest.warns(DiffAccelWarning, match="runs dense|run dense"):
        assert _max_diff(_run(model, inputs), expected) == 0.0


def test_grid_from_video_coords():
    assert grid_from_video_coords(_ltx_coords()) == GRID
    assert grid_from_video_coords(_ltx_coords(extra=4)) is None
    shuffled = _ltx_coords()[:, :, torch.randperm(NUM_VIDEO)]
    assert grid_from_video_coords(shuffled) is None


# ----------------------------------------------------------------------------------------------- without apply()


def test_bare_processor_cannot_infer_a_video_grid():
    """No hook, no video grid: dense runs exactly as stock; a grid method refuses only in strict mode."""
    model, inputs = _wan()
    stock = _run(model, inputs)
    model.set_attn_processor(DiffAccelAttnProcessor("dense"))
    assert _max_diff(_run(model, inputs), stock) == 0.0
    model.set_attn_processor(DiffAccelAttnProcessor("tile", backend="reference", strict=True))
    with pytest.raises(LayoutError, match=r"diffaccel\.apply"):
        _run(model, inputs)


@pytest.mark.parametrize("case", ["hunyuan_video", "cogvideox", "cogvideox-fused"])
def test_bare_processor_infers_stock_processors_of_generic_attention(case):
    """``set_attn_processor`` drops the stock processors; the inference rules must pick the right adapters."""
    model, inputs = CASES[case]()
    expected = _run(model, inputs)
    if case == "hunyuan_video":
        mark_text_only(model.context_embedder)  # what the family's hook does under diffaccel.apply
    model.set_attn_processor(DiffAccelAttnProcessor("dense", context=RunContext(grid=GRID)))
    assert _max_diff(_run(model, inputs), expected) == 0.0  # bitwise: the same ops as stock
    chosen = {type(m.__dict__["_diffaccel_adapter"]).__name__ for m in attention_modules(model).values()}
    expected_adapters = {
        "hunyuan_video": {"HunyuanVideoAttentionAdapter", "UNetAttentionAdapter"},
        "cogvideox": {"CogVideoXAttentionAdapter"},
        "cogvideox-fused": {"FusedCogVideoXAttentionAdapter"},
    }[case]
    assert chosen == expected_adapters


def test_inference_rules_leave_other_generic_attention_alone():
    x = torch.randn(1, 6, 16)
    text = torch.randn(1, 3, 16)
    rotary = (torch.randn(6, 8), torch.randn(6, 8))
    # SD3-style joint attention: built like HunyuanVideo's dual-stream module, but called without RoPE
    joint = Attention(16, added_kv_proj_dim=16, dim_head=8, heads=2, out_dim=16, context_pre_only=False,
                      bias=True, qk_norm="rms_norm", eps=1e-6)
    # UNet self- and cross-attention
    self_attn = Attention(16, heads=2, dim_head=8)
    cross_attn = Attention(16, cross_attention_dim=16, heads=2, dim_head=8)
    calls = [
        (joint, AttentionCall(hidden_states=x, encoder_hidden_states=text)),
        (self_attn, AttentionCall(hidden_states=x)),
        (cross_attn, AttentionCall(hidden_states=x, encoder_hidden_states=text)),
    ]
    for attn, call in calls:
        assert _hunyuan_video_attention(attn, call) is None
        assert _cogvideox_attention(attn, call) is None
        assert _hunyuan_video_attention(attn, None) is None and _cogvideox_attention(attn, None) is None
    # and the rules do answer for the calls they are meant for
    assert _hunyuan_video_attention(joint, AttentionCall(x, text, image_rotary_emb=rotary)) == "HunyuanVideoAttnProcessor2_0"
    assert _cogvideox_attention(self_attn, AttentionCall(x, text)) == "CogVideoXAttnProcessor2_0"


def test_step_advances_with_per_token_timesteps():
    """Wan 2.2 TI2V image-to-video passes one timestep per token, 0 on the first (conditioning) frame."""
    model, inputs = _wan(ti2v=True)
    processor = diffaccel.apply(model, "dense")
    first_frame = NUM_VIDEO // GRID[0]
    for t in (900.0, 800.0, 700.0):
        timestep = torch.full((BATCH, NUM_VIDEO), t)
        timestep[:, :first_frame] = 0.0
        _run(model, {**inputs, "timestep": timestep})
    assert processor.context.step == 2
