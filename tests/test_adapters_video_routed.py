"""LTX-Video and HunyuanVideo through routed adapters (issue 13: the stock processor runs, the adapter holds the layout).

Before the migration these two families had explicit adapters that re-implemented the stock processors. Here:

- every ``TokenLayout`` field and every mask the method gets equals what the explicit adapters handed it, for the same
  calls (the expected values come from a small reference function of the tiny models' geometry, written from the
  explicit adapters' rules; they were checked against the explicit adapters before these were deleted);
- the code that runs is diffusers' own: a helper patched in the stock processor's module is seen;
- ``strict=True`` refuses a routed call whose grid is unknown, and ``dense`` (which needs no grid) still runs;
- methods run on both families (the method, not a dense fallback).

Tiny models, inputs and the grid (3 x 4 x 6, F != H != W; batch 2, the second prompt padded) are
``test_adapters_video``'s.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from test_adapters_video import BATCH, CASES, GRID, NUM_VIDEO, TEXT, RecordingMethod, _hunyuan, _ltx, _max_diff, _run

import diffaccel
from diffaccel.context import RunContext
from diffaccel.errors import LayoutError
from diffaccel.layout import TokenLayout
from diffaccel.pipelines.adapters.base import adapter_for, mark_text_only
from diffaccel.pipelines.adapters.dispatch import RoutedAdapter
from diffaccel.pipelines.hooks import attention_modules
from diffaccel.warn import DiffAccelWarning

HV_JOINT = ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn")
HV_REFINER = "context_embedder.token_refiner.refiner_blocks.0.attn"
LTX_SELF, LTX_CROSS = "transformer_blocks.0.attn1", "transformer_blocks.0.attn2"


# ----------------------------------------------------------------------------------------------- reference layouts


def _ltx_expected(num_tokens: int, grid: Any, mask: torch.Tensor, heads: int) -> dict[str, tuple[TokenLayout, Any]]:
    """The explicit LTX adapter's layouts: ``attn1`` on the grid (or unknown), ``attn2`` cross with the stock
    processor's prepared mask (the prompt mask as an additive -10000 bias, repeated per head)."""
    bias = ((1 - mask) * -10000.0).view(BATCH, 1, 1, TEXT).expand(BATCH, heads, 1, TEXT)
    self_layout = TokenLayout(num_tokens=num_tokens, grid=grid, unknown=None if grid else "?")
    cross = TokenLayout(num_tokens=num_tokens, grid=None, is_cross=True, num_keys=TEXT)
    return {LTX_SELF: (self_layout, None), LTX_CROSS: (cross, bias)}


def _hv_expected(mask: torch.Tensor, grid: Any, lengths: tuple[int, ...] | None) -> dict[str, tuple[TokenLayout, Any]]:
    """The explicit HunyuanVideo adapter's joint layouts: text a suffix, ``text_lengths`` the prompt's valid tokens,
    and the model's joint key mask (``key < num_video + L_b``) as the method's mask."""
    n = NUM_VIDEO + TEXT
    valid = mask.sum(dim=1).to(torch.int64)
    keys = torch.arange(n).unsqueeze(0) < (NUM_VIDEO + valid).unsqueeze(1)
    layout = TokenLayout(num_tokens=n, grid=grid, text=slice(NUM_VIDEO, n), text_lengths=lengths,
                         unknown=None if grid else "?")
    return {name: (layout, keys[:, None, None, :]) for name in HV_JOINT}


def _record(case: str, mode: str) -> tuple[RecordingMethod, torch.nn.Module, dict[str, Any], dict]:
    """Run one of the scenarios with a recording dense method; return the method and the expected layouts."""
    if case == "ltx-coords-extra":
        model, inputs = _ltx(coords=True, extra=4)
    elif case == "hunyuan-unpadded":
        model, inputs = _hunyuan()
        inputs["encoder_attention_mask"] = torch.ones(BATCH, TEXT)
    else:
        model, inputs = CASES[case]()
    stock = _run(model, inputs)
    method = RecordingMethod()
    if mode == "apply":
        diffaccel.apply(model, method)
    else:
        if case.startswith("hunyuan"):
            mark_text_only(model.context_embedder)  # what the family's hook does under diffaccel.apply
        model.set_attn_processor(
            diffaccel.DiffAccelAttnProcessor(method, context=RunContext(grid=GRID) if mode == "bare-grid" else None)
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiffAccelWarning)
        assert _max_diff(_run(model, inputs), stock) == 0.0  # the stock code ran, bit for bit
    mask = inputs["encoder_attention_mask"]
    known = mode != "bare"
    if case.startswith("ltx"):
        heads = model.transformer_blocks[0].attn1.heads
        extra = 4 if case == "ltx-coords-extra" else 0
        grid = GRID if known and not extra else None
        expected = _ltx_expected(NUM_VIDEO + extra, grid, mask, heads)
    else:
        # under apply the forward's prompt lengths are used as they are (the unpadded prompt: all TEXT valid);
        # bare, they are read from the call's mask
        lengths = tuple(int(n) for n in mask.sum(dim=1))
        expected = _hv_expected(mask, GRID if known else None, lengths)
    return method, model, inputs, expected


SCENARIOS = [
    ("ltx", "apply"), ("ltx-video-coords", "apply"), ("ltx-coords-extra", "apply"), ("ltx", "bare-grid"),
    ("ltx", "bare"), ("hunyuan_video", "apply"), ("hunyuan_video-token-replace", "apply"),
    ("hunyuan-unpadded", "apply"), ("hunyuan_video", "bare-grid"), ("hunyuan_video", "bare"),
]


@pytest.mark.parametrize("case, mode", SCENARIOS)
def test_routed_layouts_equal_the_explicit_adapters(case: str, mode: str) -> None:
    method, model, _, expected = _record(case, mode)
    records = method.records
    if mode != "apply":  # bare installs have no recorded names: map the per-process ids back to module names
        ids = {f"{type(m).__name__}@{id(m):x}": name for name, m in attention_modules(model).items()}
        for record in records:
            record.layer = ids.get(record.layer, record.layer)
    seen = {r.layer: r for r in records}
    for layer, (layout, mask) in expected.items():
        record = seen[layer]
        got = record.layout
        if layout.unknown is not None:  # the reason is a sentence; the fields around it must match
            assert got.unknown, f"{layer}: expected an unknown grid, got {got}"
            assert "video_coords" in got.unknown if case == "ltx-coords-extra" else "diffaccel.apply" in got.unknown
            got = TokenLayout(**{**got.__dict__, "unknown": "?"})
        assert got == layout, f"{layer}: {got} != {layout}"
        assert record.q_shape[2] == layout.num_tokens
        if mask is None:
            assert record.attn_mask is None
        else:
            assert record.attn_mask is not None and record.attn_mask.dtype == mask.dtype
            assert torch.equal(record.attn_mask, mask.to(record.attn_mask.dtype)), layer
    if case.startswith("hunyuan"):  # the token refiner stays with the UNet adapter, text only
        refiner = seen[HV_REFINER].layout
        assert refiner.grid is None and refiner.text == slice(0, TEXT) and not refiner.grid_unknown


def test_both_families_run_through_routed_adapters() -> None:
    for case in ("ltx", "hunyuan_video"):
        model, inputs = CASES[case]()
        diffaccel.apply(model, "dense")
        _run(model, inputs)
        adapters = {type(adapter_for(m)).__name__: adapter_for(m) for m in attention_modules(model).values()}
        family = [a for a in adapters.values() if a.family in ("ltx", "hunyuan_video")]
        assert family and all(isinstance(a, RoutedAdapter) and a.runs_stock for a in family), adapters


def _counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_the_stock_processor_code_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper of the stock processors, patched in diffusers' modules after install, is called by the routed calls:
    what runs is diffusers' code (a diffusers change reaches diffaccel), not a copy made at import."""
    import diffusers.models.embeddings as embeddings
    import diffusers.models.transformers.transformer_ltx as transformer_ltx

    ltx, ltx_inputs = CASES["ltx"]()
    hv, hv_inputs = CASES["hunyuan_video"]()
    diffaccel.apply(ltx, "dense")
    diffaccel.apply(hv, "dense")
    ltx_rope = _counting(monkeypatch, transformer_ltx, "apply_rotary_emb")
    hv_rope = _counting(monkeypatch, embeddings, "apply_rotary_emb")  # imported inside HunyuanVideo's __call__
    _run(ltx, ltx_inputs)
    _run(hv, hv_inputs)
    assert len(ltx_rope) == 2  # attn1: query and key
    assert len(hv_rope) == 4  # dual- and single-stream blocks: query and key each


# ----------------------------------------------------------------------------------------------- strict, methods


def test_strict_refuses_an_unknown_grid_on_routed_calls() -> None:
    model, inputs = _ltx(coords=True, extra=4)  # conditioning tokens before the video: no regular grid
    stock = _run(model, inputs)
    diffaccel.apply(model, "dense", strict=True)  # dense needs no grid: strict changes nothing for it
    assert _max_diff(_run(model, inputs), stock) == 0.0
    diffaccel.apply(model, "tile", backend="reference", strict=True)
    with pytest.raises(LayoutError, match=r"transformer_blocks\.0\.attn1: method 'tile'.*video_coords.*strict=True"):
        _run(model, inputs)
    diffaccel.apply(model, "tile", backend="reference")  # without strict: dense, said once
    with pytest.warns(DiffAccelWarning, match="needs the token grid"):
        assert _max_diff(_run(model, inputs), stock) == 0.0

    hv, hv_inputs = CASES["hunyuan_video"]()  # bare install, no grid: a video grid cannot be inferred
    mark_text_only(hv.context_embedder)
    hv.set_attn_processor(diffaccel.DiffAccelAttnProcessor("tile", backend="reference", strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiffAccelWarning)
        with pytest.raises(LayoutError, match=r"diffaccel\.apply.*strict=True"):
            _run(hv, hv_inputs)


@pytest.mark.parametrize("case", ["ltx", "hunyuan_video"])
def test_a_sparse_method_runs_on_the_routed_family(case: str) -> None:
    """``gna`` runs its own attention on every video self/joint call (no fallback) and changes the output."""
    model, inputs = CASES[case]()
    stock = _run(model, inputs)
    processor = diffaccel.apply(model, "gna", backend="reference", kernel_size=(3, 3, 3))
    out = _run(model, inputs)
    assert torch.isfinite(out).all()
    joint = 1 if case == "ltx" else len(HV_JOINT)
    assert processor.method.call_counts.method == joint and processor.method.call_counts.dense == 0
    assert _max_diff(out, stock) > 1e-4  # a 3x3x3 neighbourhood on a 3x4x6 grid is not dense attention
