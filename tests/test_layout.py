"""TokenLayout on its own, and the layout each image adapter hands a method (text slice, grid, cross-attention),
plus the step counting of the RunContext the denoiser hook fills."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from image_models import (
    LATENT_SIZES,
    TEXT_LEN,
    flux_inputs,
    run,
    sd3_inputs,
    tiny_flux,
    tiny_sd3,
    tiny_unet,
    unet_inputs,
)

import diffaccel
from diffaccel.context import RunContext
from diffaccel.errors import LayoutError
from diffaccel.warn import DiffAccelWarning, reset_warnings
from diffaccel.layout import TokenLayout, downsampled_grid, downsampled_level, square_grid
from diffaccel.methods.base import MethodBase, sdpa
from diffaccel.pipelines.hooks import attention_modules
from diffaccel.pipelines.processor import layer_name

# ------------------------------------------------------------------------------------------------ TokenLayout


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_tokens=-1, grid=None), "num_tokens"),
        (dict(num_tokens=4, grid=(0, 4)), "grid"),
        (dict(num_tokens=16, grid=(1, 2, 2, 4)), "grid"),
        (dict(num_tokens=8, grid=(2, 2), text=slice(0, 4, 2)), "contiguous"),
        (dict(num_tokens=8, grid=(2, 2), text=slice(5, 3)), "contiguous"),
        (dict(num_tokens=10, grid=(2, 2), text=slice(2, 8)), "prefix or a suffix"),
        (dict(num_tokens=10, grid=(2, 2), text=slice(0, 5)), "visual tokens"),
        (dict(num_tokens=12, grid=(3, 3)), "visual tokens"),
    ],
)
def test_token_layout_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        TokenLayout(**kwargs)


def test_token_layout_rejects_text_past_the_end() -> None:
    with pytest.raises(LayoutError):
        TokenLayout(num_tokens=15, grid=(2, 5), text=slice(10, 20))


def test_token_layout_text_prefix_suffix_and_none() -> None:
    prefix = TokenLayout(num_tokens=10, grid=(2, 3), text=slice(0, 4))
    assert prefix.text_first and prefix.num_text == 4 and prefix.num_visual == 6
    assert prefix.visual == slice(4, 10)

    suffix = TokenLayout(num_tokens=10, grid=(2, 3), text=slice(6, None))
    assert not suffix.text_first and suffix.text == slice(6, 10) and suffix.visual == slice(0, 6)

    negative = TokenLayout(num_tokens=10, grid=(2, 3), text=slice(-4, None))
    assert negative.text == slice(6, 10)

    image_only = TokenLayout(num_tokens=6, grid=(2, 3))
    assert image_only.num_text == 0 and image_only.visual == slice(0, 6) and not image_only.text_first

    empty_text = TokenLayout(num_tokens=6, grid=(2, 3), text=slice(6, 6))
    assert empty_text.num_text == 0 and empty_text.visual == slice(0, 6) and not empty_text.text_first


def test_token_layout_cross_attention_has_no_visual_grid() -> None:
    cross = TokenLayout(num_tokens=12, grid=None, is_cross=True, num_keys=7)
    assert not cross.has_grid and cross.num_visual == 12
    # a grid on a cross-attention call is kept for reference but does not make it "gridded"
    assert not TokenLayout(num_tokens=12, grid=(3, 4), is_cross=True, num_keys=7).has_grid


def test_visual_coords_row_major() -> None:
    coords = TokenLayout(num_tokens=6, grid=(2, 3)).visual_coords()
    assert coords.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    video = TokenLayout(num_tokens=12, grid=(2, 2, 3)).visual_coords()
    assert video.shape == (12, 3)
    assert video[7].tolist() == [1, 0, 1]  # index 7 = frame 1, row 0, column 1
    with pytest.raises(LayoutError):
        TokenLayout(num_tokens=5, grid=None).visual_coords()


def test_downsampled_and_square_grids() -> None:
    assert downsampled_grid((8, 12), 96) == (8, 12)
    assert downsampled_grid((8, 12), 24) == (4, 6)
    assert downsampled_grid((8, 12), 6) == (2, 3)
    assert downsampled_grid((5, 7), 12) == (3, 4)  # stride-2 convolutions round up
    assert downsampled_grid((8, 12), 20) is None
    assert downsampled_grid((2, 4, 6), 6) == (1, 2, 3)
    assert square_grid(16) == (4, 4)
    with pytest.raises(LayoutError, match=r"diffaccel\.apply"):
        square_grid(24)


def test_downsampled_level_factor_is_two_to_the_halvings() -> None:
    """``TokenLayout.downsample`` of a UNet level: 2**k after k halvings, whatever the rounding of odd sizes."""
    assert downsampled_level((8, 12), 96) == ((8, 12), 1)
    assert downsampled_level((8, 12), 24) == ((4, 6), 2)
    assert downsampled_level((8, 12), 6) == ((2, 3), 4)
    assert downsampled_level((13, 13), 16) == ((4, 4), 4)  # 13 -> 7 -> 4: factor 4 (round() would say 3)
    assert downsampled_level((9, 13), 12) == ((3, 4), 4)
    assert downsampled_level((8, 12), 20) is None


def test_layout_fields_are_validated() -> None:
    layout = TokenLayout(10, (2, 3), text=slice(6, 10), text_lengths=[4, 2], downsample=2, hierarchical=True)
    assert layout.text_lengths == (4, 2) and layout.downsample == 2 and layout.hierarchical
    with pytest.raises(LayoutError, match="text_lengths"):
        TokenLayout(10, (2, 3), text=slice(6, 10), text_lengths=(5,))
    for bad in (0, 1.5, True):
        with pytest.raises(LayoutError, match="downsample"):
            TokenLayout(6, (2, 3), downsample=bad)


# ----------------------------------------------------------------------------------- layouts from the adapters


@dataclass
class Record:
    layer: str
    layout: TokenLayout
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    step: int
    timestep: float | None


class RecordingMethod(MethodBase):
    """Records what the adapter hands the method, then runs dense attention."""

    name = "test-recording"

    def __init__(self) -> None:
        super().__init__()
        self.records: list[Record] = []

    def __call__(self, q, k, v, layout, ctx, *, attn_mask=None, scale=None):
        self.records.append(Record(ctx.layer, layout, tuple(q.shape), tuple(k.shape), ctx.step, ctx.timestep))
        return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)

    def by_layer(self) -> dict[str, Record]:
        return {r.layer: r for r in self.records}


@pytest.mark.parametrize("size", list(LATENT_SIZES))
@pytest.mark.parametrize("sd35", [False, True])
def test_sd3_layout_text_suffix(sd35: bool, size: str) -> None:
    height, width = LATENT_SIZES[size]
    model = tiny_sd3(sd35=sd35)
    method = RecordingMethod()
    diffaccel.apply(model, method)
    run(model, sd3_inputs(height, width))
    grid = (height // 2, width // 2)
    num_image = grid[0] * grid[1]
    layers = method.by_layer()
    assert set(layers) == set(attention_modules(model))
    for name, rec in layers.items():
        assert rec.layout.grid == grid and rec.layout.has_grid
        if name.endswith(".attn"):
            assert rec.layout.text == slice(num_image, num_image + TEXT_LEN)
            assert not rec.layout.text_first and rec.layout.visual == slice(0, num_image)
            assert rec.q_shape == (2, 2, num_image + TEXT_LEN, 8)
        else:  # SD3.5's image-only attn2
            assert name.endswith(".attn2") and sd35
            assert rec.layout.text is None and rec.q_shape == (2, 2, num_image, 8)


@pytest.mark.parametrize("size", list(LATENT_SIZES))
def test_flux_layout_text_prefix(size: str) -> None:
    rows, cols = (s // 2 for s in LATENT_SIZES[size])
    model = tiny_flux()
    method = RecordingMethod()
    diffaccel.apply(model, method)
    run(model, flux_inputs(rows, cols))
    layers = method.by_layer()
    assert set(layers) == {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}
    for rec in layers.values():
        assert rec.layout.grid == (rows, cols)
        assert rec.layout.text == slice(0, TEXT_LEN) and rec.layout.text_first
        assert rec.layout.visual == slice(TEXT_LEN, TEXT_LEN + rows * cols)
        assert rec.q_shape == (2, 2, TEXT_LEN + rows * cols, 8)


def test_flux_single_stream_layout_without_hook() -> None:
    """Bare set_attn_processor: single-stream blocks take the text length of the double-stream call before them."""
    model = tiny_flux()
    method = RecordingMethod()
    processor = diffaccel.DiffAccelAttnProcessor(method)
    model.set_attn_processor(processor)
    run(model, flux_inputs(4, 4))
    assert processor.context.text_len is None and processor.context.grid is None
    layers = method.by_layer()
    single = layers[layer_name(model.single_transformer_blocks[0].attn)]
    double = layers[layer_name(model.transformer_blocks[0].attn)]
    for rec in (single, double):
        assert rec.layout.text == slice(0, TEXT_LEN) and rec.layout.grid == (4, 4)


@pytest.mark.parametrize("sdxl", [False, True])
def test_unet_layouts_per_level(sdxl: bool) -> None:
    height, width = LATENT_SIZES["non-square"]
    model = tiny_unet(sdxl=sdxl)
    method = RecordingMethod()
    diffaccel.apply(model, method)
    run(model, unet_inputs(height, width, sdxl=sdxl))
    full, half = (height, width), (height // 2, width // 2)
    layers = method.by_layer()
    assert set(layers) == set(attention_modules(model))
    for name, rec in layers.items():
        if name.endswith("attn2"):
            assert rec.layout.is_cross and not rec.layout.has_grid
            assert rec.layout.num_keys == 7 and rec.k_shape[2] == 7
            continue
        assert name.endswith("attn1") and not rec.layout.is_cross
        level_full = name.startswith("down_blocks.0.") or name.startswith("up_blocks.1.")
        assert rec.layout.grid == (full if level_full else half), name
        assert rec.layout.text is None


def test_run_context_counts_steps() -> None:
    """Steps advance on each new (lower) timestep, CFG's repeated timestep shares a step, a higher one restarts."""
    model = tiny_unet(sdxl=True)
    method = RecordingMethod()
    processor = diffaccel.apply(model, method)
    ctx: RunContext = processor.context
    seen = []
    for t in (999.0, 999.0, 750.0, 500.0, 999.0, 800.0):
        method.records.clear()
        run(model, unet_inputs(8, 8, batch=1, timestep=t, sdxl=True))
        steps = {r.step for r in method.records}
        assert len(steps) == 1 and {r.timestep for r in method.records} == {t}
        seen.append(steps.pop())
    assert seen == [0, 0, 1, 2, 0, 1]
    assert ctx.denoiser_calls == 6
    ctx.reset()
    run(model, unet_inputs(8, 8, batch=1, timestep=10.0, sdxl=True))
    assert ctx.step == 0 and ctx.timestep == 10.0


def test_layer_names_are_module_names() -> None:
    model = tiny_sd3()
    method = RecordingMethod()
    diffaccel.apply(model, method)
    run(model, sd3_inputs(8, 8))
    assert [r.layer for r in method.records] == list(attention_modules(model))


def test_grid_mismatch_with_hook_is_reported() -> None:
    """An attention call whose token count does not fit the latent grid never guesses one: dense runs as stock, a
    grid method says so (and falls back), strict mode fails loudly (issue 11: never refuse what stock runs)."""
    model = tiny_sd3()
    attn = model.transformer_blocks[0].attn
    x, text = torch.randn(1, 16, 16), torch.randn(1, TEXT_LEN, 16)
    with torch.no_grad():
        stock = attn(x, text)
    processor = diffaccel.apply(model, "dense")
    processor.context.grid = (5, 5)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(attn(x, text), stock))
    processor = diffaccel.apply(model, "tile", backend="reference")
    processor.context.grid = (5, 5)
    reset_warnings()
    with pytest.warns(DiffAccelWarning, match="latent grid"), torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(attn(x, text), stock))
    processor = diffaccel.apply(model, "tile", backend="reference", strict=True)
    processor.context.grid = (5, 5)
    with pytest.raises(LayoutError, match="latent grid"), torch.no_grad():
        attn(x, text)


@pytest.mark.parametrize("finest, downsample", [(0, 1), (2, 1), (4, 2), (True, 1)])
def test_finest_downsample_must_lie_between_one_and_the_level(finest, downsample):
    with pytest.raises(LayoutError, match="finest_downsample"):
        TokenLayout(4, (2, 2), downsample=downsample, finest_downsample=finest)
    assert TokenLayout(4, (2, 2), downsample=4, finest_downsample=2).finest_downsample == 2
