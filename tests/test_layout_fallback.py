"""Layouts that cannot be read never refuse a forward the stock processor runs (issue 11, item 2).

FLUX ``img_ids`` that are not one row-major grid (diffusers' own tests pass random ones; Kontext appends reference
latents), a video processor installed without :func:`diffaccel.apply`, a single-stream call with no known text
length: ``dense`` runs exactly as stock; a method that needs the grid falls back to dense for the call, counted in
``call_counts`` and said once per layer; ``strict=True`` raises instead.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import diffaccel
from diffaccel.context import RunContext
from diffaccel.errors import LayoutError
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import get_method
from diffaccel.pipelines.hooks import attention_modules
from diffaccel.warn import DiffAccelWarning, reset_warnings
from image_models import TEXT_LEN, flux_image_ids, flux_inputs, max_abs_diff, run, tiny_flux

GRID_METHODS = {
    "tile": {"backend": "reference"},
    "msw": {"backend": "reference"},
    "gna": {"backend": "reference"},
    "adaspa": {"backend": "reference"},
    "vmoba": {"backend": "reference"},
    "agent": {},
}
"""Methods whose own attention needs the visual grid (each must fall back, never refuse)."""


def _random_ids(tokens: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(tokens, 3)


def _kontext_ids(rows: int, cols: int) -> torch.Tensor:
    """The target grid followed by a reference image grid at index 1 in column 0 (as FLUX Kontext builds them)."""
    ref = flux_image_ids(rows, cols)
    ref[:, 0] = 1
    return torch.cat([flux_image_ids(rows, cols), ref])


def _unreadable_flux(ids_kind: str) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = tiny_flux()
    if ids_kind == "random":
        inputs = flux_inputs(4, 4)
        inputs["img_ids"] = _random_ids(16)
    else:  # kontext: 2 x 8 tokens, two 2x4 grids in one sequence
        inputs = flux_inputs(2, 8)
        inputs["img_ids"] = _kontext_ids(2, 4)
    return model, inputs


def _messages(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DiffAccelWarning)]


@pytest.mark.parametrize("ids_kind", ["random", "kontext"])
def test_dense_on_unreadable_flux_ids_equals_stock(ids_kind: str) -> None:
    model, inputs = _unreadable_flux(ids_kind)
    stock = run(model, inputs)
    diffaccel.apply(model, "dense", strict=True)  # dense needs no grid: strict changes nothing for it
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert max_abs_diff(run(model, inputs), stock) == 0.0
    assert not [m for m in _messages(record) if "grid" in m]


@pytest.mark.parametrize("name", sorted(GRID_METHODS))
def test_grid_method_falls_back_once_per_layer(name: str) -> None:
    reset_warnings()
    model, inputs = _unreadable_flux("random")
    stock = run(model, inputs)
    processor = diffaccel.apply(model, name, **GRID_METHODS[name])
    layers = sorted(attention_modules(model))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = run(model, inputs)
        second = run(model, inputs)
    assert max_abs_diff(first, stock) == 0.0 and max_abs_diff(second, stock) == 0.0
    counts = processor.method.call_counts
    assert counts.method == 0 and counts.dense == 2 * len(layers)
    grid_warnings = [m for m in _messages(record) if "needs the token grid" in m]
    assert len(grid_warnings) == len(layers)  # one per layer, not one per call
    for layer, message in zip(layers, sorted(grid_warnings)):
        assert layer in message and name in message and "strict=True" in message


@pytest.mark.parametrize("name", ["tile", "agent"])
def test_strict_raises_naming_layer_and_reason(name: str) -> None:
    model, inputs = _unreadable_flux("kontext")
    diffaccel.apply(model, name, strict=True, **GRID_METHODS[name])
    with pytest.raises(LayoutError, match=r"transformer_blocks\.0\.attn.*strict=True"):
        run(model, inputs)


def test_readable_ids_still_run_the_method() -> None:
    """The fallback is per call: grid-shaped ids on the same model run the method again."""
    model, inputs = _unreadable_flux("random")
    processor = diffaccel.apply(model, "gna", backend="reference")
    run(model, inputs)
    good = flux_inputs(4, 4)
    run(model, good)
    counts = processor.method.call_counts
    assert counts.method == len(attention_modules(model)) and counts.dense == len(attention_modules(model))


def test_flux_single_stream_without_text_length_runs_dense() -> None:
    """No hook and no double-stream call before it: the text length is unknown, dense still runs exactly."""
    model = tiny_flux()
    single = model.single_transformer_blocks[0].attn
    x = torch.randn(2, TEXT_LEN + 16, model.inner_dim)
    rope = model.pos_embed(torch.cat([torch.zeros(TEXT_LEN, 3), flux_image_ids(4, 4)]))
    with torch.no_grad():
        expected = single(x, image_rotary_emb=rope)
        single.set_processor(diffaccel.DiffAccelAttnProcessor("dense"))
        assert max_abs_diff(single(x, image_rotary_emb=rope), expected) == 0.0
        single.set_processor(diffaccel.DiffAccelAttnProcessor("tile", backend="reference"))
        assert max_abs_diff(single(x, image_rotary_emb=rope), expected) == 0.0
        single.set_processor(diffaccel.DiffAccelAttnProcessor("tile", backend="reference", strict=True))
        with pytest.raises(LayoutError, match=r"diffaccel\.apply"):
            single(x, image_rotary_emb=rope)


def test_unknown_layout_field_is_validated() -> None:
    layout = TokenLayout(num_tokens=8, grid=None, unknown="why")
    assert layout.grid_unknown and not layout.has_grid
    assert not TokenLayout(num_tokens=8, grid=None).grid_unknown
    with pytest.raises(LayoutError, match="unknown"):
        TokenLayout(num_tokens=8, grid=(2, 4), unknown="why")


def test_text_only_layout_stays_uncounted() -> None:
    """A call with no visual grid by design (a text-only refiner) is dense without a fallback count or warning."""
    method = get_method("tile", backend="reference")
    q = torch.randn(1, 2, 8, 4)
    out = method(q, q, q, TokenLayout(num_tokens=8, grid=None, text=slice(0, 8)), RunContext(layer="x"))
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert method.call_counts.dense == 0 and method.call_counts.method == 0


def test_strict_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="strict"):
        diffaccel.DiffAccelAttnProcessor("dense", strict="yes")
