"""diffaccel.sparse: plans (token order + block mask in kernel order, spec in sequence coordinates) against a dense
reference of the same spec, the no-extra-pass property of ordered plans, CLEAR's per-frame plan, the per-layer plan
cache of the methods (one lookup, no rebuild, no host sync, no state carried to another run).

The reference is a float64 masked softmax over the spec's own ``mask_mod`` evaluated on the whole sequence (the
kernel-independent definition); element masks of the kernel are checked against it through every layout.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import diffaccel.sparse.plans as plans_module
import diffaccel.sparse.run as run_module
from diffaccel.context import RunContext
from diffaccel.kernels import (
    CircleMask,
    NeighborhoodMask,
    ShiftedWindowMask,
    TextSpec,
    TileMask,
    materialize_mask,
)
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import get_method, sdpa
from diffaccel.sparse import merge_by_lse
from diffaccel.sparse.per_frame import per_frame_circle_mask_mod, per_frame_plan
from diffaccel.sparse.permutations import full_order
from diffaccel.sparse.plans import AttentionPlan, classify_in_order, plan_for
from diffaccel.sparse.run import run_plan

BACKENDS = ["reference", "triton"]


def dense_mask(mask_mod, n: int, heads: int = 1) -> torch.Tensor:
    idx = torch.arange(n)
    h = torch.arange(heads).view(-1, 1, 1)
    return mask_mod(torch.zeros((), dtype=torch.long), h, idx.view(1, -1, 1), idx.view(1, 1, -1)).expand(heads, n, n)


def reference(q, k, v, keep, scale=None):
    """float64 masked softmax; rows without a kept key give zeros (as the kernel does)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v.double()).to(q.dtype)


def qkv(n, heads=2, dim=16, batch=2):
    return tuple(torch.randn(batch, heads, n, dim) for _ in range(3))


def assert_close(out, expected, tol=2e-5):
    assert torch.isfinite(out).all()
    err = (out.double() - expected.double()).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol}"


SPECS = [
    # tile-major: text suffix (kept in place), prefix multiple of the block (in place), prefix not (after visual)
    pytest.param(NeighborhoodMask((16, 16), 8, 8, text=TextSpec(5, "suffix")), "tile-major", id="gna-blocked-suffix"),
    pytest.param(NeighborhoodMask((16, 16), 12, 4, text=TextSpec(16, "prefix")), "tile-major", id="gna-prefix-aligned"),
    pytest.param(NeighborhoodMask((16, 16), 8, 4, 2, text=TextSpec(7, "prefix")), "tile-major", id="gna-dilated-prefix"),
    pytest.param(NeighborhoodMask((4, 8, 8), (2, 8, 4), (2, 8, 4)), "tile-major", id="gna-3d"),
    # row-major: partial blocks masked in the kernel from sequence coordinates; odd and prime grids
    pytest.param(NeighborhoodMask((7, 11), (3, 5), (1, 2), text=TextSpec(5, "prefix")), "row-major", id="gna-prime"),
    pytest.param(NeighborhoodMask((5, 9), 3, 1, 1, (True, False)), "row-major", id="gna-causal-odd"),
    pytest.param(CircleMask((7, 13), 2.5, text=TextSpec(3, "suffix")), "row-major", id="circle-prime"),
    pytest.param(TileMask((3, 5, 7), (1,), text=TextSpec(4, "prefix")), "row-major", id="tile-odd"),
    # window-major: the order makes windows contiguous; windows of 12 tokens leave partial blocks, evaluated on
    # sequence positions through the order
    pytest.param(ShiftedWindowMask((8, 8), (4, 4), (1, 2), text=TextSpec(3, "prefix")), "window-major", id="msw-aligned"),
    pytest.param(ShiftedWindowMask((6, 8), (3, 4), (1, 1), text=TextSpec(5, "suffix")), "window-major", id="msw-partial"),
]


@pytest.mark.parametrize("spec,layout", SPECS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_plans_equal_the_dense_reference_of_their_spec(spec, layout, backend):
    plan = plan_for(spec, 16, "cpu")
    assert plan.layout.startswith(layout) and plan.spec == spec  # cached per equal spec
    n = spec.num_tokens
    q, k, v = qkv(n)
    expected = reference(q, k, v, dense_mask(spec.mask_mod, n))
    assert_close(run_plan(q, k, v, plan, scale=None, backend=backend), expected)
    # the block mask is in kernel order: materialized at the plan's order it is exactly the spec
    keep = materialize_mask(plan.block_mask, None, plan.order)
    order = torch.arange(n) if plan.order is None else plan.order
    assert torch.equal(keep[0, 0], dense_mask(spec.mask_mod, n)[0][order][:, order])
    assert (expected - sdpa(q, k, v)).abs().max() > 1e-3  # the spec is not dense: the comparison can fail


def test_ordered_plans_keep_text_in_place_where_the_tiles_stay_aligned():
    suffix = plan_for(NeighborhoodMask((16, 16), 8, 8, text=TextSpec(5, "suffix")), 16, "cpu")
    assert torch.equal(suffix.order[-5:], torch.arange(256, 261))  # a suffix stays last
    aligned = plan_for(NeighborhoodMask((16, 16), 8, 8, text=TextSpec(32, "prefix")), 16, "cpu")
    assert torch.equal(aligned.order[:32], torch.arange(32))  # a block-aligned prefix stays first
    assert aligned.block_mask.block_keep()[0][0, 0, :2].all() and aligned.block_mask.block_keep()[0][0, 0, :, :2].all()
    unaligned = plan_for(NeighborhoodMask((16, 16), 8, 8, text=TextSpec(5, "prefix")), 16, "cpu")
    assert torch.equal(unaligned.order[-5:], torch.arange(5))  # else after the visual tokens, in kernel order
    order, start = full_order(torch.arange(4), TextSpec(16, "prefix"), 4, 16)
    assert start == 16 and torch.equal(order, torch.arange(20))


def test_an_identity_order_is_the_contiguous_fast_path():
    plan = plan_for(NeighborhoodMask((16, 16), 5), 16, "cpu")
    assert plan.layout == "row-major" and plan.order is None and plan.block_mask.num_partial > 0
    # a 1-D grid whose tiles are already contiguous: the tile-major order is the identity
    plan = plan_for(NeighborhoodMask((64,), 16, 16), 16, "cpu")
    assert plan.layout.startswith("tile-major") and plan.order is None


def test_classify_in_order_matches_classify_of_the_permuted_mask():
    spec = CircleMask((6, 7), 2.0, text=TextSpec(3, "suffix"))
    n = spec.num_tokens
    order = torch.randperm(n)
    full, partial = classify_in_order(spec, order, 16)
    m = dense_mask(spec.mask_mod, n)[0][order][:, order]
    nb = -(-n // 16)
    pad = torch.zeros(nb * 16, nb * 16, dtype=torch.long)
    valid = torch.zeros_like(pad)
    pad[:n, :n], valid[:n, :n] = m.long(), 1
    kept = pad.view(nb, 16, nb, 16).sum((1, 3))
    size = valid.view(nb, 16, nb, 16).sum((1, 3))
    assert torch.equal(full[0], kept == size) and torch.equal(partial[0], (kept > 0) & (kept < size))


# ----------------------------------------------------------------------------------------------- per-frame CLEAR


@pytest.mark.parametrize(
    "grid,text,layout",
    [
        ((3, 4, 8), TextSpec(5, "suffix"), "per-frame"),  # 32 tokens per frame: frames block-aligned, one launch
        ((2, 4, 8), TextSpec(6, "prefix"), "per-frame"),  # prefix of 6: text runs after the video in kernel order
        ((2, 4, 8), TextSpec(16, "prefix"), "per-frame"),  # block-aligned prefix: text stays first
        ((3, 3, 5), TextSpec(4, "prefix"), "per-frame folded"),  # 15 tokens per frame: frames folded into batch
        ((3, 3, 5), None, "per-frame folded"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_frame_plan_equals_the_per_frame_definition(grid, text, layout, backend):
    plan = per_frame_plan(grid, 2.0, text, 16, "cpu")
    assert plan.layout == layout
    n = math.prod(grid) + (0 if text is None else text.length)
    q, k, v = qkv(n)
    expected = reference(q, k, v, dense_mask(per_frame_circle_mask_mod(grid, 2.0, text), n))
    assert_close(run_plan(q, k, v, plan, scale=None, backend=backend), expected)
    ball = reference(q, k, v, dense_mask(CircleMask(grid, 2.0, text=text).mask_mod, n))
    assert (expected - ball).abs().max() > 1e-3  # not the 3-D ball: the comparison can fail


def test_per_frame_on_aligned_frames_is_one_kernel_launch(monkeypatch):
    calls = []
    real = run_module.block_sparse_attention_unchecked

    def spy(*args, **kwargs):
        calls.append(kwargs.get("token_order"))
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "block_sparse_attention_unchecked", spy)
    grid, text = (2, 4, 8), TextSpec(6, "prefix")
    q, k, v = qkv(70)
    run_plan(q, k, v, per_frame_plan(grid, 2.0, text, 16, "cpu"), scale=None, backend="reference")
    assert len(calls) == 1 and calls[0] is not None


def test_merge_by_lse_is_the_union_softmax():
    q, k, v = qkv(10)
    keys_a, keys_b = slice(0, 6), slice(6, 10)

    def part(sl):
        s = (q.double() @ k[:, :, sl].double().transpose(-1, -2)) * 0.25
        return (torch.softmax(s, -1) @ v[:, :, sl].double()).float(), torch.logsumexp(s, -1).float()

    merged = merge_by_lse([part(keys_a), part(keys_b)], torch.float32)
    assert_close(merged, reference(q, k, v, torch.ones(10, 10, dtype=torch.bool), 0.25), 1e-5)
    empty = (torch.zeros_like(q), torch.full(q.shape[:3], float("-inf")))
    assert_close(merge_by_lse([part(keys_a), empty], torch.float32), part(keys_a)[0], 1e-6)


# ----------------------------------------------------------------------------------------------- methods: hot path


def _layout(grid, nt=5, **fields):
    n = math.prod(grid) + nt
    return TokenLayout(num_tokens=n, grid=grid, text=slice(math.prod(grid), n) if nt else None, **fields)


class Counter:
    def __init__(self):
        self.outside = 0
        self.inside = 0
        self.depth = 0


@pytest.fixture
def pass_counter(monkeypatch):
    """Counts index_select / gather calls outside and inside the kernel entry."""
    counter = Counter()
    real_entry = run_module.block_sparse_attention_unchecked

    def entry(*args, **kwargs):
        counter.depth += 1
        try:
            return real_entry(*args, **kwargs)
        finally:
            counter.depth -= 1

    def counting(real):
        def wrapper(*args, **kwargs):
            if counter.depth:
                counter.inside += 1
            else:
                counter.outside += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(run_module, "block_sparse_attention_unchecked", entry)
    monkeypatch.setattr(torch.Tensor, "index_select", counting(torch.Tensor.index_select))
    monkeypatch.setattr(torch, "index_select", counting(torch.index_select))
    monkeypatch.setattr(torch.Tensor, "gather", counting(torch.Tensor.gather))
    monkeypatch.setattr(torch, "gather", counting(torch.gather))
    return counter


@pytest.mark.parametrize(
    "name,config,grid,layout",
    [
        ("gna", dict(kernel_size=8, stride=8), (16, 16), "tile-major"),
        ("msw", dict(window=(4, 4), shift_policy="cyclic"), (8, 8), "window-major"),
    ],
)
def test_ordered_plans_run_without_extra_passes(pass_counter, name, config, grid, layout):
    """A tile-/window-major method call makes no index_select or gather outside the kernel entry: the order is the
    kernel's ``token_order``, not a gather of q, k, v and a scatter of the output."""
    method = get_method(name, block_size=16, backend="reference", **config)
    lay = _layout(grid)
    ctx = RunContext(grid=grid, layer="blocks.0.attn", step=1)
    plan = method.plan(lay, ctx, heads=2, device="cpu")
    assert plan.layout.startswith(layout) and plan.order is not None
    q, k, v = qkv(lay.num_tokens)
    out = method(q, k, v, lay, ctx)
    assert pass_counter.outside == 0
    assert pass_counter.inside > 0  # the counter sees calls (the reference kernel path gathers)
    assert_close(out, reference(q, k, v, dense_mask(plan.spec.mask_mod, lay.num_tokens)))


@pytest.mark.parametrize("name,config", [("gna", dict(kernel_size=3)), ("msw", {}), ("clear", dict(radius=2)),
                                         ("tile", {})])
def test_steady_state_is_one_cached_plan_no_rebuild_no_host_sync(monkeypatch, name, config):
    grid = (2, 4, 4) if name == "tile" else (8, 8)
    method = get_method(name, block_size=16, backend="reference", **config)
    lay = _layout(grid)
    ctx = RunContext(grid=grid, layer="blocks.0.attn", step=0)
    q, k, v = qkv(lay.num_tokens)
    builds = []
    real_build = type(method).build_plan

    def counting_build(self, *args, **kwargs):
        builds.append(args[0].grid)
        return real_build(self, *args, **kwargs)

    monkeypatch.setattr(type(method), "build_plan", counting_build)
    first = method(q, k, v, lay, ctx)
    assert len(builds) == 1
    syncs = []
    for what in ("item", "tolist", "cpu"):
        real = getattr(torch.Tensor, what)
        monkeypatch.setattr(torch.Tensor, what, lambda self, *a, _r=real, _w=what, **kw: syncs.append(_w) or _r(self, *a, **kw))
    monkeypatch.setattr(plans_module, "plan_for", lambda *a, **kw: pytest.fail("a plan was rebuilt"))
    monkeypatch.setattr(run_module, "plan_for", lambda *a, **kw: pytest.fail("a plan was rebuilt"))
    for _ in range(3):
        again = method(q, k, v, lay, ctx)
    monkeypatch.undo()
    assert len(builds) == 1 and syncs == []
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_padded_prompt_groups_rows_by_text_length_without_host_sync(monkeypatch):
    grid, nt = (4, 4), 6
    lengths = (6, 2, 2)
    lay = _layout(grid, nt, text_lengths=lengths)
    n = lay.num_tokens
    keep = torch.ones(3, 1, 1, n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        keep[b, 0, 0, 16 + length:] = False
    method = get_method("gna", kernel_size=3, block_size=16, backend="reference")
    q, k, v = qkv(n, batch=3)
    ctx = RunContext(grid=grid, layer="a")
    method(q, k, v, lay, ctx, attn_mask=keep)
    syncs = []
    for what in ("item", "tolist", "cpu", "nonzero"):
        real = getattr(torch.Tensor, what)
        monkeypatch.setattr(torch.Tensor, what, lambda self, *a, _r=real, _w=what, **kw: syncs.append(_w) or _r(self, *a, **kw))
    out = method(q, k, v, lay, ctx, attn_mask=keep)
    monkeypatch.undo()
    assert syncs == []
    spec = NeighborhoodMask(grid, 3)
    vis = dense_mask(spec.mask_mod, 16)[0]
    full = torch.ones(n, n, dtype=torch.bool)
    full[:16, :16] = vis
    expected = reference(q, k, v, full & keep[:, :, 0:1, :].expand(3, 1, n, n))
    assert_close(out, expected)


def test_a_second_run_with_other_steps_carries_no_state():
    """Plans are keyed by what they depend on (the shift index), not the step: a second run with a different number of
    steps gives what a fresh method gives."""
    grid = (8, 8)
    lay = _layout(grid)
    q, k, v = qkv(lay.num_tokens)
    used = get_method("msw", shift_policy="no_repeat", block_size=16, backend="reference")
    for step in range(5):
        used(q, k, v, lay, RunContext(grid=grid, layer="x", step=step, num_steps=5))
    fresh = get_method("msw", shift_policy="no_repeat", block_size=16, backend="reference")
    for step in range(3):
        ctx = RunContext(grid=grid, layer="x", step=step, num_steps=3)
        torch.testing.assert_close(used(q, k, v, lay, ctx), fresh(q, k, v, lay, ctx), rtol=0, atol=0)
    agent_used = get_method("agent", mode="agentsd", use_rand=False)
    unet = TokenLayout(64, grid, hierarchical=True)
    qa, ka, va = qkv(64)
    for step in range(10):
        agent_used(qa, ka, va, unet, RunContext(grid=grid, step=step, num_steps=10))
    agent_fresh = get_method("agent", mode="agentsd", use_rand=False)
    for step in range(4):  # 0.4 of 4 steps: agent attention at steps 0 and 1 only, in both
        ctx = RunContext(grid=grid, step=step, num_steps=4)
        torch.testing.assert_close(agent_used(qa, ka, va, unet, ctx), agent_fresh(qa, ka, va, unet, ctx), rtol=0,
                                   atol=0)


def test_plan_is_none_where_the_method_runs_dense():
    method = get_method("msw", dense_steps=1, layers=["a"], block_size=16)
    lay = _layout((8, 8))
    assert method.plan(lay, RunContext(grid=(8, 8), layer="a", step=0)) is None  # dense warm-up step
    assert method.plan(lay, RunContext(grid=(8, 8), layer="b", step=1)) is None  # layer not selected
    assert isinstance(method.plan(lay, RunContext(grid=(8, 8), layer="a", step=1)), AttentionPlan)
    low = dataclasses.replace(lay, downsample=2, hierarchical=True)
    assert method.plan(low, RunContext(grid=(16, 16), layer="a", step=1)) is None  # UNet level below the limit


def test_padding_lengths_on_a_text_prefix_run_the_method_on_the_valid_tokens():
    """A padded text *prefix* (Qwen-Image: valid tokens first, padding, then the image) runs the method as the prompt
    cut to its valid length would: the valid rows equal the cut call, padded rows are finite, nothing falls back."""
    import warnings

    grid, nt, valid = (4, 4), 6, 3
    lay = TokenLayout(num_tokens=22, grid=grid, text=slice(0, nt), text_lengths=(valid,))
    keep = torch.ones(1, 1, 1, 22, dtype=torch.bool)
    keep[..., valid:nt] = False
    q, k, v = qkv(22, batch=1)
    method = get_method("gna", kernel_size=3, block_size=16, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = method(q, k, v, lay, RunContext(grid=grid, layer="a"), attn_mask=keep)
    rows = torch.cat([torch.arange(valid), torch.arange(nt, 22)])
    cut = TokenLayout(num_tokens=22 - (nt - valid), grid=grid, text=slice(0, valid))
    want = method(*(t[:, :, rows] for t in (q, k, v)), cut, RunContext(grid=grid, layer="b"))
    assert_close(out[:, :, rows], want, 1e-6)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[:, :, rows], sdpa(q, k, v, attn_mask=keep)[:, :, rows], atol=1e-3)  # gna ran
