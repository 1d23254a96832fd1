"""The demo's engine and handlers on tiny-flux (issue 15): both sides, fidelity, heat map, kept masks, the dense
side reused, no reloads, readable errors after which the app keeps serving. Handlers are called directly here;
tests/test_demo_app.py drives the served app (gradio_client and a headless browser)."""

from __future__ import annotations

import re

import gradio as gr
import numpy as np
import pytest
import torch

from demo_support import shared_comparer
from diffaccel.demo.compare import Comparer, CompareRequest, SideRequest, layer_names
from diffaccel.demo.ui import NO_MASK, build_app
from diffaccel.eval.fidelity import compare
from diffaccel.eval.media import to_uint8
from diffaccel.pipelines.hooks import attention_modules, denoisers_of
from diffaccel.pipelines.processor import DiffAccelAttnProcessor

GNA = {"kernel_size": 5, "block_size": 64, "backend": "reference"}
"""A 5x5 window on tiny-flux's 16x16 grid in 64-token blocks: sparse, on the PyTorch reference (fast on a CPU)."""


def request(**changes) -> CompareRequest:
    base = dict(model="tiny-flux", prompt="a fox", b=SideRequest("gna", GNA), steps=2, warmup=0, repeats=1)
    base.update(changes)
    return CompareRequest(**base)


@pytest.fixture(scope="module")
def comparer() -> Comparer:
    return shared_comparer()


@pytest.fixture(scope="module")
def handlers(comparer):
    return build_app("tiny-flux", comparer=comparer).handlers


def stock(comparer: Comparer) -> bool:
    pipe = comparer.pipelines.get("tiny-flux", comparer.device, comparer.dtype)
    return not any(isinstance(m.processor, DiffAccelAttnProcessor)
                   for d in denoisers_of(pipe) for m in attention_modules(d).values())


def widget_values(handlers, overrides: dict[tuple[str, str, str], object]) -> list:
    values = [w.spec.widget_default for w in handlers.widgets]
    for i, w in enumerate(handlers.widgets):
        values[i] = overrides.get((w.side, w.method, w.spec.name), values[i])
    return values


def test_engine_compares_dense_with_gna(comparer):
    result = comparer.run(request(repeats=2))
    a, b = result.a.output, result.b.output
    assert a.shape == b.shape == (3, 64, 64) and torch.isfinite(b).all()
    assert not torch.equal(a, b)  # the window changed the output
    fid = compare(b, a)
    assert result.fidelity.psnr == pytest.approx(fid.psnr) and result.fidelity.ssim == pytest.approx(fid.ssim)
    assert 10 < result.fidelity.psnr < 80
    assert np.allclose(result.heat_map, (a - b).abs().mean(0).numpy(), atol=1e-6)
    assert result.heat_peak == pytest.approx(float((a - b).abs().mean(0).max()))
    assert len(result.a.samples) == len(result.b.samples) == 2
    ratios = [x.total_s / y.total_s for x, y in zip(result.a.samples, result.b.samples)]
    assert result.speedup.low == pytest.approx(min(ratios)) and result.speedup.high == pytest.approx(max(ratios))
    assert result.speedup.median == pytest.approx(result.a.total_s / result.b.total_s)
    assert result.a.masks == {}  # dense keeps no block mask
    pipe = comparer.pipelines.get("tiny-flux", comparer.device, comparer.dtype)
    assert set(result.b.masks) == {n for n in layer_names(pipe) if "attn" in n}
    for keep in result.b.masks.values():
        assert keep.dtype == bool and keep.shape == (1, 5, 5)  # 256 image + 32 text tokens in 64-token blocks
        assert 0 < keep.mean() < 1 and keep[0, 0].all() and keep[0, :, 0].all()  # FLUX: text first, global
    assert np.array_equal(result.image("b"), to_uint8(b))
    assert result.overheads_only and stock(comparer)


def test_dense_side_reused_when_only_the_method_side_changes(comparer):
    first = comparer.run(request(seed=5))
    loads, runs = comparer.pipelines.loads, comparer.runs
    second = comparer.run(request(seed=5, b=SideRequest("clear", {"radius": 4.0, "block_size": 64,
                                                                  "backend": "reference"})))
    assert second.a.reused and not second.b.reused
    assert comparer.runs == runs + 1  # only side B ran
    assert torch.equal(second.a.output, first.a.output)
    assert comparer.pipelines.loads == loads  # methods switch with apply/remove, no reload
    assert any("reused" in n for n in second.notes)
    assert second.speedup.count == 1
    third = comparer.run(request(seed=6))  # another seed: both sides run again
    assert not third.a.reused and comparer.runs == runs + 3
    assert not torch.equal(third.a.output, first.a.output)


def test_two_methods_side_by_side(comparer):
    result = comparer.run(request(a=SideRequest("gna", {**GNA, "kernel_size": 15}), b=SideRequest("gna", GNA)))
    assert result.a.masks and result.b.masks and not result.a.reused
    layer = next(iter(result.a.masks))
    assert result.b.masks[layer].sum() < result.a.masks[layer].sum()  # the 5x5 window keeps fewer blocks


BAD_INPUTS = [
    ({"prompt": "   "}, {}, "prompt must not be empty"),
    ({"height": 30}, {}, "height must be a positive multiple of"),
    ({"model": "/nonexistent/diffaccel-demo-model"}, {}, "nonexistent"),
    ({"method_b": "tile"}, {}, "tile: attention tiles need a video grid"),
    ({}, {("B", "gna", "block_size"): 3}, "block_size"),
    ({}, {("B", "gna", "kernel_size"): "[3,"}, "gna.kernel_size must be JSON"),
]
"""Empty prompt, a size the model's factors do not divide, an unknown model path, a method that does not apply to
the model's family (attention tiles on an image model), a parameter out of range, a malformed parameter."""


def test_bad_input_is_one_readable_error_and_the_app_keeps_serving(handlers, comparer):
    for changes, overrides, match in BAD_INPUTS:
        args = dict(model="tiny-flux", prompt="a fox", seed=0, steps=2, height=64, width=64, frames=None,
                    method_a="dense", method_b="gna", warmup=0, repeats=1)
        args.update(changes)
        values = widget_values(handlers, {("B", "gna", "backend"): "reference", **overrides})
        with pytest.raises(gr.Error) as info:
            handlers.generate(*args.values(), *values, progress=None)
        message = info.value.message
        assert re.search(re.escape(match), message), (match, message)
        assert "\n" not in message and "Traceback" not in message
        assert stock(comparer), match  # a failed run leaves the stock processors in place
    # The next request is served.
    ok = handlers.generate("tiny-flux", "a fox", 0, 2, 64, 64, None, "dense", "gna", 0, 1,
                           *widget_values(handlers, {("B", "gna", "backend"): "reference"}), progress=None)
    assert float(ok[3].rstrip("x").split()[0]) > 0


def test_generate_fills_every_panel_and_the_mask_panel_follows_layer_and_head(handlers):
    values = widget_values(handlers, {("B", "gna", "backend"): "reference", ("B", "gna", "block_size"): 64,
                                      ("B", "gna", "kernel_size"): "5"})
    out = handlers.generate("tiny-flux", "a fox", 1, 2, 64, 64, None, "dense", "gna", 0, 1, *values, progress=None)
    (img_a, img_b), heat, timing, speedup, fidelity, clip, gif, plot, notes, masks, side, layer, head, mask, density = out
    assert img_a.shape == img_b.shape == (64, 64, 3) and img_a.dtype == np.uint8
    assert heat.shape == (256, 256, 3) and np.array_equal(heat[::4, ::4], heat[3::4, 3::4])  # whole-pixel zoom
    assert tuple(heat.reshape(-1, 3).max(0)) == (252, 255, 164) or heat.max() == 0  # the peak is the top colour
    assert re.fullmatch(r"\d+\.\d\dx", speedup)
    assert "| A | dense |" in timing and "| B | gna" in timing and "overheads" in timing
    assert "PSNR" in fidelity and "SSIM" in fidelity
    assert not clip["visible"] and not gif["visible"] and not plot["visible"]  # image model: no clip, no curve
    assert side["value"] == "B" and layer["value"] in masks["B"] and len(layer["choices"]) == 4
    keep = masks["B"][layer["value"]]
    assert mask.ndim == 3 and "density kept" in density
    assert f"{keep[0].mean():.1%}" in density
    image, text = handlers.show_mask(masks, "B", layer["value"], 7)  # head out of range: the shared mask
    assert "head 0" in text and np.array_equal(image, mask)
    assert handlers.show_mask(masks, "A", None, 0) == (None, NO_MASK)


def test_compare_api_refuses_parameters_that_are_not_a_json_object(handlers):
    with pytest.raises(gr.Error, match="params_b must be a JSON object"):
        handlers.compare_api("tiny-flux", "a fox", "dense", "{}", "gna", "[1]")
    with pytest.raises(gr.Error, match="params_a must be a JSON object"):
        handlers.compare_api("tiny-flux", "a fox", "dense", "{oops", "gna", "{}")


def test_build_app_refuses_an_unknown_method():
    from diffaccel.errors import DiffAccelError

    with pytest.raises(DiffAccelError, match="method_b 'nope' is not a registered method"):
        build_app("tiny-flux", method_b="nope", comparer=Comparer(device="cpu"))


def test_video_result_shows_the_synchronized_clip_and_the_per_frame_curve(tmp_path):
    """The handler's video branch on a result built here (a tiny video model run costs a minute on this CPU):
    the server-rendered clip (GIF without an mp4 writer) and the per-frame PSNR curve become visible."""
    from diffaccel.demo.compare import CompareResult, SideResult
    from diffaccel.demo.ui import DemoHandlers
    from diffaccel.demo.visuals import difference_map, frame_psnr, side_by_side_clip
    from diffaccel.eval.timing import Timing

    g = torch.Generator().manual_seed(7)
    a = torch.rand(5, 3, 16, 16, generator=g)
    b = (a + 0.02 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    clip = side_by_side_clip(a, b, ("A", "B"), tmp_path / "clip", fps=8)
    heat, peak = difference_map(a, b)
    req = request(model="tiny-wan", b=SideRequest("gna"))

    class Fixed:
        def run(self, req, progress=None):
            return CompareResult(req, "WanPipeline", "cpu", "float32", True, 2,
                                 SideResult(req.a, a, (Timing(2.0, 1.0),)), SideResult(req.b, b, (Timing(1.0, 0.5),)),
                                 None, None, compare(b, a), heat, peak, frame_psnr(a, b), clip, [])

    out = DemoHandlers(Fixed(), []).generate("tiny-wan", "a fox", 0, 2, 16, 16, 5, "dense", "gna", 0, 1, progress=None)
    video, gif, plot = out[5], out[6], out[7]
    shown = video if clip.format == "mp4" else gif
    assert shown["visible"] and shown["value"] == clip.path.as_posix()
    assert plot["visible"] and list(plot["value"]["frame"]) == [0, 1, 2, 3, 4]
    assert np.allclose(plot["value"]["PSNR dB"], frame_psnr(a, b))
    assert out[0][0].shape == (16, 16, 3)  # the slider shows the first frames
    assert out[3] == "n/a"  # no speedup given
