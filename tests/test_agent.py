"""Agent attention: both modes against a fully materialized two-stage formula written here, ToMe merging, memory
growth, the step / level schedule, and the method on tiny pipelines."""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import diffaccel
from adapter_fields import AdapterFields, Recorder
from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.layout import TokenLayout
from diffaccel.methods.agent import AgentMethod, pooled_agent_attention
from diffaccel.methods.base import get_method
from diffaccel.pipelines.tiny import build_tiny, tiny_spec
from diffaccel.methods._tome import bipartite_matching, destination_positions
from diffaccel.warn import DiffAccelWarning

# ---------------------------------------------------------------------------------------------- references


def softmax_attention(q, k, v, scale):
    """Materialized softmax(q·kᵀ·scale)·v in float64."""
    return torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1) @ v.double()


def two_stage(q, agents, k, v, scale, power, shortcut_values, shortcut):
    """softmax(q·Aᵀ·scale^power) · softmax(A·kᵀ·scale) · v + shortcut·V, every matrix materialized (float64)."""
    s1 = torch.softmax(agents.double() @ k.double().transpose(-1, -2) * scale, dim=-1)
    s2 = torch.softmax(q.double() @ agents.double().transpose(-1, -2) * scale**power, dim=-1)
    return s2 @ (s1 @ v.double()) + shortcut * shortcut_values.double()


def pool_reference(x, grid, target):
    """Average over adaptive-pooling windows [floor(i*G/g), ceil((i+1)*G/g)) per dimension, by explicit loops."""
    b, h, _, d = x.shape
    x = x.reshape(b, h, *grid, d)
    windows = [
        [(math.floor(i * g / t), math.ceil((i + 1) * g / t)) for i in range(t)] for g, t in zip(grid, target)
    ]
    agents = []
    for cell in _product(windows):
        region = x
        for dim, (lo, hi) in enumerate(cell):
            region = region.narrow(2 + dim, lo, hi - lo)
        agents.append(region.reshape(b, h, -1, d).mean(dim=2))
    return torch.stack(agents, dim=2)


def _product(lists):
    if not lists:
        yield ()
        return
    for item in lists[0]:
        for rest in _product(lists[1:]):
            yield (item, *rest)


def split_layout(x, layout):
    return x[:, :, layout.visual], (x[:, :, layout.text] if layout.num_text else x[:, :, :0])


def join_layout(visual, text, layout):
    if not layout.num_text:
        return visual
    return torch.cat([text, visual] if layout.text_first else [visual, text], dim=2)


def pooled_reference(q, k, v, layout, agent_grid, scale, power=0.3, shortcut=0.075):
    qv, qt = split_layout(q, layout)
    target = (1,) * (len(layout.grid) - len(agent_grid)) + tuple(agent_grid[-len(layout.grid):])
    target = tuple(min(t, g) for t, g in zip(target, layout.grid))
    agents = pool_reference(qv, layout.grid, target)
    out_visual = two_stage(qv, agents, k, v, scale, power, v[:, :, layout.visual], shortcut)
    out_text = softmax_attention(qt, k, v, scale)
    return join_layout(out_visual, out_text, layout)


def tome_groups(metric_b, grid, stride, r):
    """Independent ToMe (top-left destinations, no randomness) for one batch element, by Python loops.

    Returns the list of token groups of the merged sequence; each group is a list of positions.
    """
    height, width = grid
    sy, sx = stride
    dst = sorted((cy * sy) * width + cx * sx for cy in range(height // sy) for cx in range(width // sx))
    src = [p for p in range(height * width) if p not in set(dst)]
    m = metric_b / metric_b.norm(dim=-1, keepdim=True)
    best = {}
    for s in src:
        sims = [float(m[s] @ m[d]) for d in dst]
        j = max(range(len(dst)), key=lambda i: sims[i])
        best[s] = (sims[j], dst[j])
    ranked = sorted(src, key=lambda s: -best[s][0])
    merged, kept = ranked[:r], ranked[r:]
    groups = [[s] for s in kept]
    for d in dst:
        groups.append([d] + [s for s in merged if best[s][1] == d])
    return groups


def agentsd_reference(q, k, v, layout, stride, ratio, agent_ratio, scale, power=0.3, shortcut=0.075, agents_on=True,
                      metric="keys"):
    """AgentSD on one layout, every batch element separately: groups by loops, then the materialized formula."""
    qv_all, qt_all = split_layout(q, layout)
    kv_all, kt_all = split_layout(k, layout)
    vv_all, vt_all = split_layout(v, layout)
    n = layout.num_visual
    outs = []
    for b in range(q.shape[0]):
        source = {"keys": kv_all, "queries": qv_all, "values": vv_all}[metric]
        similarity = source[b].transpose(0, 1).reshape(n, -1)
        groups = tome_groups(similarity, layout.grid, stride, int(n * ratio))
        agent_groups = tome_groups(similarity, layout.grid, stride, int(n * agent_ratio))

        def merge(x, gs):
            return torch.stack([x[:, g].mean(dim=1) for g in gs], dim=1)

        qm, km, vm = (merge(t[b], groups) for t in (qv_all, kv_all, vv_all))
        keys = torch.cat([km, kt_all[b]], dim=1)
        values = torch.cat([vm, vt_all[b]], dim=1)
        agents = merge(qv_all[b], agent_groups)
        if agents_on and 2 * agents.shape[1] < len(groups):
            out_m = two_stage(qm, agents, keys, values, scale, power, vm, shortcut)
        else:
            out_m = softmax_attention(qm, keys, values, scale)
        out_v = torch.empty(q.shape[1], n, q.shape[-1], dtype=torch.float64)
        for gi, g in enumerate(groups):
            for p in g:
                out_v[:, p] = out_m[:, gi]
        out_t = softmax_attention(qt_all[b], k[b], v[b], scale)
        outs.append(join_layout(out_v[None], out_t[None], layout)[0])
    return torch.stack(outs)


def assert_close(actual, expected, rtol):
    assert torch.isfinite(actual).all()
    err = (actual.double() - expected.double()).norm() / expected.double().norm()
    assert err < rtol, f"relative error {err:.3g} >= {rtol}"


def qkv(batch, heads, tokens, dim, dtype=torch.float32):
    return tuple(torch.randn(batch, heads, tokens, dim, dtype=dtype) for _ in range(3))


LAYOUTS = [
    pytest.param((5, 7), None, id="odd-grid-no-text"),
    pytest.param((5, 7), "suffix", id="odd-grid-text-after (SD3)"),
    pytest.param((7, 9), "prefix", id="odd-grid-text-before (FLUX)"),
]


def make_layout(grid, text, num_text=6):
    n = math.prod(grid)
    if text is None:
        return TokenLayout(n, grid)
    if text == "suffix":
        return TokenLayout(n + num_text, grid, text=slice(n, n + num_text))
    return TokenLayout(n + num_text, grid, text=slice(0, num_text))


# ---------------------------------------------------------------------------------------------- pooled mode


@pytest.mark.parametrize("grid,text", LAYOUTS)
@pytest.mark.parametrize("agent_grid", [(3, 3), (2, 4)])
def test_pooled_matches_materialized_formula(grid, text, agent_grid):
    layout = make_layout(grid, text)
    q, k, v = qkv(2, 3, layout.num_tokens, 16)
    method = get_method("agent", mode="pooled", agent_grid=agent_grid)
    out = method(q, k, v, layout, RunContext(grid=grid))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, pooled_reference(q, k, v, layout, agent_grid, 16**-0.5), 1e-5)


def test_pooled_video_grid_and_custom_scale():
    grid = (3, 5, 7)
    layout = make_layout(grid, "prefix", num_text=5)
    q, k, v = qkv(1, 2, layout.num_tokens, 8)
    for agent_grid in [(2, 3, 3), (3, 3)]:  # a 2-entry grid pools all frames together
        out = pooled_agent_attention(q, k, v, layout, agent_grid=agent_grid, scale=0.2, stage2_power=0.5, shortcut=0.1)
        assert_close(out, pooled_reference(q, k, v, layout, agent_grid, 0.2, power=0.5, shortcut=0.1), 1e-5)


def test_pooled_fp32_logits_in_bfloat16():
    layout = make_layout((6, 6), "suffix")
    q, k, v = qkv(1, 2, layout.num_tokens, 16, dtype=torch.bfloat16)
    out = get_method("agent", mode="pooled", agent_grid=(2, 2), fp32_logits=True)(q, k, v, layout, RunContext())
    assert out.dtype == torch.bfloat16
    assert_close(out, pooled_reference(q, k, v, layout, (2, 2), 16**-0.5), 2e-2)


def test_pooled_falls_back_to_exact_when_agents_are_not_fewer():
    layout = make_layout((3, 3), "suffix")
    q, k, v = qkv(1, 2, layout.num_tokens, 8)
    out = get_method("agent", mode="pooled", agent_grid=(7, 7))(q, k, v, layout, RunContext())
    assert_close(out, softmax_attention(q, k, v, 8**-0.5), 1e-5)


def largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation any op makes while ``fn`` runs (kernel workspaces included)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


def test_pooled_memory_grows_linearly_with_tokens():
    sizes = {}
    materialized = {}
    for side in (32, 64):
        layout = make_layout((side, side), "suffix", num_text=8)
        q, k, v = qkv(1, 2, layout.num_tokens, 16)
        sizes[side] = (largest_allocation(
            lambda: pooled_agent_attention(q, k, v, layout, agent_grid=(7, 7), scale=0.25)
        ), q.nbytes)
        materialized[side] = largest_allocation(lambda: torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
    # The instrument sees quadratic growth where there is one (4x tokens: 16x the score matrix) ...
    assert materialized[64] >= 12 * materialized[32]
    # ... and the agent path grows like the tokens (4x), never like the score matrix, and stays O(q).
    assert sizes[64][0] <= 5 * sizes[32][0]
    assert sizes[64][0] <= 2 * sizes[64][1]
    assert 50 * sizes[64][0] <= materialized[64]


# ---------------------------------------------------------------------------------------------- ToMe


def test_destinations_one_per_cell():
    gen = torch.Generator().manual_seed(3)
    grid, stride = (7, 9), (2, 4)
    dst = destination_positions(grid, stride, generator=gen)
    rows, cols = dst // grid[1], dst % grid[1]
    cells = sorted(zip((rows // 2).tolist(), (cols // 4).tolist()))
    assert cells == [(cy, cx) for cy in range(3) for cx in range(2)]  # one per full cell, leftovers are sources
    assert (rows < 6).all() and (cols < 8).all()
    fixed = destination_positions(grid, stride)
    assert fixed.tolist() == [cy * 2 * 9 + cx * 4 for cy in range(3) for cx in range(2)]


@pytest.mark.parametrize("r", [0, 5, 20])
def test_tome_round_trip(r):
    grid = (6, 7)
    x = torch.randn(2, 3, 42, 4)
    matching = bipartite_matching(torch.randn(2, 42, 12), grid, (2, 2), generator=torch.Generator().manual_seed(0))
    plan = matching.plan(r)
    merged = plan.merge(x)
    assert merged.shape == (2, 3, 42 - r, 4)
    back = plan.unmerge(merged)
    for b in range(2):
        kept_pos = matching.src_pos[plan.kept_src[b]]
        torch.testing.assert_close(back[b][:, kept_pos], x[b][:, kept_pos], rtol=0, atol=0)  # unmerged: exact
        for j, d in enumerate(plan.dst_pos.tolist()):
            members = [d] + matching.src_pos[plan.merged_src[b][plan.merged_into[b] == j]].tolist()
            mean = x[b][:, members].mean(dim=1)
            for p in members:  # merged sources copy their destination's mean
                torch.testing.assert_close(back[b][:, p], mean, rtol=1e-6, atol=1e-6)
    if r == 0:
        torch.testing.assert_close(back, x, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- agentsd mode


def agentsd_ctx(grid, step=0, num_steps=50):
    ctx = RunContext(grid=grid, num_steps=num_steps)
    ctx.step = step
    return ctx


@pytest.mark.parametrize("grid,text", LAYOUTS)
def test_agentsd_matches_materialized_formula(grid, text):
    layout = make_layout(grid, text)
    q, k, v = qkv(2, 2, layout.num_tokens, 8)
    method = get_method("agent", mode="agentsd", use_rand=False, stride=(2, 2), ratio=0.3, agent_ratio=0.7)
    out = method(q, k, v, layout, agentsd_ctx(grid))
    expected = agentsd_reference(q, k, v, layout, (2, 2), 0.3, 0.7, 8**-0.5)
    assert_close(out, expected, 1e-5)
    # the gate 2·n < N' holds here, so the result is not plain ToMe attention
    tome_only = agentsd_reference(q, k, v, layout, (2, 2), 0.3, 0.7, 8**-0.5, agents_on=False)
    assert (expected - tome_only).abs().max() > 1e-3


@pytest.mark.parametrize(
    "option,value",
    [("stride", (1, 3)), ("ratio", 0.2), ("agent_ratio", 0.8), ("stage2_power", 0.6), ("shortcut", 0.3),
     ("metric", "queries"), ("metric", "values"), ("late_stride", (1, 2)), ("agent_fraction", 0.5)],
)
def test_every_agentsd_option_has_its_effect(option, value):
    """Each option turned on changes the output, and the method still equals the loop-built formula with it."""
    grid, layout = (6, 7), make_layout((6, 7), "suffix")
    q, k, v = qkv(2, 2, layout.num_tokens, 8)
    base = dict(mode="agentsd", use_rand=False, stride=(2, 2), ratio=0.3, agent_ratio=0.7, late_stride=(2, 2))
    ref = dict(stride=(2, 2), ratio=0.3, agent_ratio=0.7, power=0.3, shortcut=0.075, metric="keys")
    step = 0
    if option in ("late_stride", "agent_fraction"):
        step = 4  # of 10 steps: the default 0.4 makes it a ToMe-only step, 0.5 an agent step
    agents_on = {"agent_fraction": value}.get(option, 0.4) * 10 > step
    ctx = agentsd_ctx(grid, step=step, num_steps=10)
    mapped = {"stage2_power": "power"}.get(option, option)
    if option == "late_stride":
        ref["stride"] = value
    elif option != "agent_fraction":
        ref[mapped] = value
    changed = get_method("agent", **{**base, option: value})(q, k, v, layout, ctx)
    default = get_method("agent", **base)(q, k, v, layout, ctx)
    stride = ref.pop("stride") if agents_on or option == "late_stride" else (2, 2)
    expected = agentsd_reference(q, k, v, layout, stride, scale=8**-0.5, agents_on=agents_on, **ref)
    assert_close(changed, expected, 1e-5)
    assert (changed - default).abs().max() > 1e-4


def test_agentsd_recipe_switches_to_tome_after_agent_steps():
    grid = (8, 8)
    layout = make_layout(grid, None)
    q, k, v = qkv(2, 2, 64, 8)
    method = get_method("agent", mode="agentsd", use_rand=False)  # recipe: stride 4 with agents, then stride 2 ToMe, ratio 0.4
    early = method(q, k, v, layout, agentsd_ctx(grid, step=19))
    late = method(q, k, v, layout, agentsd_ctx(grid, step=20))
    assert_close(early, agentsd_reference(q, k, v, layout, (4, 4), 0.4, 0.95, 8**-0.5), 1e-5)
    assert_close(late, agentsd_reference(q, k, v, layout, (2, 2), 0.4, 0.4, 8**-0.5, agents_on=False), 1e-5)
    dense_after = get_method("agent", mode="agentsd", use_rand=False, late_tome=False)(q, k, v, layout, agentsd_ctx(grid, step=20))
    assert_close(dense_after, softmax_attention(q, k, v, 8**-0.5), 1e-5)


def test_agentsd_only_in_highest_resolution_level():
    method = get_method("agent", mode="agentsd", use_rand=False)
    high = TokenLayout(256, (16, 16), hierarchical=True)  # the adapter's UNet levels: downsample 1 and 2
    low = TokenLayout(64, (8, 8), downsample=2, hierarchical=True)
    ctx = agentsd_ctx((16, 16))
    qh, kh, vh = qkv(1, 2, 256, 8)
    ql, kl, vl = qkv(1, 2, 64, 8)
    assert (method(qh, kh, vh, high, ctx) - softmax_attention(qh, kh, vh, 8**-0.5)).abs().max() > 1e-3
    assert_close(method(ql, kl, vl, low, ctx), softmax_attention(ql, kl, vl, 8**-0.5), 1e-5)
    # SDXL-like model: the first attention level is already downsampled 2x, which the adapter says with
    # layout.finest_downsample=2: the default (None) changes that level, max_downsample=1 does not, 2 and 3 do.
    sdxl_low = TokenLayout(64, (8, 8), downsample=2, hierarchical=True, finest_downsample=2)
    for limit, active in ((None, True), (1, False), (2, True), (3, True)):
        m = get_method("agent", mode="agentsd", use_rand=False, max_downsample=limit)
        changed = (m(ql, kl, vl, sdxl_low, agentsd_ctx((16, 16))) - softmax_attention(ql, kl, vl, 8**-0.5)).abs().max()
        assert (changed > 1e-3) == active
    # ...while on an SD 1.x-like model (finest 1) the default leaves the 2x level exact.
    m = get_method("agent", mode="agentsd", use_rand=False)
    assert_close(m(ql, kl, vl, low, agentsd_ctx((16, 16))), softmax_attention(ql, kl, vl, 8**-0.5), 1e-5)


def test_random_destinations_are_seeded_and_off_for_odd_batches():
    grid = (8, 8)
    layout = make_layout(grid, None)
    q, k, v = qkv(2, 2, 64, 8)
    a = get_method("agent", mode="agentsd", seed=1)(q, k, v, layout, agentsd_ctx(grid))
    b = get_method("agent", mode="agentsd", seed=1)(q, k, v, layout, agentsd_ctx(grid))
    c = get_method("agent", mode="agentsd", seed=2)(q, k, v, layout, agentsd_ctx(grid))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 0
    odd = get_method("agent", mode="agentsd", seed=1)(q[:1], k[:1], v[:1], layout, agentsd_ctx(grid))
    assert_close(odd, agentsd_reference(q[:1], k[:1], v[:1], layout, (4, 4), 0.4, 0.95, 8**-0.5), 1e-5)


def test_cross_attention_and_masks_stay_dense():
    method = get_method("agent", mode="pooled", agent_grid=(2, 2))
    q = torch.randn(1, 2, 64, 8)
    k, v = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    cross = TokenLayout(64, None, is_cross=True, num_keys=10)
    assert_close(method(q, k, v, cross, RunContext()), softmax_attention(q, k, v, 8**-0.5), 1e-6)
    layout = make_layout((8, 8), None)
    q, k, v = qkv(1, 2, 64, 8)
    mask = torch.zeros(1, 1, 64, 64)
    with pytest.warns(DiffAccelWarning, match="mask"):
        out = method(q, k, v, layout, RunContext(), attn_mask=mask)
    assert_close(out, softmax_attention(q, k, v, 8**-0.5), 1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        {"mode": "linear"},
        {"agent_ratio": 0.2, "ratio": 0.4},
        {"ratio": 1.0},
        {"stride": (0, 2)},
        {"agent_grid": (7, 0)},
        {"agent_fraction": 1.5},
        {"metric": "hidden"},
        {"max_downsample": 0},
    ],
)
def test_bad_config_names_the_parameter(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        AgentMethod(**bad)


# ---------------------------------------------------------------------------------------------- pipelines


def _latents(pipe, name, **overrides):
    kwargs = tiny_spec(name).call_kwargs(output_type="latent", **overrides)
    return pipe("a photo", generator=torch.Generator().manual_seed(0), **kwargs).images


def _check_recorded_agentsd(recorder, cfg):
    """Each recorded UNet call equals the loop-built AgentSD formula (independent of the method's code)."""
    assert recorder.calls, "no agentsd call was recorded"
    for q, k, v, layout, ctx, scale, out in recorder.calls:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        agent_step = ctx.step < round(0.4 * ctx.num_steps)
        stride = tuple(min(s, g) for s, g in zip(cfg.stride if agent_step else cfg.late_stride, layout.grid))
        expected = agentsd_reference(q, k, v, layout, stride, cfg.ratio, cfg.agent_ratio, scale,
                                     agents_on=agent_step)
        assert_close(out, expected, 1e-5)
        assert (expected - softmax_attention(q, k, v, scale)).abs().max() > 1e-4  # the comparison can fail


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_agentsd_on_unets(name):
    pipe = build_tiny(name)
    pipe.set_progress_bar_config(disable=True)
    size = dict(height=32, width=32)
    dense = _latents(pipe, name, **size)
    # The tiny UNets (like SDXL) have attention only at 2x downsampling: max_downsample=2 reaches it; auto mode is
    # agentsd on UNet levels (layout.hierarchical, filled by the adapter; AdapterFields where it is not yet).
    method = get_method("agent", max_downsample=2, use_rand=False)
    recorder = Recorder(method, limit=3)
    diffaccel.apply(pipe, AdapterFields(recorder, unet=True))
    agent = _latents(pipe, name, **size)
    _check_recorded_agentsd(recorder, method.config)
    # The default (max_downsample=None) is the highest-resolution level with attention, the adapter's
    # finest_downsample: here the 2x level, so it equals max_downsample=2; max_downsample=1 changes nothing.
    diffaccel.apply(pipe, get_method("agent", use_rand=False))
    default = _latents(pipe, name, **size)
    diffaccel.apply(pipe, AdapterFields(get_method("agent", max_downsample=1), unet=True))
    untouched_1 = _latents(pipe, name, **size)
    diffaccel.remove(pipe)
    assert torch.isfinite(agent).all()
    assert (agent - dense).abs().max() > 1e-4
    torch.testing.assert_close(default, agent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(untouched_1, dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_pooled_on_dits(name):
    pipe = build_tiny(name)
    pipe.set_progress_bar_config(disable=True)
    dense = _latents(pipe, name)
    recorder = Recorder(get_method("agent", mode="pooled"), limit=3)
    diffaccel.apply(pipe, recorder)
    agent = _latents(pipe, name)
    diffaccel.apply(pipe, "agent")  # auto: pooled on DiTs
    auto = _latents(pipe, name)
    diffaccel.remove(pipe)
    assert torch.isfinite(agent).all()
    assert (agent - dense).abs().max() > 1e-4
    torch.testing.assert_close(auto, agent, rtol=0, atol=0)
    assert recorder.calls
    for q, k, v, layout, ctx, scale, out in recorder.calls:  # one layer's output vs the materialized formula
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        expected = pooled_reference(q, k, v, layout, (7, 7), scale)
        if 2 * math.prod(min(a, g) for a, g in zip((7, 7), layout.grid[-2:])) >= layout.num_visual:
            expected = softmax_attention(q, k, v, scale)  # agents not fewer than tokens: exact attention
        assert_close(out, expected, 1e-5)


def test_auto_mode():
    from diffaccel.methods.agent import resolve_mode

    image = make_layout((4, 4), None)
    unet_level = TokenLayout(16, (4, 4), hierarchical=True)
    assert resolve_mode("auto", unet_level, RunContext()) == "agentsd"  # UNet self-attention (adapter: hierarchical)
    assert resolve_mode("auto", TokenLayout(16, (4, 4), downsample=2, hierarchical=True), RunContext()) == "agentsd"
    assert resolve_mode("auto", image, RunContext(text_len=7)) == "pooled"  # image-only call in a joint DiT
    assert resolve_mode("auto", image, RunContext()) == "pooled"  # a transformer's grid, whatever the token count
    assert resolve_mode("auto", make_layout((4, 4), "suffix"), RunContext()) == "pooled"
    assert resolve_mode("auto", TokenLayout(32, (2, 4, 4)), RunContext()) == "pooled"  # video
    assert resolve_mode("agentsd", make_layout((4, 4), "suffix"), RunContext()) == "agentsd"


def test_bare_set_attn_processor_on_unet_warns_and_runs():
    pipe = build_tiny("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    dense = _latents(pipe, "tiny-sd")
    pipe.unet.set_attn_processor(diffaccel.DiffAccelAttnProcessor("agent", mode="agentsd", max_downsample=8))
    with pytest.warns(DiffAccelWarning, match="number of denoising steps is unknown"):
        out = _latents(pipe, "tiny-sd")
    assert torch.isfinite(out).all() and (out - dense).abs().max() > 1e-4


def test_agent_attn_processor_on_unet_bare_and_applied():
    """AgentAttnProcessor works through a bare set_attn_processor and through diffaccel.apply."""
    from diffaccel.pipelines.tiny import build_tiny, tiny_spec
    from diffaccel.warn import DiffAccelWarning

    pipe = build_tiny("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    kwargs = tiny_spec("tiny-sd").call_kwargs(output_type="latent", height=32, width=32)
    dense = pipe("a photo", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.unet.set_attn_processor(diffaccel.AgentAttnProcessor(mode="agentsd", max_downsample=2))
    with pytest.warns(DiffAccelWarning):
        agent = pipe("a photo", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.isfinite(agent).all() and (agent - dense).abs().max() > 1e-4
    # apply after a bare install recovers the stock processors, and remove restores them
    diffaccel.apply(pipe, diffaccel.AgentAttnProcessor(mode="agentsd", max_downsample=2))
    applied = pipe("a photo", generator=torch.Generator().manual_seed(0), **kwargs).images
    diffaccel.remove(pipe)
    assert (applied - dense).abs().max() > 1e-4
    restored = pipe("a photo", generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(restored, dense, rtol=0, atol=0)


def test_an_option_of_the_other_mode_is_announced_once(recwarn):
    """A changed option that acts only in the mode this model does not run (AgentSD's ``ratio`` on a transformer,
    the pooled ``agent_grid`` on a UNet level) is one warning, not a silent no-op; defaults and options of the
    running mode say nothing."""
    from diffaccel.warn import reset_warnings

    def messages():
        return [str(w.message) for w in recwarn.list if "has no effect" in str(w.message)]

    layout = make_layout((6, 7), "suffix")
    q, k, v = qkv(1, 2, layout.num_tokens, 8)
    reset_warnings()
    for _ in range(2):
        get_method("agent", mode="pooled", agent_grid=(2, 2))(q, k, v, layout, RunContext())
    get_method("agent", mode="agentsd", use_rand=False, ratio=0.3)(q, k, v, layout, RunContext())
    assert messages() == []
    for _ in range(2):
        get_method("agent", mode="pooled", agent_grid=(2, 2), ratio=0.2, seed=3)(q, k, v, layout, RunContext())
    assert messages() == ["agent: ratio=0.2, seed=3 has no effect in pooled mode (this model); it applies to UNets "
                          "(agentsd mode)"]
    get_method("agent", mode="agentsd", use_rand=False, agent_grid=(3, 3))(q, k, v, layout, RunContext())
    assert messages()[1:] == ["agent: agent_grid=(3, 3) has no effect in agentsd mode (this model); it applies to "
                              "transformers (pooled mode)"]
