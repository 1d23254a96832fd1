"""The ``paro`` method on synthetic calls: density 1 is dense, per-head orders and bucket masks match an explicit
reference, masks are built once per bucket, INT8 paths are bounded and unbiased, fp16 at its range edges stays
finite, and the calibrator picks the axis a head aggregates along."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.kernels import SparseBlockMask, TextSpec
from diffaccel.layout import TokenLayout
from diffaccel.methods import paro as paro_module
from diffaccel.methods import paro_calibration
from diffaccel.methods.base import get_method, method_parameters
from diffaccel.methods.paro import ParoMethod
from diffaccel.methods.paro_calibration import ParoCalibrator, order_metrics
from diffaccel.methods.paro_plan import bucket_of
from diffaccel.sparse.axis_orders import AXIS_ORDERS, head_token_order, visual_axis_order
from paro_helpers import make_plan

LAYER = "transformer_blocks.0.attn"


def _layout(grid, nt, first):
    nv = math.prod(grid)
    text = None if not nt else slice(0, nt) if first else slice(nv, nv + nt)
    return TokenLayout(nv + nt, grid, text=text)


def _ctx(step=0, steps=4, layer=LAYER):
    return RunContext(grid=None, step=step, num_steps=steps, layer=layer, denoiser_calls=step + 1)


def _inputs(n, heads=2, batch=1, dim=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, dim, generator=g).to(dtype) for _ in range(3))


def _manual(q, k, v, keep, order, block):
    """Explicit PARO: gather each head into its order, block mask expanded to elements, softmax, scatter back."""
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    for h in range(H):
        o = order[h]
        el = keep[h].repeat_interleave(block, 0).repeat_interleave(block, 1)[:N, :N]
        s = (q[:, h, o] @ k[:, h, o].transpose(-1, -2)) * D ** -0.5
        out[:, h, o] = torch.softmax(s.masked_fill(~el, float("-inf")), -1) @ v[:, h, o]
    return out


CASES = [((3, 3, 5), 6, True), ((5, 7), 6, False), ((2, 3, 5), 0, True)]


@pytest.mark.parametrize("grid,nt,first", CASES, ids=["3d-prefix", "2d-suffix", "3d-no-text"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_density_one_equals_dense(grid, nt, first, backend):
    n = math.prod(grid) + nt
    nb = -(-n // 16)
    plan = make_plan(grid=grid, text_len=nt, text_first=first, keep=torch.ones(3, 1, 2, nb, nb, dtype=torch.bool),
                     density=1.0)
    q, k, v = _inputs(n)
    out = ParoMethod(plan=plan, backend=backend)(q, k, v, _layout(grid, nt, first), _ctx())
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("grid,nt,first", CASES[:2], ids=["3d-prefix", "2d-suffix"])
def test_method_equals_the_explicit_reference_with_per_head_orders_and_bucket_masks(grid, nt, first):
    n = math.prod(grid) + nt
    plan = make_plan(grid=grid, text_len=nt, text_first=first, orders=[[2, 1]] if len(grid) == 2 else [[2, 5]],
                     density=0.4, seed=4) if len(grid) == 3 else make_plan(
        grid=grid, text_len=nt, text_first=first, orders=[[1, 0]], density=0.4, seed=4)
    q, k, v = _inputs(n, seed=1)
    method = ParoMethod(plan=plan, backend="reference")
    layout = _layout(grid, nt, first)
    order = head_token_order(grid, plan.orders[0].tolist(), TextSpec(nt, "prefix" if first else "suffix"))
    assert method.kept_blocks(LAYER) is None
    outs = []
    for step in range(4):
        out = method(q, k, v, layout, _ctx(step))
        bucket = bucket_of(step, 4, 3)
        keep = plan.keep(bucket, 0)
        assert torch.equal(method.kept_blocks(LAYER), keep)
        assert (out - _manual(q, k, v, keep, order, 16)).abs().max().item() <= 1e-5
        outs.append(out)
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # buckets 0 and 1 hold different masks
    assert torch.equal(outs[2], outs[3])  # the second half shares one mask


def test_triton_kernel_runs_the_plan_like_the_reference():
    grid, nt = (3, 3, 5), 6
    plan = make_plan(grid=grid, text_len=nt, density=0.4, seed=2)
    q, k, v = _inputs(51, seed=2)
    layout = _layout(grid, nt, True)
    ref = ParoMethod(plan=plan, backend="reference")(q, k, v, layout, _ctx(1))
    tri = ParoMethod(plan=plan, backend="triton")(q, k, v, layout, _ctx(1))
    assert (ref - tri).abs().max().item() <= 1e-5


def test_masks_are_uploaded_once_and_built_once_per_bucket(monkeypatch):
    grid, nt = (3, 3, 5), 6
    plan = make_plan(grid=grid, text_len=nt)
    method = ParoMethod(plan=plan, backend="reference")
    built, states = [], []
    original_from_keep = SparseBlockMask.from_block_keep.__func__
    original_state = ParoMethod._state

    def counting_from_keep(cls, *args, **kwargs):
        built.append(1)
        return original_from_keep(cls, *args, **kwargs)

    def counting_state(self, *args, **kwargs):
        before = len(self._states)
        state = original_state(self, *args, **kwargs)
        states.append(len(self._states) - before)
        return state

    monkeypatch.setattr(SparseBlockMask, "from_block_keep", classmethod(counting_from_keep))
    monkeypatch.setattr(ParoMethod, "_state", counting_state)
    q, k, v = _inputs(51)
    layout = _layout(grid, nt, True)
    for step in (0, 0, 0, 1, 1, 2, 2, 3, 3, 3):
        method(q, k, v, layout, _ctx(step))
    assert sum(states) == 1  # one upload of the layer's packed masks and order
    assert len(built) == 3  # one block mask per bucket change (buckets 0, 1, 2), none per call


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# bounds: 3x the relative L2 errors measured on these inputs (qk 1.1e-3, pv 2.6-3.1e-3, both 2.7-3.1e-3)
@pytest.mark.parametrize("flags,bound", [({"qk_int8": True}, 3.5e-3), ({"pv_int8": True}, 9.5e-3),
                                         ({"qk_int8": True, "pv_int8": True}, 9.5e-3)],
                         ids=["qk", "pv", "qk+pv"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_int8_paths_bounded_and_unbiased(flags, bound, backend):
    grid, nt = (3, 4, 5), 4
    n = 64
    plan = make_plan(grid=grid, text_len=nt, density=0.5, seed=5)
    q, k, v = _inputs(n, heads=2, batch=1, dim=16, seed=6)
    v = v + 2.0  # a mean far from zero, so the mean ratio measures bias, not noise around zero
    layout = _layout(grid, nt, True)
    exact = ParoMethod(plan=plan, backend="reference")(q, k, v, layout, _ctx(1))
    quant = ParoMethod(plan=plan, backend=backend, **flags)(q, k, v, layout, _ctx(1))
    assert torch.isfinite(quant).all()
    err = _rel(quant, exact)
    assert 1e-5 < err <= bound, err  # quantization happened, within the measured bound
    ratio = (quant.double().mean() / exact.double().mean()).item()
    assert abs(ratio - 1.0) <= 2e-3, ratio


@pytest.mark.parametrize("flags", [{}, {"qk_int8": True, "pv_int8": True}], ids=["fp16", "int8"])
def test_fp16_at_the_range_edges_stays_finite(flags):
    grid, nt = (3, 3, 5), 6
    plan = make_plan(grid=grid, text_len=nt, density=0.5, seed=7)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 2, 51, 16, generator=g) * 8  # logits up to ~10^3: exp would overflow without the max shift
    k = torch.randn(1, 2, 51, 16, generator=g) * 8
    v = torch.empty(1, 2, 51, 16).uniform_(-1, 1, generator=g).sign() * 65000.0  # at fp16's largest finite values
    layout = _layout(grid, nt, True)
    exact = ParoMethod(plan=plan, backend="reference")(q, k, v, layout, _ctx(0))
    half = ParoMethod(plan=plan, backend="triton", **flags)(q.half(), k.half(), v.half(), layout, _ctx(0))
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert _rel(half.float(), exact) <= (5e-2 if flags else 2e-3)


def _aggregating_heads(grid, axes, dim=32, sharpness=24.0, seed=0):
    """q = k per head: one random unit vector per line along the head's axis (tokens that differ only in that
    coordinate share it), so each head attends along exactly one grid axis."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in grid], indexing="ij"), -1).reshape(-1, len(grid))
    heads = []
    for axis in axes:
        others = [a for a in range(len(grid)) if a != axis]
        line = torch.zeros(coords.shape[0], dtype=torch.long)
        for a in others:
            line = line * grid[a] + coords[:, a]
        table = F.normalize(torch.randn(int(line.max()) + 1, dim, generator=g), dim=-1)
        heads.append(table[line] * math.sqrt(sharpness * math.sqrt(dim)))
    x = torch.stack(heads).unsqueeze(0)
    return x, x.clone(), torch.randn(x.shape, generator=g)


@pytest.mark.parametrize("grid,axes", [((4, 8, 8), (0, 1, 2)), ((8, 8), (0, 1))], ids=["video", "image"])
def test_calibration_picks_the_axis_each_head_aggregates_along(grid, axes):
    q, k, v = _aggregating_heads(grid, axes)
    nv = math.prod(grid)
    layout = _layout(grid, 0, True)
    cal = ParoCalibrator(backend="reference", block_size=16, num_steps=2, search_steps=1)
    for step in range(2):
        out = cal(q, k, v, layout, RunContext(step=step, num_steps=2, layer=LAYER, denoiser_calls=step + 1))
        assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max().item() <= 1e-5  # dense: exact
    plan = cal.build_plan(model="synthetic", config_hash="x", package_version="t", prompts=1)
    orders = AXIS_ORDERS[len(grid)]
    innermost = [orders[int(o)][-1] for o in plan.orders[0]]
    assert innermost == list(axes)
    assert plan.kept_density.shape == (1, len(axes)) and nv == plan.num_tokens


def test_calibration_options_reach_the_measurement(monkeypatch):
    grid = (2, 4, 4)
    q, k, v = _aggregating_heads(grid, (2,))
    layout = _layout(grid, 0, True)
    seen = []
    real = paro_calibration.select_orders
    monkeypatch.setattr(paro_calibration, "select_orders", lambda s, qn, alpha: seen.append(alpha) or real(s, qn, alpha))
    for search_steps, alpha, buckets in ((1, 0.25, 2), (3, 0.75, 1)):
        cal = ParoCalibrator(backend="reference", block_size=16, num_steps=4, search_steps=search_steps, alpha=alpha,
                             num_buckets=buckets, density=0.3)
        for step in range(4):
            cal(q, k, v, layout, RunContext(step=step, num_steps=4, layer=LAYER, denoiser_calls=step + 1))
        assert cal.stats[LAYER].searches == search_steps
        plan = cal.build_plan(model="m", config_hash="h", package_version="t", prompts=1)
        assert plan.num_buckets == buckets and plan.alpha == alpha and plan.density == 0.3
        assert seen[-1] == alpha
    # sample_blocks: more sampled query blocks measure more rows (different statistics, same shapes)
    q, k, _ = _inputs(32, heads=1, dim=32, seed=9)
    scale = 32 ** -0.5
    lse = torch.logsumexp((q @ k.transpose(-1, -2)) * scale, -1)
    vis = visual_axis_order(grid, 0)
    one = order_metrics(q, k, lse, vis, 16, 1, scale)
    four = order_metrics(q, k, lse, vis, 16, 4, scale)
    assert one[0].shape == four[0].shape == (1,)
    assert not torch.allclose(one[1], four[1])


def test_errors_say_what_to_do():
    grid, nt = (3, 3, 5), 6
    q, k, v = _inputs(51)
    layout = _layout(grid, nt, True)
    with pytest.raises(ConfigError, match="paro needs a calibrated plan"):
        get_method("paro")(q, k, v, layout, _ctx())
    unet = TokenLayout(45, grid, hierarchical=True)
    with pytest.raises(ConfigError, match="UNet"):
        ParoMethod(plan=make_plan(grid=grid))(*_inputs(45), unet, _ctx())
    with pytest.raises(ConfigError, match="grid 5x3x3"):
        ParoMethod(plan=make_plan(grid=grid))(q, k, v, _layout((5, 3, 3), nt, True), _ctx())
    with pytest.raises(ConfigError, match="does not exist"):
        get_method("paro", plan="/nonexistent/plan.safetensors")
    with pytest.raises(ConfigError, match="alpha"):
        get_method("paro", alpha=1.5)
    names = [row[0] for row in method_parameters("paro")]
    assert names[:3] == ["plan", "density", "block_size"] and all(row[3] for row in method_parameters("paro"))
    # cross-attention stays dense (MethodBase)
    cross = TokenLayout(45, grid, is_cross=True, num_keys=7)
    kx, vx = torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    qx = torch.randn(1, 2, 45, 16)
    out = get_method("paro")(qx, kx, vx, cross, _ctx())
    assert torch.allclose(out, F.scaled_dot_product_attention(qx, kx, vx))
    assert paro_module.ParoMethod.overhead(get_method("paro")) is None


def test_padded_suffix_prompt_runs_the_plan_cut_to_the_valid_tokens():
    """HunyuanVideo-style: text suffix, row 0 has all 6 text tokens valid, row 1 only 2 (key-padding mask)."""
    grid, nt = (3, 4, 5), 6  # the cut rows keep 62 tokens: 3 of its 4 blocks hold no text, so masks differ by bucket
    nv = math.prod(grid)
    n = nv + nt
    plan = make_plan(grid=grid, text_len=nt, text_first=False, density=0.4, seed=11)
    q, k, v = _inputs(n, batch=2, seed=12)
    lengths = (6, 2)
    mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
    mask[1, ..., nv + 2:] = False
    layout = TokenLayout(n, grid, text=slice(nv, n), text_lengths=lengths)
    method = ParoMethod(plan=plan, backend="reference")
    order = head_token_order(grid, plan.orders[0].tolist(), TextSpec(nt, "suffix"))
    for step in range(4):
        out = method(q, k, v, layout, _ctx(step), attn_mask=mask)
        keep = plan.keep(bucket_of(step, 4, 3), 0)
        full = _manual(q[:1], k[:1], v[:1], keep, order, 16)
        cut = nv + 2
        nb = -(-cut // 16)
        short = _manual(q[1:, :, :cut], k[1:, :, :cut], v[1:, :, :cut], keep[:, :nb, :nb], order[:, :cut], 16)
        pad_rows = F.scaled_dot_product_attention(q[1:, :, cut:], k[1:, :, :cut], v[1:, :, :cut])
        assert (out[:1] - full).abs().max().item() <= 1e-5
        assert (out[1:, :, :cut] - short).abs().max().item() <= 1e-5
        assert (out[1:, :, cut:] - pad_rows).abs().max().item() <= 1e-5


def test_a_masked_prefix_call_runs_dense_says_so_once_and_counts_as_a_fallback(recwarn):
    """A text mask PARO's plan cannot take (padding of a prefix prompt) runs stock SDPA with that mask, warns once,
    and is counted as a dense fallback (so `diffaccel generate` reports "fell back to dense", not a result)."""
    from diffaccel.warn import reset_warnings

    reset_warnings()
    grid, nt = (3, 3, 5), 6
    n = math.prod(grid) + nt
    plan = make_plan(grid=grid, text_len=nt, text_first=True, density=0.4, seed=2)
    q, k, v = _inputs(n, seed=5)
    lengths = (4,)
    layout = TokenLayout(n, grid, text=slice(0, nt), text_lengths=lengths)
    mask = torch.ones(1, 1, 1, n, dtype=torch.bool)
    mask[..., lengths[0]:nt] = False
    method = ParoMethod(plan=plan, backend="reference")
    for _ in range(2):
        out = method(q, k, v, layout, _ctx(), attn_mask=mask)
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert sum("paro runs dense attention" in str(w.message) for w in recwarn.list) == 1
    assert (method.call_counts.dense, method.call_counts.method) == (2, 0)
