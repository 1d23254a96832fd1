"""AdaSpa (issue 10): dense at sparsity 0, selection against a brute-force top-mass reference (tiers included),
the LSE-cached re-search, step schedules, runs that never share masks, the min_recall floor, overhead accounting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.layout import TokenLayout
from diffaccel.methods.adaspa import AdaSpaMethod, select_blocks, text_blocks
from diffaccel.methods.base import get_method

LAYER = "transformer_blocks.0.attn"


def layout_of(grid, text, nt=5):
    nv = math.prod(grid)
    if text is None:
        return TokenLayout(nv, grid)
    sl = slice(0, nt) if text == "prefix" else slice(nv, nv + nt)
    return TokenLayout(nv + nt, grid, text=sl)


def ctx_at(step, num_steps=10, layer=LAYER, calls=None):
    return RunContext(grid=None, step=step, num_steps=num_steps, layer=layer,
                      denoiser_calls=step + 1 if calls is None else calls)


def inputs(lay, B=2, H=4, D=16, seed=0, gain=1.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, lay.num_tokens, D, generator=g) * (gain if i < 2 else 1.0) for i in range(3))


# ----------------------------------------------------------------------------------------------- brute force


def brute_mass(q, k, block):
    """Block sums of softmax(q k^T / sqrt(d)) written out with the full probability matrix."""
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    B, H, N, _ = p.shape
    nb = -(-N // block)
    out = torch.zeros(B, H, nb, nb, dtype=torch.float64)
    for i in range(nb):
        for j in range(nb):
            out[:, :, i, j] = p[:, :, i * block:(i + 1) * block, j * block:(j + 1) * block].sum((-1, -2))
    return out


def brute_select(mass, text_blocks_list, s, thr, adaptive, min_recall):
    """AdaSpa's rules, one head and one row at a time in plain Python."""
    B, H, nb, _ = mass.shape
    vis = [j for j in range(nb) if not text_blocks_list[j]]
    txt = [j for j in range(nb) if text_blocks_list[j]]
    nv = len(vis)
    keep = torch.zeros(B, H, nb, nb, dtype=torch.bool)
    tiers = torch.zeros(B, H, dtype=torch.float64)

    def k_of(sp):
        return min(nv, max(1, round((1 - sp) * nv)))

    def ranked(b, h, r):
        return sorted(vis, key=lambda j: (-float(mass[b, h, r, j]), j))

    def recall(b, h, k):
        kept = tot = 0.0
        for r in vis:  # visual rows (rows = key-block indices here: same blocks)
            row = ranked(b, h, r)
            kept += sum(float(mass[b, h, r, j]) for j in txt) + sum(float(mass[b, h, r, j]) for j in row[:k])
            tot += float(mass[b, h, r].sum())
        return kept / tot

    for b in range(B):
        sh = [s] * H
        if adaptive and H >= 2 and s > 0:
            rec = [recall(b, h, k_of(s)) for h in range(H)]
            n = min(sum(r > thr for r in rec), H // 2)
            order = sorted(range(H), key=lambda h: (-rec[h], h))
            d = min((1 - s) / 2, s)
            for h in order[:n]:
                sh[h] = s + d
            for h in order[H - n:] if n else []:
                sh[h] = s - d
        for h in range(H):
            tiers[b, h] = sh[h]
            k = k_of(sh[h])
            floor = min_recall > 0 and recall(b, h, k) < min_recall
            for r in range(nb):
                if r in txt:
                    keep[b, h, r] = True
                    continue
                row = ranked(b, h, r)
                kr = k
                if floor:
                    total = float(mass[b, h, r].sum())
                    base = sum(float(mass[b, h, r, j]) for j in txt)
                    while kr < nv and base + sum(float(mass[b, h, r, j]) for j in row[:kr]) < min_recall * total - 1e-9:
                        kr += 1
                for j in row[:kr] + txt:
                    keep[b, h, r, j] = True
    return keep, tiers


@pytest.mark.parametrize("text", [None, "prefix", "suffix"])
@pytest.mark.parametrize("sparsity,thr,adaptive,min_recall", [
    (0.8, 0.8, True, 0.0), (0.7, 0.3, True, 0.0), (0.6, 0.5, False, 0.0), (0.8, 0.2, True, 0.9),
])
def test_selection_equals_brute_force_top_mass(text, sparsity, thr, adaptive, min_recall):
    lay = layout_of((3, 5, 7), text)  # 105 visual tokens, blocks of 16 straddle the text boundary
    q, k, _ = inputs(lay, B=2, H=5, gain=2.0, seed=1)
    mass = brute_mass(q, k, 16)
    tb = text_blocks(lay, lay.num_tokens, 16, torch.device("cpu"))
    want_keep, want_tiers = brute_select(mass, tb.tolist(), sparsity, thr, adaptive, min_recall)
    sel = select_blocks(mass.float(), tb, tb, sparsity=sparsity, recall_threshold=thr, head_adaptive=adaptive,
                        min_recall=min_recall)
    assert torch.allclose(sel.head_sparsity.double(), want_tiers, atol=1e-6)
    assert torch.equal(sel.keep, want_keep)
    if adaptive and thr < 0.8:
        assert len(set(sel.head_sparsity.flatten().tolist())) > 1, "the case must exercise the tiers"
    if min_recall:
        assert (sel.recall >= min_recall - 1e-5).all()


def test_tiers_keep_the_average_and_cap_n_at_half_the_heads():
    lay = layout_of((4, 8), None)
    q, k, _ = inputs(lay, B=1, H=5, gain=3.0, seed=2)
    mass = brute_mass(q, k, 16).float()
    none = torch.zeros(2, dtype=torch.bool)
    sel = select_blocks(mass, none, none, sparsity=0.8, recall_threshold=1e-3)  # every head above: n capped at 2
    tiers = sorted(sel.head_sparsity[0].tolist())
    assert tiers == pytest.approx([0.7, 0.7, 0.8, 0.9, 0.9])


# ----------------------------------------------------------------------------------------------- the method


def run_steps(m, q, k, v, lay, num_steps, layer=LAYER, total=None):
    """Steps 0..num_steps-1 of a run of ``total`` steps (default num_steps)."""
    outs = []
    for step in range(num_steps):
        outs.append(m(q, k, v, lay, ctx_at(step, total or num_steps, layer)))
    return outs


@pytest.mark.parametrize("text", [None, "prefix", "suffix"])
def test_sparsity_zero_equals_dense(text):
    lay = layout_of((2, 5, 7), text)
    q, k, v = inputs(lay)
    m = get_method("adaspa", sparsity=0.0, block_size=16, backend="reference")
    dense = F.scaled_dot_product_attention(q, k, v)
    for out in run_steps(m, q, k, v, lay, 6):
        assert (out - dense).abs().max().item() <= 1e-5
    assert m.searches and m.kept_blocks(LAYER).all()


def test_option_backend_triton_equals_reference():
    lay = layout_of((2, 4, 4), "prefix", nt=4)
    q, k, v = inputs(lay, B=1, H=2, gain=2.0)
    a = run_steps(get_method("adaspa", block_size=16, backend="reference"), q, k, v, lay, 3)
    b = run_steps(get_method("adaspa", block_size=16, backend="triton"), q, k, v, lay, 3)
    dense = F.scaled_dot_product_attention(q, k, v)
    assert (a[-1] - dense).abs().max() > 1e-3
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() <= 2e-5


@pytest.mark.parametrize("num_steps,searches", [(10, (1, 5)), (50, (9, 29)), (20, (3, 11)), (2, (0,))])
def test_option_search_at_schedule_follows_the_run_length(num_steps, searches):
    m = AdaSpaMethod(block_size=16, backend="reference", sparsity=0.5)
    assert m.search_steps(num_steps) == searches
    if num_steps > 20:
        return
    lay = layout_of((3, 5, 7), "suffix")
    q, k, v = inputs(lay, gain=2.0)
    dense = F.scaled_dot_product_attention(q, k, v)
    outs = run_steps(m, q, k, v, lay, num_steps)
    kinds = [("fused" if s == searches[0] else "cached") for s in searches]
    assert m.searches == [(LAYER, s, kind) for s, kind in zip(searches, kinds)]
    for step, out in enumerate(outs):
        err = (out - dense).abs().max().item()
        assert (err <= 1e-5) == (step <= searches[0]), (step, err)  # warm-up and fused search dense, then sparse
    # warm-up steps are counted as dense fallbacks (a run that never searches reads "fell back to dense")
    assert (m.call_counts.dense, m.call_counts.method) == (searches[0], num_steps - searches[0])
    other = AdaSpaMethod(block_size=16, backend="reference", sparsity=0.5, search_at=(0.5,))
    assert other.search_steps(num_steps) == (max(0, round(num_steps / 2) - 1),)


def test_cached_lse_research_equals_fresh_search_on_unchanged_inputs():
    lay = layout_of((3, 5, 7), "prefix")
    q, k, v = inputs(lay, gain=2.0, seed=3)
    m = AdaSpaMethod(block_size=16, backend="reference", sparsity=0.7)
    masks = []
    for step in range(10):
        m(q, k, v, lay, ctx_at(step))
        if step in (1, 5):
            masks.append(m.kept_blocks(LAYER).clone())
    assert m.searches[-1] == (LAYER, 5, "cached")
    assert m._states[LAYER].lse is None, "the LSE is freed after the last search"
    fresh = AdaSpaMethod(block_size=16, backend="reference", sparsity=0.7)
    fresh(q, k, v, lay, ctx_at(5))  # no state: a fused search at this step
    assert fresh.searches == [(LAYER, 5, "fused")]
    assert torch.equal(masks[1], fresh.kept_blocks(LAYER)) and torch.equal(masks[0], masks[1])
    # and with changed inputs the cached re-search does change the mask
    q2, k2, _ = inputs(lay, gain=2.0, seed=4)
    m2 = AdaSpaMethod(block_size=16, backend="reference", sparsity=0.7)
    for step in range(6):
        m2(q if step < 5 else q2, k if step < 5 else k2, v, lay, ctx_at(step))
    assert not torch.equal(m2.kept_blocks(LAYER), masks[0])


def test_a_second_run_does_not_reuse_the_first_runs_masks():
    lay = layout_of((3, 5, 7), None)
    a, b = inputs(lay, gain=2.0, seed=5), inputs(lay, gain=2.0, seed=6)
    m = AdaSpaMethod(block_size=16, backend="reference", sparsity=0.7)
    run_steps(m, *a, lay, 4, total=10)
    first = m.kept_blocks(LAYER).clone()
    outs = run_steps(m, *b, lay, 4, total=10)  # step back to 0 (and a new denoiser-call count): a new run
    fresh = AdaSpaMethod(block_size=16, backend="reference", sparsity=0.7)
    want = run_steps(fresh, *b, lay, 4, total=10)
    assert m.searches == fresh.searches == [(LAYER, 1, "fused")]
    assert torch.equal(m.kept_blocks(LAYER), fresh.kept_blocks(LAYER)) and not torch.equal(first, fresh.kept_blocks(LAYER))
    for x, y in zip(outs, want):
        assert torch.equal(x, y)
    # a new run is also detected from the denoiser-call count alone (a re-applied method, same step numbers)
    m(*a, lay, ctx_at(3, calls=1))
    assert m.searches == [(LAYER, 3, "fused")]


def test_option_block_size_changes_the_block_grid():
    lay = layout_of((3, 5, 7), "prefix")
    q, k, v = inputs(lay, gain=2.0)
    shapes = []
    for bs in (16, 32):
        m = AdaSpaMethod(block_size=bs, backend="reference")
        run_steps(m, q, k, v, lay, 3)
        shapes.append(tuple(m.kept_blocks(LAYER).shape))
    assert shapes == [(4, 7, 7), (4, 4, 4)]


def _tiers(**cfg):
    lay = layout_of((3, 5, 7), None)
    q, k, v = inputs(lay, B=1, H=5, gain=3.0, seed=7)
    m = AdaSpaMethod(block_size=16, backend="reference", **cfg)
    run_steps(m, q, k, v, lay, 3)
    return m._states[LAYER].selection


def test_option_head_adaptive_and_recall_threshold():
    adaptive = _tiers(recall_threshold=0.01)
    assert sorted(set(adaptive.head_sparsity.flatten().tolist())) == pytest.approx([0.7, 0.8, 0.9])
    flat = _tiers(recall_threshold=0.01, head_adaptive=False)
    assert torch.allclose(flat.head_sparsity, torch.tensor(0.8))
    none_above = _tiers(recall_threshold=1.0)  # no head has recall > 1: every head at 0.8
    assert torch.allclose(none_above.head_sparsity, torch.tensor(0.8))


def test_option_min_recall_keeps_more_blocks_for_diffuse_heads():
    base = _tiers(sparsity=0.9, head_adaptive=False)
    floored = _tiers(sparsity=0.9, head_adaptive=False, min_recall=0.6)
    assert (base.recall < 0.6).any(), "the case must have a head below the floor"
    assert (floored.recall >= 0.6 - 1e-5).all()
    assert floored.keep.sum() > base.keep.sum() and (floored.keep | ~base.keep).all()  # a superset


def test_option_sparsity_sets_the_kept_fraction():
    lay = layout_of((4, 8, 8), None)  # 256 tokens = 16 blocks of 16
    q, k, v = inputs(lay, B=1, H=2, gain=2.0)
    for s, per_row in ((0.5, 8), (0.75, 4)):
        m = AdaSpaMethod(block_size=16, backend="reference", sparsity=s, head_adaptive=False)
        run_steps(m, q, k, v, lay, 3)
        assert (m.kept_blocks(LAYER).sum(-1) == per_row).all()


def test_padded_text_and_overhead_line():
    nv, nt = 35, 6
    lay = TokenLayout(nv + nt, (5, 7), text=slice(nv, nv + nt), text_lengths=(6, 3))
    q, k, v = inputs(lay)
    mask = torch.ones(2, 1, 1, nv + nt, dtype=torch.bool)
    mask[1, ..., nv + 3:] = False
    m = AdaSpaMethod(block_size=16, backend="reference", sparsity=0.0)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for step in range(4):
        out = m(q, k, v, lay, ctx_at(step), attn_mask=mask)
        assert (out - dense).abs().max().item() <= 1e-5
    assert m.kept_blocks(LAYER) is not None
    info = m.overhead()
    assert info is not None and info["search_s"] > 0 and info["sparse_calls"] == 4.0  # 2 steps x 2 length groups
    assert info["dense_attention_s"] > 0 and info["sparse_attention_s"] > 0


def test_config_is_validated():
    for bad in ({"sparsity": 1.0}, {"sparsity": -0.1}, {"block_size": 48}, {"search_at": ()}, {"search_at": (0.0,)},
                {"recall_threshold": 0}, {"head_adaptive": 1}, {"min_recall": 1.5}, {"backend": "cuda"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            get_method("adaspa", **bad)
