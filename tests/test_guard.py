"""The quality guard (issue 11, item 7): a layer whose sampled error breaks the budget falls back to dense."""

from __future__ import annotations

import math

import pytest
import torch

import diffaccel
from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import get_method, sdpa
from diffaccel.methods.guard import QualityGuard

GRID = (16, 16)


def local_qkv(a: float = 3.0, heads: int = 2, seed: int = 0):
    """q . k = -a |p_i - p_j|^2 + (per-query constant): attention concentrated on each token's neighbours."""
    ys, xs = torch.meshgrid(torch.arange(GRID[0]), torch.arange(GRID[1]), indexing="ij")
    p = torch.stack([ys.flatten(), xs.flatten()], dim=-1).float()
    q = torch.zeros(p.shape[0], 16)
    k = torch.zeros(p.shape[0], 16)
    q[:, :2], q[:, 2] = 2 * a * p, -a
    k[:, :2], k[:, 2] = p, (p ** 2).sum(-1)
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, heads, p.shape[0], 16, generator=g)
    return q.expand(1, heads, -1, -1).contiguous(), k.expand(1, heads, -1, -1).contiguous(), v


def diffuse_qkv(heads: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(GRID)
    return [0.01 * torch.randn(1, heads, n, 16, generator=g) if i < 2 else torch.randn(1, heads, n, 16, generator=g)
            for i in range(3)]


def gna():
    return get_method("gna", kernel_size=3, block_size=16, backend="reference")


def run(guard, qkv, layer, scale=None):
    layout = TokenLayout(math.prod(GRID), GRID)
    return guard(*qkv, layout, RunContext(grid=GRID, layer=layer), scale=scale)


def test_diffuse_layer_falls_back_and_local_layer_keeps_the_method():
    guard = QualityGuard(gna(), 0.05)
    local, diffuse = local_qkv(), diffuse_qkv()
    out_local = run(guard, local, "local", scale=1.0)
    out_diffuse = run(guard, diffuse, "diffuse")
    report = guard.report()
    assert report.fell_back == ["diffuse"]
    assert report.layers["local"].error < 0.05 < report.layers["diffuse"].error
    # the local layer keeps the sparse output (not dense), the diffuse one gets exact dense attention
    assert not torch.allclose(out_local, sdpa(*local, scale=1.0), atol=1e-7)
    torch.testing.assert_close(out_local, gna()(*local, TokenLayout(256, GRID), RunContext(grid=GRID, layer="x"),
                                                 scale=1.0))
    torch.testing.assert_close(out_diffuse, sdpa(*diffuse))
    # later calls: the verdict holds for the rest of the run, without measuring again
    again = run(guard, diffuse_qkv(seed=5), "diffuse")
    torch.testing.assert_close(again, sdpa(*diffuse_qkv(seed=5)))
    assert guard.call_counts.method == 1 and guard.call_counts.dense == 2
    assert 0 < report.layers["local"].density < 1 and report.kept_density == pytest.approx(
        (report.layers["local"].density + 1.0) / 2)
    assert report.sample_seconds > 0 and "1 of 2 layers fell back to dense (diffuse)" in report.summary()
    guard.reset()
    assert guard.report().layers == {}


def test_the_sampled_error_estimates_the_full_error():
    guard = QualityGuard(gna(), 0.05, sample_rows=64)
    q, k, v = diffuse_qkv(seed=2)
    layout = TokenLayout(256, GRID)
    out = gna()(q, k, v, layout, RunContext(grid=GRID, layer="x"))
    ref = sdpa(q, k, v)
    full = float((out - ref).abs().sum() / ref.abs().sum())
    assert guard.sampled_error(q, k, v, out) == pytest.approx(full, rel=0.2)
    assert QualityGuard(gna(), 0.05, sample_rows=10_000).sampled_error(q, k, v, out) == pytest.approx(full, rel=1e-5)


def test_a_nan_output_falls_back():
    class Broken:
        config = None

        def __call__(self, q, k, v, layout, ctx, *, attn_mask=None, scale=None):
            return torch.full_like(q, float("nan"))

    guard = QualityGuard(Broken(), 0.5)
    out = run(guard, local_qkv(), "l", scale=1.0)
    assert torch.isfinite(out).all() and guard.report().fell_back == ["l"]


def test_dense_steps_are_not_measured():
    guard = QualityGuard(get_method("gna", kernel_size=3, block_size=16, backend="reference", dense_steps=1), 0.05)
    layout = TokenLayout(256, GRID)
    guard(*diffuse_qkv(), layout, RunContext(grid=GRID, layer="l", step=0))
    assert guard.report().layers == {}
    guard(*diffuse_qkv(), layout, RunContext(grid=GRID, layer="l", step=1))
    assert guard.report().fell_back == ["l"]


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, float("nan"), float("inf"), "0.05", True])
def test_invalid_budget_is_one_clear_error(bad):
    with pytest.raises(ConfigError, match="guard must be a relative L1 error budget > 0"):
        QualityGuard(gna(), bad)
    from tests.test_compile import tiny_denoiser

    model = tiny_denoiser("wan", num_layers=1)
    with pytest.raises(ConfigError, match="guard must be"):
        diffaccel.apply(model, "gna", guard=bad)
    assert "_diffaccel_installation" not in model.__dict__  # nothing changed


def test_apply_with_guard_on_a_tiny_model_reports_every_self_attention_layer():
    from tests.test_compile import denoiser_inputs, tiny_denoiser

    model = tiny_denoiser("wan")
    processor = diffaccel.apply(model, "gna", kernel_size=3, block_size=16, backend="reference", guard=1e-9)
    assert isinstance(processor.method, QualityGuard)
    with torch.no_grad():
        out = model(**denoiser_inputs("wan"))[0]
    diffaccel.apply(model, "dense")
    with torch.no_grad():
        dense = model(**denoiser_inputs("wan"))[0]
    report = processor.method.report()
    assert sorted(report.layers) == ["blocks.0.attn1", "blocks.1.attn1"]
    assert report.fell_back == ["blocks.0.attn1", "blocks.1.attn1"]  # a budget no sparse output meets
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="SoftPAG"):
        diffaccel.apply(model, "softpag", layers=["blocks.0.attn1"], guard=0.05)
