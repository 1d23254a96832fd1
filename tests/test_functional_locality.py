"""diffaccel.functional: the four local attention patterns against brute-force definitions.

The masks here are written independently of diffaccel's mask specs: plain Python loops over grid coordinates that
implement NATTEN's rule (research/locality.md §1.2), CLEAR's circle, Efficient-vDiT's frame tiles and HiDiffusion's
roll-and-partition, each embedded with dense text rows and columns. Attention under such a mask is then a float64
softmax. Most cases run the kernel's PyTorch reference (fast: the token permutation and block masks are the same
code the Triton path uses); a few run the Triton kernel (interpreted on CPU), on at most a few hundred tokens.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from diffaccel import functional as fn
from diffaccel.errors import ConfigError
from diffaccel.kernels import CustomMask, NeighborhoodMask, ShiftedWindowMask, TextSpec, classify_blocks, triton_usable
from diffaccel.sparse.plans import plan_for
from diffaccel.methods.gna import analyze

HEADS, DIM = 2, 16

# ----------------------------------------------------------------------------------------------- brute force


from natten_rules import masked_attention, natten_axis, with_text  # noqa: E402  (the tests' one hand-written NATTEN definition)


def coords(grid: tuple[int, ...]) -> list[tuple[int, ...]]:
    return list(itertools.product(*[range(n) for n in grid]))


def brute_neighborhood(grid, kernel_size, stride, dilation, causal) -> torch.Tensor:
    nd = len(grid)
    ks, st, dl, ca = (p if isinstance(p, tuple) else (p,) * nd for p in (kernel_size, stride, dilation, causal))
    pts = coords(grid)
    allowed = [[natten_axis(n, k, s, d, c, x) for x in range(n)] for n, k, s, d, c in zip(grid, ks, st, dl, ca)]
    keep = torch.zeros(len(pts), len(pts), dtype=torch.bool)
    for i, p in enumerate(pts):
        for j, r in enumerate(pts):
            keep[i, j] = all(r[a] in allowed[a][p[a]] for a in range(nd))
    return keep


def brute_circle(grid, radius, per_frame=False) -> torch.Tensor:
    pts = coords(grid)
    keep = torch.zeros(len(pts), len(pts), dtype=torch.bool)
    for i, p in enumerate(pts):
        for j, r in enumerate(pts):
            if per_frame:
                keep[i, j] = p[0] == r[0] and (p[1] - r[1]) ** 2 + (p[2] - r[2]) ** 2 < radius**2
            else:
                keep[i, j] = sum((a - b) ** 2 for a, b in zip(p, r)) < radius**2
    return keep


def brute_tile(grid, global_frames) -> torch.Tensor:
    pts = coords(grid)
    keep = torch.zeros(len(pts), len(pts), dtype=torch.bool)
    for i, p in enumerate(pts):
        for j, r in enumerate(pts):
            keep[i, j] = p[0] == r[0] or p[0] in global_frames or r[0] in global_frames
    return keep


def brute_windows(grid, window, shift) -> torch.Tensor:
    """HiDiffusion: roll the map by -shift (token x lands at (x - s) mod n), cut windows, attend inside each."""
    pts = coords(grid)

    def window_of(p):
        return tuple(((x - s) % n) // w for x, n, w, s in zip(p, grid, window, shift))

    keep = torch.zeros(len(pts), len(pts), dtype=torch.bool)
    for i, p in enumerate(pts):
        for j, r in enumerate(pts):
            keep[i, j] = window_of(p) == window_of(r)
    return keep


def inputs(num_tokens: int, batch: int = 1, dtype=torch.float32):
    return tuple(torch.randn(batch, HEADS, num_tokens, DIM, dtype=dtype) for _ in range(3))


def text_arg(num_visual: int, num_text: int, position: str | None):
    if position is None:
        return None
    return slice(0, num_text) if position == "prefix" else slice(num_visual, num_visual + num_text)


def assert_close(out, ref, tol=2e-5):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= tol * max(1.0, ref.double().abs().max().item()), err


TEXT_CASES = [(0, None), (5, "prefix"), (7, "suffix")]

# ----------------------------------------------------------------------------------------------- neighborhood

NEIGHBORHOOD_CASES = [
    # grid, kernel_size, stride, dilation, is_causal
    ((37,), 5, 1, 1, False),
    ((32,), 8, 8, 1, False),  # blocked 1-D
    ((40,), 6, 3, 2, False),  # even window, stride, dilation
    ((29,), 4, 2, 1, True),  # causal with stride
    ((7, 9), (3, 5), 1, 1, False),  # odd sizes
    ((9, 11), (4, 5), (2, 3), (2, 1), False),
    ((16, 16), 8, 8, 1, False),  # blocked 2-D: tile-major, fully block-sparse
    ((16, 16), 12, 4, 1, False),  # strided (GNA), fully block-sparse on 4x4 tiles
    ((16, 16), (8, 8), (4, 4), (2, 2), False),  # strided + dilation: tiles inside dilation groups
    ((10, 12), (6, 4), (3, 4), 1, (True, False)),
    ((3, 5, 6), (2, 3, 3), (1, 2, 1), 1, (True, False, False)),
    ((4, 8, 8), (2, 8, 4), (2, 8, 4), 1, False),  # 3-D blocked
    ((5, 6, 7), (3, 4, 5), (3, 2, 1), (1, 1, 1), False),
]


@pytest.mark.parametrize("case", NEIGHBORHOOD_CASES, ids=lambda c: f"{c[0]}-k{c[1]}-s{c[2]}-d{c[3]}-c{c[4]}")
@pytest.mark.parametrize("num_text,position", TEXT_CASES)
def test_neighborhood_matches_natten_definition(case, num_text, position):
    grid, ks, st, dl, ca = case
    nv = math.prod(grid)
    keep = with_text(brute_neighborhood(grid, ks, st, dl, ca), num_text, position)
    q, k, v = inputs(nv + num_text)
    text = text_arg(nv, num_text, position)
    expected = masked_attention(q, k, v, keep)
    out = fn.neighborhood_attention(q, k, v, grid, ks, st, dl, ca, text=text, block_size=16, backend="reference")
    assert_close(out, expected)
    assert_close(fn.neighborhood_attention_reference(q, k, v, grid, ks, st, dl, ca, text=text), expected)


@pytest.mark.parametrize(
    "grid,ks,st,dl,tile_rank",
    [((16, 16), 8, 8, 1, 2), ((16, 16), 12, 4, 1, 2), ((16, 16), 8, 4, 2, 2), ((4, 8, 8), (2, 8, 4), (2, 8, 4), 1, 3),
     ((64,), 16, 16, 1, 1)],
)
def test_strided_windows_run_tile_major_and_fully_block_sparse(grid, ks, st, dl, tile_rank):
    """Stride = tile and window = odd multiple of the tile: every visited block is dense (GNA's claim)."""
    spec = NeighborhoodMask(grid, ks, st, dl, text=TextSpec(5, "prefix"))
    plan = plan_for(spec, 16, "cpu")
    assert plan.layout.startswith("tile-major") and len(plan.tile) == tile_rank
    assert plan.block_mask.num_partial == 0 and plan.block_mask.spec is None
    assert plan.kept_block_fraction < 1
    # the kernel order is a permutation of the sequence, text last, inverse exact
    order = plan.order
    assert order is not None and torch.equal(torch.sort(order).values, torch.arange(spec.num_tokens))
    assert torch.equal(order[-5:], torch.arange(5))
    assert torch.equal(order[plan.inverse], torch.arange(spec.num_tokens))
    # the block mask in kernel order keeps exactly the spec's elements (no partial block needed)
    n = spec.num_tokens
    full = spec.mask_mod(0, 0, order.view(-1, 1), order.view(1, -1))
    blocks = plan.block_mask.block_keep()[0][0, 0]
    per_token = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)[:n, :n]
    assert torch.equal(per_token, full)
    assert plan_for(spec, 16, "cpu") is plan  # cached per (grid, config, lengths, device)


def test_sliding_window_runs_row_major_with_partial_blocks():
    plan = plan_for(NeighborhoodMask((16, 16), 5), 16, "cpu")
    assert plan.layout == "row-major" and plan.order is None and plan.block_mask.num_partial > 0


# ----------------------------------------------------------------------------------------------- circle, tiles, windows


@pytest.mark.parametrize("grid,radius", [((9, 11), 3.0), ((8, 8), 2.5), ((12,), 4), ((3, 5, 6), 2.2), ((6, 7), 1)])
@pytest.mark.parametrize("num_text,position", TEXT_CASES)
def test_circle_matches_definition(grid, radius, num_text, position):
    nv = math.prod(grid)
    q, k, v = inputs(nv + num_text)
    text = text_arg(nv, num_text, position)
    expected = masked_attention(q, k, v, with_text(brute_circle(grid, radius), num_text, position))
    assert_close(fn.circular_window_attention(q, k, v, grid, radius, text, block_size=16, backend="reference"), expected)
    assert_close(fn.circular_window_attention_reference(q, k, v, grid, radius, text), expected)


@pytest.mark.parametrize("num_text,position", TEXT_CASES)
def test_circle_per_frame_matches_definition(num_text, position):
    grid = (3, 5, 6)
    nv = math.prod(grid)
    q, k, v = inputs(nv + num_text, batch=2)
    text = text_arg(nv, num_text, position)
    expected = masked_attention(q, k, v, with_text(brute_circle(grid, 2.5, per_frame=True), num_text, position))
    out = fn.circular_window_attention(q, k, v, grid, 2.5, text, per_frame=True, block_size=16, backend="reference")
    assert_close(out, expected)
    assert_close(fn.circular_window_attention_reference(q, k, v, grid, 2.5, text, per_frame=True), expected)


@pytest.mark.parametrize("grid,frames", [((5, 3, 4), (0,)), ((6, 2, 5), (1, 4)), ((4, 3, 3), ()), ((3, 4, 4), (0, 1, 2))])
@pytest.mark.parametrize("num_text,position", TEXT_CASES)
def test_tiles_match_definition(grid, frames, num_text, position):
    nv = math.prod(grid)
    q, k, v = inputs(nv + num_text)
    text = text_arg(nv, num_text, position)
    expected = masked_attention(q, k, v, with_text(brute_tile(grid, frames), num_text, position))
    assert_close(fn.tile_attention(q, k, v, grid, frames, text, block_size=16, backend="reference"), expected)
    assert_close(fn.tile_attention_reference(q, k, v, grid, frames, text), expected)


def test_tiles_per_head_global_frames():
    grid, per_head = (4, 3, 5), ((0,), (1, 3))
    nv = math.prod(grid)
    q, k, v = inputs(nv + 6)
    keep = torch.stack([with_text(brute_tile(grid, f), 6, "suffix") for f in per_head]).unsqueeze(0)
    expected = masked_attention(q, k, v, keep)
    out = fn.tile_attention(q, k, v, grid, per_head, slice(nv, nv + 6), block_size=16, backend="reference")
    assert_close(out, expected)


@pytest.mark.parametrize(
    "grid,window,shift",
    [((8, 8), None, (2, 2)), ((8, 12), None, (3, 0)), ((9, 7), None, (1, 2)), ((8, 12), (4, 3), (1, 2)),
     ((10, 6), (4, 4), (5, 1)), ((12,), 4, 3), ((2, 4, 6), (2, 2, 3), (0, 1, 2))],
)
@pytest.mark.parametrize("num_text,position", TEXT_CASES)
def test_shifted_windows_match_definition(grid, window, shift, num_text, position):
    nv = math.prod(grid)
    win = tuple(-(-n // 2) for n in grid) if window is None else (window if isinstance(window, tuple) else (window,))
    sh = shift if isinstance(shift, tuple) else (shift,)
    q, k, v = inputs(nv + num_text)
    text = text_arg(nv, num_text, position)
    expected = masked_attention(q, k, v, with_text(brute_windows(grid, win, sh), num_text, position))
    out = fn.shifted_window_attention(q, k, v, grid, window, shift, text, block_size=16, backend="reference")
    assert_close(out, expected)
    assert_close(fn.shifted_window_attention_reference(q, k, v, grid, window, shift, text), expected)


def test_shifted_windows_that_tile_the_grid_run_window_major():
    plan = plan_for(ShiftedWindowMask((8, 8), (4, 4), (1, 1), text=TextSpec(3, "prefix")), 16, "cpu")
    assert plan.layout == "window-major" and plan.block_mask.num_partial == 0
    full = plan.block_mask.block_keep()[0][0, 0]
    assert torch.equal(full[:4, :4], torch.eye(4, dtype=torch.bool))  # one 16-token window per block
    assert full[:, 4].all() and full[4].all()  # the text block, dense both ways


# ----------------------------------------------------------------------------------------------- density 1


def test_full_windows_equal_dense_sdpa():
    grid = (6, 7)
    nv = math.prod(grid)
    q, k, v = inputs(nv + 5)
    text = slice(0, 5)
    dense = F.scaled_dot_product_attention(q, k, v)
    assert_close(fn.neighborhood_attention(q, k, v, grid, grid, text=text, block_size=16), dense)
    assert_close(fn.shifted_window_attention(q, k, v, grid, grid, (2, 3), text, block_size=16), dense)
    assert_close(fn.circular_window_attention(q, k, v, grid, 9.0, text, block_size=16), dense)
    grid3 = (3, 2, 7)
    assert_close(fn.tile_attention(q, k, v, grid3, (0, 1, 2), text, block_size=16, backend="reference"), dense)
    # and a window one short of the grid is not dense: the check above can fail
    near = fn.neighborhood_attention(q, k, v, grid, (5, 6), text=text, block_size=16, backend="reference")
    assert (near - dense).abs().max() > 1e-3


def test_low_precision_inputs():
    grid = (8, 8)
    q, k, v = inputs(64 + 5, dtype=torch.bfloat16)
    keep = with_text(brute_neighborhood(grid, 4, 4, 1, False), 5, "suffix")
    expected = masked_attention(q.float(), k.float(), v.float(), keep)
    out = fn.neighborhood_attention(q, k, v, grid, 4, 4, text=slice(64, 69), block_size=16, backend="reference")
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() < 2e-2


# ----------------------------------------------------------------------------------------------- Triton kernel

needs_triton = pytest.mark.skipif(not triton_usable(torch.device("cpu"))[0] and not torch.cuda.is_available(),
                                  reason="Triton cannot run here (no CUDA and TRITON_INTERPRET unset)")


@needs_triton
@pytest.mark.parametrize(
    "grid,ks,st,dl,ca,num_text,position",
    [
        ((16, 16), 8, 8, 1, False, 5, "prefix"),  # tile-major permutation, no element mask
        ((9, 13), (3, 5), (1, 2), 1, False, 7, "suffix"),  # row-major, partial blocks masked in-kernel
        ((4, 8, 8), (3, 4, 4), 1, (1, 2, 1), (True, False, False), 0, None),
        ((16, 16), (8, 8), (4, 4), (2, 2), False, 7, "suffix"),  # tile-major inside dilation groups
    ],
)
def test_neighborhood_triton(grid, ks, st, dl, ca, num_text, position):
    nv = math.prod(grid)
    q, k, v = inputs(nv + num_text)
    text = text_arg(nv, num_text, position)
    expected = masked_attention(q, k, v, with_text(brute_neighborhood(grid, ks, st, dl, ca), num_text, position))
    out = fn.neighborhood_attention(q, k, v, grid, ks, st, dl, ca, text=text, block_size=32, backend="triton")
    assert_close(out, expected, tol=1e-4)


@needs_triton
def test_other_patterns_triton():
    q, k, v = inputs(3 * 5 * 6 + 4)
    grid = (3, 5, 6)
    per_frame = with_text(brute_circle(grid, 2.5, per_frame=True), 4, "prefix")
    out = fn.circular_window_attention(q, k, v, grid, 2.5, slice(0, 4), per_frame=True, block_size=32, backend="triton")
    assert_close(out, masked_attention(q, k, v, per_frame), tol=1e-4)
    tiles = with_text(brute_tile(grid, (1,)), 4, "suffix")
    out = fn.tile_attention(q, k, v, grid, (1,), slice(90, 94), block_size=32, backend="triton")
    assert_close(out, masked_attention(q, k, v, tiles), tol=1e-4)
    q, k, v = inputs(16 * 16)
    windows = brute_windows((16, 16), (8, 8), (2, 2))
    out = fn.shifted_window_attention(q, k, v, (16, 16), None, (2, 2), block_size=32, backend="triton")
    assert_close(out, masked_attention(q, k, v, windows), tol=1e-4)  # window-major order
    q, k, v = inputs(9 * 7 + 3)
    windows = with_text(brute_windows((9, 7), (5, 4), (1, 2)), 3, "prefix")
    out = fn.shifted_window_attention(q, k, v, (9, 7), None, (1, 2), slice(0, 3), block_size=16, backend="triton")
    assert_close(out, masked_attention(q, k, v, windows), tol=1e-4)  # ragged windows: masked in the kernel


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kernel_size=1), "kernel_size must be > 1"),
        (dict(kernel_size=(3, 9)), "kernel_size \\* dilation must be <= the grid"),
        (dict(kernel_size=4, dilation=3), "kernel_size \\* dilation"),
        (dict(kernel_size=3, stride=4), "stride must be in \\[1, kernel_size\\]"),
        (dict(kernel_size=3, stride=0), "stride must be in"),
        (dict(kernel_size=(3, 3, 3)), "one value or one per grid dimension"),
        (dict(kernel_size=3, dilation=0), "dilation must be >= 1"),
        (dict(kernel_size=3, is_causal=1), "is_causal must hold bools"),
        (dict(kernel_size=3, backend="cuda"), "backend must be one of"),
        (dict(kernel_size=3, block_size=48), "block_size must be a power of two"),
    ],
)
def test_neighborhood_rejects_bad_arguments(kwargs, match):
    q, k, v = inputs(64)
    with pytest.raises(ConfigError, match=match):
        fn.neighborhood_attention(q, k, v, (8, 8), **kwargs)


def test_text_and_grid_errors():
    q, k, v = inputs(69)
    with pytest.raises(ConfigError, match="pass text="):
        fn.neighborhood_attention(q, k, v, (8, 8), 3)
    with pytest.raises(ConfigError, match="prefix slice\\(0, 5\\) or the suffix slice\\(64, 69\\)"):
        fn.neighborhood_attention(q, k, v, (8, 8), 3, text=slice(2, 7))
    with pytest.raises(ConfigError, match="text has 4 tokens"):
        fn.neighborhood_attention(q, k, v, (8, 8), 3, text=TextSpec(4, "prefix"))
    with pytest.raises(ConfigError, match="grid must be"):
        fn.neighborhood_attention(q, k, v, (8, 0), 3)
    with pytest.raises(ValueError, match="one token sequence"):
        fn.neighborhood_attention(q, k[:, :, :60], v, (8, 8), 3, text=slice(0, 5))
    with pytest.raises(ConfigError, match="video grid"):
        fn.tile_attention(q, k, v, (8, 8), (0,), slice(0, 5))
    with pytest.raises(ConfigError, match="frame indices in \\[0, 4\\)"):
        fn.tile_attention(q, k, v, (4, 4, 4), (4,), slice(0, 5))
    with pytest.raises(ConfigError, match="3 per-head lists but the layer has 2 heads"):
        fn.tile_attention(q, k, v, (4, 4, 4), ((0,), (1,), (2,)), slice(0, 5))
    with pytest.raises(ConfigError, match="radius must be"):
        fn.circular_window_attention(q, k, v, (8, 8), 0, slice(0, 5))
    with pytest.raises(ConfigError, match="per_frame=True needs"):
        fn.circular_window_attention(q, k, v, (8, 8), 2, slice(0, 5), per_frame=True)
    with pytest.raises(ConfigError, match="window must be in \\[1, grid size\\]"):
        fn.shifted_window_attention(q, k, v, (8, 8), (9, 4), 0, slice(0, 5))


# ----------------------------------------------------------------------------------------------- analyze


def brute_block_fractions(spec, order, block):
    """Visited and fully-kept block fractions from the element mask in a given token order (classify_blocks)."""
    n = spec.num_tokens
    permuted = CustomMask(lambda b, h, qi, ki: spec.mask_mod(b, h, order[qi], order[ki]))
    full, partial = classify_blocks(permuted, n, n, block, block)
    visited = (full | partial).sum().item()
    return visited / full.numel(), full.sum().item() / max(visited, 1)


@pytest.mark.parametrize(
    "grid,ks,st,dl,ca,block",
    [((16, 16), 5, 1, 1, False, 16), ((9, 13), (4, 5), (2, 3), (2, 1), False, 16),
     ((4, 8, 8), (3, 4, 4), (1, 2, 2), 1, (True, False, False), 32), ((40,), 7, 3, 2, False, 16),
     ((16, 16), 12, 4, 1, False, 16)],
)
def test_analyze_counts_blocks_exactly(grid, ks, st, dl, ca, block):
    result = analyze(grid, ks, st, dl, block, is_causal=ca)
    spec = NeighborhoodMask(grid, ks, st, dl, ca)
    n = spec.num_tokens
    mask = spec.mask_mod(0, 0, torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1))
    assert result.density == pytest.approx(mask.double().mean().item())
    visited, dense = brute_block_fractions(spec, torch.arange(n), block)
    assert result.row_major.visited_fraction == pytest.approx(visited)
    assert result.row_major.dense_fraction == pytest.approx(dense)
    if result.tiled is not None:
        from diffaccel.sparse.permutations import tiled_token_order

        order = tiled_token_order(spec.grid, result.tiled.tile, spec.dilation)
        visited, dense = brute_block_fractions(spec, order, block)
        assert result.tiled.visited_fraction == pytest.approx(visited)
        assert result.tiled.dense_fraction == pytest.approx(dense)


def test_analyze_reproduces_natten_published_bounds():
    """NATTEN's profiler docs (research/locality.md §1.3, §1.8): FLUX-4K and HunyuanVideo GNA configurations."""
    flux = analyze((256, 256), 80, 16, 1, 128)
    assert flux.density == pytest.approx(0.0977, abs=1e-4) and flux.flop_bound == pytest.approx(10.24)
    assert flux.tiled.fully_block_sparse and flux.tiled.speedup_bound == pytest.approx(10.24)
    assert flux.row_major.speedup_bound == pytest.approx(3.2)
    assert flux.runs.startswith("tile-major")
    sliding = analyze((256, 256), 80, 1, 1, (16, 8))
    assert sliding.tiled.speedup_bound == pytest.approx(7.51, abs=0.01)
    assert sliding.tiled.dense_fraction == pytest.approx(0.495, abs=0.001) and sliding.runs == "row-major"
    hunyuan = analyze((30, 48, 80), (18, 24, 24), (16, 8, 8), 1, (2, 8, 8))
    assert hunyuan.flop_bound == pytest.approx(11.11, abs=0.01)
    assert hunyuan.tiled.fully_block_sparse and hunyuan.tiled.speedup_bound == pytest.approx(11.11, abs=0.01)


def test_analyze_command_prints_the_bounds():
    from typer.testing import CliRunner

    from diffaccel.cli import app

    gna = ["methods", "gna", "--analyze"]
    result = CliRunner().invoke(app, gna + ["--grid", "256x256", "--kernel-size", "80", "--stride", "16x16"])
    assert result.exit_code == 0, result.output
    assert "10.24x" in result.output and "tile-major" in result.output and "3.20x" in result.output
    result = CliRunner().invoke(app, gna + ["--grid", "21x30", "--kernel-size", "1x9"])
    assert isinstance(result.exception, ConfigError) and "kernel_size must be > 1" in str(result.exception)
    result = CliRunner().invoke(app, gna + ["--grid", "21xa", "--kernel-size", "3"])
    assert isinstance(result.exception, ConfigError) and "--grid must look like" in str(result.exception)
