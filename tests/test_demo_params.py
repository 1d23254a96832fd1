"""The demo's parameter widgets come from the methods' config dataclasses (issue 15): every field of every
registered method, with its type, default and help; widget values go back to method keywords."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from diffaccel.demo.params import param_specs, params_from_widgets
from diffaccel.demo.visuals import colormap, difference_map, frame_psnr, mask_image, side_by_side_clip
from diffaccel.errors import ConfigError
from diffaccel.eval.fidelity import psnr
from diffaccel.methods.base import get_method, list_methods, method_class


def test_every_field_of_every_registered_method_has_a_widget():
    for name in list_methods():
        fields = dataclasses.fields(method_class(name).config_class)
        specs = param_specs(name)
        assert [s.name for s in specs] == [f.name for f in fields], name
        for s, f in zip(specs, fields):
            assert s.help == f.metadata.get("help", ""), (name, s.name)


def test_kinds_defaults_and_choices():
    specs = {s.name: s for s in param_specs("gna")}
    assert specs["dense_steps"].kind == "int" and specs["dense_steps"].default == 0
    assert specs["backend"].kind == "choice" and specs["backend"].choices == ("auto", "triton", "reference")
    assert specs["kernel_size"].kind == "json" and specs["kernel_size"].widget_default == ""
    assert specs["is_causal"].kind == "json" and specs["is_causal"].widget_default == "false"
    clear = {s.name: s for s in param_specs("clear")}
    assert clear["radius"].kind == "float" and clear["radius"].default == 16.0
    assert clear["proportional_attention"].kind == "bool"
    assert clear["video"].kind == "choice" and set(clear["video"].choices) >= {"per_frame", "ball"}
    agent = {s.name: s for s in param_specs("agent")}
    assert agent["stride"].widget_default == "[4, 4]"
    assert param_specs("dense") == []


def test_widget_defaults_round_trip_to_no_parameters():
    for name in list_methods():
        values = {s.name: s.widget_default for s in param_specs(name)}
        assert params_from_widgets(name, values) == {}, name


def test_changed_values_are_parsed_and_build_the_method():
    params = params_from_widgets("gna", {"kernel_size": "[3, 5]", "block_size": 64.0, "backend": "reference",
                                         "dense_steps": 0, "is_causal": "false"})
    assert params == {"kernel_size": [3, 5], "block_size": 64, "backend": "reference"}
    method = get_method("gna", **params)
    assert method.config.kernel_size == (3, 5) and method.config.block_size == 64
    assert params_from_widgets("clear", {"radius": 4}) == {"radius": 4.0}
    assert params_from_widgets("gna", {"kernel_size": "null"}) == {}


@pytest.mark.parametrize("method, values, match", [
    ("gna", {"kernel_size": "[3,"}, "gna.kernel_size must be JSON"),
    ("gna", {"block_size": 1.5}, "gna.block_size must be an integer"),
    ("clear", {"radius": "big"}, "clear.radius must be a number"),
    ("clear", {"proportional_attention": "yes"}, "must be true or false"),
    ("gna", {"nope": 1}, "unknown parameter"),
])
def test_bad_widget_values_name_the_parameter(method, values, match):
    with pytest.raises(ConfigError, match=match):
        params_from_widgets(method, values)


def test_out_of_range_values_are_refused_by_the_method_validation():
    params = params_from_widgets("gna", {"block_size": 3})
    with pytest.raises(ConfigError, match="block_size"):
        get_method("gna", **params)


# ----------------------------------------------------------------------------------------------- visuals


def test_colormap_ends_and_monotone_brightness():
    rgb = colormap(np.linspace(0, 1, 11))
    assert rgb.dtype == np.uint8 and rgb.shape == (11, 3)
    assert tuple(rgb[0]) == (0, 0, 4) and tuple(rgb[-1]) == (252, 255, 164)
    assert np.all(np.diff(rgb.astype(int).sum(-1)) > 0)
    assert tuple(colormap(np.array([np.nan]))[0]) == (0, 0, 4)


def test_difference_map_and_frame_psnr_on_fresh_inputs():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(3, 3, 16, 20, generator=g)
    b = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    diff, peak = difference_map(a, b)
    expected = (a - b).abs().mean(1).mean(0)
    assert diff.shape == (16, 20) and np.allclose(diff, expected.numpy(), atol=1e-6)
    assert peak == pytest.approx(float(expected.max()))
    per_frame = frame_psnr(a, b)
    assert per_frame == pytest.approx([psnr(b[i], a[i]) for i in range(3)])
    assert frame_psnr(a, a) == [float("inf")] * 3
    with pytest.raises(ValueError, match="one shape"):
        frame_psnr(a, b[:2])


def test_mask_image_shows_kept_blocks_white():
    keep = np.array([[True, False, False], [False, True, True]])
    img = np.asarray(mask_image(keep))
    cell = 512 // 3
    assert img.shape == (2 * cell, 3 * cell, 3)
    centre = img[cell // 2 :: cell, cell // 2 :: cell, 0]
    assert np.array_equal(centre > 200, keep)


def test_side_by_side_clip_keeps_frames_in_sync(tmp_path):
    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(5, 3, 16, 16, generator=g), torch.rand(5, 3, 16, 16, generator=g)
    written = side_by_side_clip(a, b, ("A", "B"), tmp_path / "clip", fps=8)
    assert written.path.exists() and written.format in ("mp4", "gif")
    if written.format == "gif":
        from PIL import Image, ImageSequence

        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(written.path))]
        assert len(frames) == 5 and frames[0].shape == (14 + 16, 2 * 16 + 4, 3)
