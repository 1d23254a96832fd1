"""Every public option of the locality methods (gna, tile, clear, msw) and the dense method, turned on and checked
for its effect against the functional reference of the same definition (a dense boolean mask and SDPA), on odd and
prime grids; two layers with different configurations in one method; the kernel backend and block size plumbing.
"""

from __future__ import annotations

import math

import pytest
import torch

import diffaccel.sparse.run as run_module
from diffaccel import functional as fn
from diffaccel.context import RunContext
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import get_method, sdpa
from diffaccel.methods.msw import shift_index

FAST = dict(block_size=16, backend="reference")


def qkv(n, heads=2, dim=16, batch=1):
    return tuple(torch.randn(batch, heads, n, dim) for _ in range(3))


def layout(grid, nt=0, where="suffix", **fields):
    nv = math.prod(grid)
    text = None if not nt else (slice(0, nt) if where == "prefix" else slice(nv, nv + nt))
    return TokenLayout(num_tokens=nv + nt, grid=grid, text=text, **fields)


def call(method, lay, layer="blocks.0.attn", step=0, num_steps=None, heads=2, scale=None):
    q, k, v = qkv(lay.num_tokens, heads=heads)
    out = method(q, k, v, lay, RunContext(grid=lay.grid, layer=layer, step=step, num_steps=num_steps), scale=scale)
    return out, (q, k, v)


def close(a, b, tol=2e-5):
    assert torch.isfinite(a).all()
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol}"


def differs(a, b):
    return (a.double() - b.double()).abs().max().item() > 1e-3


# ----------------------------------------------------------------------------------------------- gna


@pytest.mark.parametrize(
    "options,params",
    [
        (dict(kernel_size=(3, 5)), ((3, 5), 1, 1, False)),
        (dict(kernel_size=4, stride=(2, 3)), (4, (2, 3), 1, False)),
        (dict(kernel_size=3, dilation=(2, 1)), (3, 1, (2, 1), False)),
        (dict(kernel_size=3, is_causal=(True, False)), (3, 1, 1, (True, False))),
        (dict(kernel_size=5, stride=5), (5, 5, 1, False)),
    ],
)
def test_gna_options_on_a_prime_grid(options, params):
    grid, nt = (7, 11), 5
    lay = layout(grid, nt, "prefix")
    out, (q, k, v) = call(get_method("gna", **options, **FAST), lay)
    ks, st, dl, ca = params
    expected = fn.neighborhood_attention_reference(q, k, v, grid, ks, st, dl, ca, text=lay.text)
    close(out, expected)
    assert differs(expected, sdpa(q, k, v))


def test_gna_presets_scale_with_the_grid():
    from diffaccel.methods.gna import PRESETS, scale_preset

    grid = (5, 8, 12)  # odd frame count, non-exact preset scales
    ks, st, dl = scale_preset(PRESETS["video"], grid)
    out, (q, k, v) = call(get_method("gna", **FAST), layout(grid))  # preset auto on a 3-D grid: video
    close(out, fn.neighborhood_attention_reference(q, k, v, grid, ks, st, dl))
    image = get_method("gna", preset="image", **FAST)
    ks2, st2, dl2 = scale_preset(PRESETS["image"], (13, 17))
    out2, (q2, k2, v2) = call(image, layout((13, 17)))
    close(out2, fn.neighborhood_attention_reference(q2, k2, v2, (13, 17), ks2, st2, dl2))
    with pytest.raises(Exception, match="preset 'video' is 3-D"):
        call(get_method("gna", preset="video", **FAST), layout((13, 17)))
    # a preset window with an explicit stride: the stride replaces the preset's
    out3, (q3, k3, v3) = call(get_method("gna", stride=1, **FAST), layout((13, 17)))
    close(out3, fn.neighborhood_attention_reference(q3, k3, v3, (13, 17), ks2, 1, dl2))


# ----------------------------------------------------------------------------------------------- tile


@pytest.mark.parametrize(
    "options,frames",
    [
        ({}, (0,)),  # round(5 / 4) = 1 global frame, the first
        (dict(global_frames=2), (0, 1)),
        (dict(global_frames=3, placement="uniform"), (0, 2, 4)),
        (dict(global_frames=[3]), (3,)),
        (dict(global_frames=0), ()),
        (dict(global_frames=[[0], [4]]), ((0,), (4,))),  # one list per head
    ],
)
def test_tile_options_on_an_odd_video_grid(options, frames):
    grid = (5, 3, 7)
    lay = layout(grid, 4, "prefix")
    out, (q, k, v) = call(get_method("tile", **options, **FAST), lay)
    close(out, fn.tile_attention_reference(q, k, v, grid, frames, text=lay.text))


# ----------------------------------------------------------------------------------------------- clear


@pytest.mark.filterwarnings("ignore:clear. running training-free")
def test_clear_options():
    grid = (7, 13)
    lay = layout(grid, 3, "suffix")
    out, (q, k, v) = call(get_method("clear", radius=2.5, **FAST), lay)
    close(out, fn.circular_window_attention_reference(q, k, v, grid, 2.5, text=lay.text))
    # video: per_frame (default) vs ball, on a grid whose frames are not block-aligned (folded) and one that is
    for video_grid in ((3, 3, 5), (2, 4, 8)):
        vl = layout(video_grid, 4, "prefix")
        per_frame, (q, k, v) = call(get_method("clear", radius=2, **FAST), vl)
        close(per_frame, fn.circular_window_attention_reference(q, k, v, video_grid, 2, vl.text, per_frame=True))
        ball = get_method("clear", radius=2, video="ball", **FAST)(q, k, v, vl, RunContext(layer="x"))
        close(ball, fn.circular_window_attention_reference(q, k, v, video_grid, 2, vl.text))
        assert differs(ball, per_frame)
    # proportional attention: scale * sqrt(log N / log train_tokens), with the paper's default and another base
    for options, base in ((dict(), 64 * 64 + 512), (dict(train_tokens=50), 50)):
        method = get_method("clear", radius=2.5, proportional_attention=True, **options, **FAST)
        scaled, (q, k, v) = call(method, lay, scale=0.3)
        factor = math.sqrt(math.log(lay.num_tokens) / math.log(base))
        close(scaled, fn.circular_window_attention_reference(q, k, v, grid, 2.5, lay.text, scale=0.3 * factor))
        assert differs(scaled, fn.circular_window_attention_reference(q, k, v, grid, 2.5, lay.text, scale=0.3))


def test_clear_distilled_radius_is_checked():
    from diffaccel.errors import ConfigError

    method = get_method("clear", radius=4, weights="somewhere", **FAST)
    lay = layout((8, 8))
    with pytest.raises(ConfigError, match="never installed"):
        call(method, lay)
    with pytest.raises(ConfigError, match="distilled for radius 8 but the method uses radius 4"):
        method.note_distilled(8)
    method.note_distilled(4)
    out, (q, k, v) = call(method, lay)  # installed: runs, no error
    close(out, fn.circular_window_attention_reference(q, k, v, (8, 8), 4))


# ----------------------------------------------------------------------------------------------- msw


@pytest.mark.parametrize("policy", ["random", "no_repeat", "cyclic"])
def test_msw_policies_window_and_seed(policy):
    grid, nt = (8, 12), 5
    lay = layout(grid, nt, "prefix")
    method = get_method("msw", shift_policy=policy, seed=7, **FAST)
    shifts = set()
    for step in range(6):
        out, (q, k, v) = call(method, lay, layer="up.0", step=step)
        kk = shift_index(policy, 7, "up.0", step)
        shifts.add(kk)
        if policy == "cyclic":
            assert kk == step % 4
        if policy == "no_repeat" and step:
            assert kk != shift_index(policy, 7, "up.0", step - 1)
        expected = fn.shifted_window_attention_reference(q, k, v, grid, (4, 6), (kk * 1, kk * 1), text=lay.text)
        close(out, expected)
    assert len(shifts) > 1
    # an explicit window (odd, not dividing the grid: row-major with a smaller last window)
    out, (q, k, v) = call(get_method("msw", window=(3, 5), shift_policy="cyclic", **FAST), lay, step=1)
    close(out, fn.shifted_window_attention_reference(q, k, v, grid, (3, 5), (0, 1), text=lay.text))
    # another seed draws other shifts for some layer and step
    assert any(shift_index("random", 7, f"l{i}", 0) != shift_index("random", 8, f"l{i}", 0) for i in range(8))


def test_msw_max_downsample_selects_unet_levels():
    level2 = layout((5, 7), downsample=2, hierarchical=True)  # an odd UNet level
    q, k, v = qkv(35)
    ctx = RunContext(grid=(10, 14), layer="mid", step=0)
    default = get_method("msw", **FAST)(q, k, v, level2, ctx)
    close(default, sdpa(q, k, v), 1e-6)  # default: only the latent-resolution level
    windowed = get_method("msw", max_downsample=2, **FAST)(q, k, v, level2, ctx)
    kk = shift_index("random", 0, "mid", 0)
    win = (3, 4)  # ceil(5 / 2), ceil(7 / 2)
    close(windowed, fn.shifted_window_attention_reference(q, k, v, (5, 7), win, (kk * 0, kk * 1)))
    assert differs(windowed, default)
    # An SDXL-like UNet, whose highest-resolution attention level is 2x down (the adapter's finest_downsample=2):
    # the default windows that level, as HiDiffusion does on SDXL; max_downsample=1 keeps it dense.
    sdxl_level = layout((5, 7), downsample=2, hierarchical=True, finest_downsample=2)
    close(get_method("msw", **FAST)(q, k, v, sdxl_level, ctx), windowed)
    close(get_method("msw", max_downsample=1, **FAST)(q, k, v, sdxl_level, ctx), sdpa(q, k, v), 1e-6)


# ----------------------------------------------------------------------------------------------- shared options


@pytest.mark.parametrize(
    "name,base,override,reference",
    [
        ("gna", dict(kernel_size=3), dict(kernel_size=5, stride=2),
         lambda q, k, v, g, t, o: fn.neighborhood_attention_reference(q, k, v, g, o.get("kernel_size", 3),
                                                                      o.get("stride", 1), text=t)),
        ("clear", dict(radius=2), dict(radius=3.5),
         lambda q, k, v, g, t, o: fn.circular_window_attention_reference(q, k, v, g, o.get("radius", 2), t)),
        ("msw", dict(window=(4, 4), shift_policy="cyclic"), dict(window=(2, 8)),
         lambda q, k, v, g, t, o: fn.shifted_window_attention_reference(q, k, v, g, o.get("window", (4, 4)), 0, t)),
    ],
)
@pytest.mark.filterwarnings("ignore:clear. running training-free")
def test_two_layers_with_different_configurations_in_one_method(name, base, override, reference):
    grid = (8, 9)
    lay = layout(grid, 3, "suffix")
    method = get_method(name, layer_overrides={"single.*": override}, **base, **FAST)
    for layer, options in (("blocks.0.attn", {}), ("single.1.attn", override), ("blocks.0.attn", {})):
        out, (q, k, v) = call(method, lay, layer=layer, step=0)
        close(out, reference(q, k, v, grid, lay.text, options))
    plain, (q, k, v) = call(method, lay, layer="blocks.0.attn")
    assert differs(reference(q, k, v, grid, lay.text, override), reference(q, k, v, grid, lay.text, {}))


def test_block_size_and_backend_reach_the_kernel(monkeypatch):
    seen = []
    real = run_module.block_sparse_attention_unchecked

    def spy(q, k, v, block_mask, **kwargs):
        seen.append((block_mask.q_block_size, kwargs["backend"]))
        return real(q, k, v, block_mask, **kwargs)

    monkeypatch.setattr(run_module, "block_sparse_attention_unchecked", spy)
    lay = layout((8, 8), 2)
    outs = []
    for block_size, backend in ((16, "reference"), (32, "triton"), (64, "auto")):
        out, (q, k, v) = call(get_method("gna", kernel_size=3, block_size=block_size, backend=backend), lay)
        close(out, fn.neighborhood_attention_reference(q, k, v, (8, 8), 3, text=lay.text))
        outs.append(out)
    assert seen == [(16, "reference"), (32, "triton"), (64, "auto")]


def test_dense_method_is_sdpa():
    lay = layout((5, 7), 3)
    out, (q, k, v) = call(get_method("dense"), lay, scale=0.2)
    torch.testing.assert_close(out, sdpa(q, k, v, scale=0.2), rtol=0, atol=0)
