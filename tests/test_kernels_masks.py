"""Mask specs (semantics against independent constructions), block classification, SparseBlockMask, BlockMask interop.

Pure torch: no kernel runs here.
"""

from __future__ import annotations

import itertools
import math
import pickle

import pytest
import torch

from diffaccel.kernels import (
    CircleMask,
    CustomMask,
    NeighborhoodMask,
    ShiftedWindowMask,
    SparseBlockMask,
    TextSpec,
    TileMask,
    classify_blocks,
    materialize_mask,
)


def dense_mask(spec, heads: int = 1) -> torch.Tensor:
    """``spec.mask_mod`` on every (query, key) pair: ``(heads, n, n)`` bool."""
    n = spec.num_tokens
    h = torch.arange(heads).view(-1, 1, 1)
    return spec.mask_mod(torch.tensor(0), h, torch.arange(n).view(1, -1, 1), torch.arange(n).view(1, 1, -1)).expand(
        heads, n, n
    )


# --- NATTEN semantics, from the definition in research/locality.md §1.2, written per query with Python sets ------


from natten_rules import natten_axis as natten_keys_1d  # noqa: E402  (the one hand-written NATTEN definition)


@pytest.mark.parametrize(
    "n,k,s,d,causal",
    [(13, 5, 1, 1, False), (13, 4, 2, 1, False), (13, 4, 4, 1, False), (17, 3, 2, 2, False), (16, 4, 3, 3, False),
     (13, 5, 1, 1, True), (13, 4, 3, 1, True), (17, 3, 2, 2, True), (7, 7, 7, 1, False), (10, 1, 1, 1, False)],
)
def test_neighborhood_1d_matches_natten_definition(n, k, s, d, causal):
    spec = NeighborhoodMask((n,), k, s, d, causal)
    m = dense_mask(spec)[0]
    for x in range(n):
        got = set(torch.nonzero(m[x]).flatten().tolist())
        assert got == natten_keys_1d(n, k, s, d, causal, x), (x, got)


def test_neighborhood_properties():
    # Non-causal: every query sees exactly prod(kernel_size) keys (windows slide inward at borders).
    spec = NeighborhoodMask((9, 11), (4, 5), (2, 3), (2, 1))
    assert (dense_mask(spec)[0].sum(-1) == 20).all()
    # Stride 1, no dilation: an interior query's window is centered on it (odd k).
    spec = NeighborhoodMask((15,), 5)
    assert dense_mask(spec)[0][7].nonzero().flatten().tolist() == [5, 6, 7, 8, 9]
    # stride == kernel_size divides the grid: blocked attention (each tile attends to itself).
    spec = NeighborhoodMask((12,), 4, 4)
    tiles = torch.arange(12) // 4
    assert torch.equal(dense_mask(spec)[0], tiles[:, None] == tiles[None, :])
    # Causal, stride 1: keys x-k+1 .. x.
    spec = NeighborhoodMask((10,), 3, is_causal=True)
    x = torch.arange(10)
    assert torch.equal(dense_mask(spec)[0], (x[None, :] <= x[:, None]) & (x[None, :] > x[:, None] - 3))


def test_neighborhood_is_and_over_dimensions():
    grid, ks, st, dl, ca = (6, 7, 5), (3, 4, 2), (1, 2, 2), (2, 1, 1), (False, True, False)
    spec = NeighborhoodMask(grid, ks, st, dl, ca)
    m = dense_mask(spec)[0]
    coords = list(itertools.product(*(range(g) for g in grid)))
    for qi in [0, 17, 100, len(coords) - 1]:
        expected = set()
        per = [natten_keys_1d(g, k, s, d, c, x) for g, k, s, d, c, x in zip(grid, ks, st, dl, ca, coords[qi])]
        for ki, kc in enumerate(coords):
            if all(kc[i] in per[i] for i in range(3)):
                expected.add(ki)
        assert set(m[qi].nonzero().flatten().tolist()) == expected


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(grid=(8, 8), kernel_size=(9, 3)), "kernel_size \\* dilation"),
        (dict(grid=(8, 8), kernel_size=3, dilation=3), "kernel_size \\* dilation"),
        (dict(grid=(8, 8), kernel_size=3, stride=4), "stride"),
        (dict(grid=(8, 8), kernel_size=0), "kernel_size"),
        (dict(grid=(8, 8), kernel_size=(3, 3, 3)), "one entry per grid dimension"),
        (dict(grid=(8, 8, 8, 8), kernel_size=3), "grid"),
        (dict(grid=(8, 0), kernel_size=1), "grid"),
    ],
)
def test_neighborhood_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeighborhoodMask(**kwargs)


def test_neighborhood_rejects_wrong_types():
    with pytest.raises(TypeError, match="is_causal"):
        NeighborhoodMask((8,), 3, is_causal=1)
    with pytest.raises(TypeError, match="kernel_size"):
        NeighborhoodMask((8,), 3.0)


# --- CLEAR, MSW-MSA, Efficient-vDiT ------------------------------------------------------------------------------


def test_circle_counts_and_borders():
    spec = CircleMask((21, 21), 8)
    m = dense_mask(spec)[0]
    assert int(m[10 * 21 + 10].sum()) == 193  # lattice points with dx^2 + dy^2 < 64 (CLEAR r=8)
    assert int(m[0].sum()) < 193  # not clamped at borders
    spec = CircleMask((9, 9), 2.5)  # d^2 < 6.25 keeps d^2 <= 6
    assert spec.max_sq_dist == 6
    c = torch.tensor(list(itertools.product(range(9), range(9))))
    d2 = ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    assert torch.equal(dense_mask(spec)[0], d2 < 6.25)
    with pytest.raises(ValueError, match="radius"):
        CircleMask((9, 9), 0)


@pytest.mark.parametrize(
    "grid,window,shift", [((8, 10), (4, 5), (1, 2)), ((6, 6), (3, 3), (0, 0)), ((7, 9), (4, 5), (3, 2))]
)
def test_shifted_window_matches_roll_and_partition(grid, window, shift):
    spec = ShiftedWindowMask(grid, window, shift)
    H, W = grid
    rolled = torch.roll(torch.arange(H * W).view(H, W), shifts=(-shift[0], -shift[1]), dims=(0, 1))
    expected = torch.zeros(H * W, H * W, dtype=torch.bool)
    for a in range(0, H, window[0]):
        for b in range(0, W, window[1]):
            members = rolled[a : a + window[0], b : b + window[1]].flatten()
            expected[members[:, None], members[None, :]] = True
    assert torch.equal(dense_mask(spec)[0], expected)


def test_shifted_window_rejects_bad_parameters():
    with pytest.raises(ValueError, match="window"):
        ShiftedWindowMask((8, 8), (9, 4))
    with pytest.raises(ValueError, match="shift"):
        ShiftedWindowMask((8, 8), 4, (8, 0))


def test_tile_mask_definition_and_per_head():
    grid = (4, 2, 3)
    per_frame = 6
    spec = TileMask(grid, (1,))
    f = torch.arange(24) // per_frame
    g = f == 1
    expected = (f[:, None] == f[None, :]) | g[:, None] | g[None, :]
    assert torch.equal(dense_mask(spec)[0], expected)
    spec2 = TileMask(grid, ((1,), (0, 3)))
    assert spec2.num_mask_heads == 2
    m = dense_mask(spec2, heads=2)
    assert torch.equal(m[0], expected)
    g2 = (f == 0) | (f == 3)
    assert torch.equal(m[1], (f[:, None] == f[None, :]) | g2[:, None] | g2[None, :])
    with pytest.raises(ValueError, match="global_frames"):
        TileMask(grid, (4,))


def test_tile_mask_mod_traces_without_cached_calls():
    """torch.compile (as FlexAttention compiles mask_mods) traces the attention-tile mask_mod in one graph, reading
    its frame table as a captured tensor rather than through the lru_cache'd table builder; same values."""
    import warnings

    spec = TileMask((4, 2, 3), ((1,), (0, 3)), text=TextSpec(5, "prefix"))
    eager = dense_mask(spec, heads=2)  # first eager use on the CPU fills the table
    n = spec.num_tokens
    compiled = torch.compile(spec.mask_mod, backend="eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = compiled(torch.tensor(0), torch.arange(2).view(2, 1, 1), torch.arange(n).view(1, -1, 1),
                       torch.arange(n).view(1, 1, -1))
    assert torch.equal(got, eager)
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    assert pickle.loads(pickle.dumps(spec)) == spec


@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_text_rows_and_columns_are_dense(position):
    base = NeighborhoodMask((5, 6), 3)
    spec = NeighborhoodMask((5, 6), 3, text=TextSpec(7, position))
    m = dense_mask(spec)[0]
    vis = slice(7, 37) if position == "prefix" else slice(0, 30)
    txt = slice(0, 7) if position == "prefix" else slice(30, 37)
    assert m[txt].all() and m[:, txt].all()
    assert torch.equal(m[vis, vis], dense_mask(base)[0])
    with pytest.raises(ValueError, match="position"):
        TextSpec(3, "middle")


def test_specs_hash_pickle_and_mask_mod_is_a_plain_function():
    spec = CircleMask((5, 5), 2, text=TextSpec(3))
    assert spec.mask_mod.__code__.co_argcount == 4  # FlexAttention tells mask_mod from score_mod by arity
    same = pickle.loads(pickle.dumps(spec))
    assert same == spec and hash(same) == hash(spec)
    assert NeighborhoodMask([4, 4], 2) == NeighborhoodMask((4, 4), (2, 2), 1, 1, False)


# --- block classification and SparseBlockMask --------------------------------------------------------------------

SPECS = [
    NeighborhoodMask((9, 10), (4, 3), (2, 1), (1, 2), (False, True), text=TextSpec(5, "prefix")),
    CircleMask((7, 11), 3, text=TextSpec(9, "suffix")),
    TileMask((3, 4, 5), (2,)),
    ShiftedWindowMask((8, 9), (4, 5), (1, 3)),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("qbs,kvbs", [(16, 16), (32, 16)])
def test_classification_is_exact(spec, qbs, kvbs):
    full, partial = classify_blocks(spec, spec.num_tokens, spec.num_tokens, qbs, kvbs)
    m = dense_mask(spec)[0]
    n = spec.num_tokens
    for qb in range(full.shape[1]):
        for kb in range(full.shape[2]):
            tile = m[qb * qbs : min(n, (qb + 1) * qbs), kb * kvbs : min(n, (kb + 1) * kvbs)]
            assert bool(full[0, qb, kb]) == bool(tile.all())
            assert bool(partial[0, qb, kb]) == bool(tile.any() and not tile.all())
    bm = SparseBlockMask.from_spec(spec, qbs, kvbs)
    assert torch.equal(materialize_mask(bm)[0, 0], m)
    assert 0 < bm.density <= 1


def test_from_spec_with_block_keep_intersects():
    spec = SPECS[0]
    bm = SparseBlockMask.from_spec(spec, 16)
    keep = torch.rand(1, 2, bm.num_q_blocks, bm.num_kv_blocks) < 0.5
    sub = SparseBlockMask.from_spec(spec, 16, block_keep=keep)
    full, partial = bm.block_keep()
    f2, p2 = sub.block_keep()
    assert torch.equal(f2, full & keep) and torch.equal(p2, partial & keep)
    assert sub.kv_num_blocks.shape[:2] == (1, 2)


def test_dense_and_from_block_keep_indices():
    bm = SparseBlockMask.dense(40, 70, 16, 32)
    assert bm.full_kv_num_blocks.tolist() == [[[3, 3, 3]]] and bm.num_partial == 0 and bm.density == 1.0
    full = torch.tensor([[True, False, True], [False, False, False]])
    bm = SparseBlockMask.from_block_keep(full, q_len=20, kv_len=40, q_block_size=16, kv_block_size=16)
    assert bm.full_kv_num_blocks.tolist() == [[[2, 0]]]
    assert bm.full_kv_indices[0, 0, 0, :2].tolist() == [0, 2]


def test_sparse_block_mask_rejects_bad_structures():
    num = torch.zeros(1, 1, 2, dtype=torch.int32)
    idx = torch.zeros(1, 1, 2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="shapes do not match"):
        SparseBlockMask(num, idx, None, None, q_len=40, kv_len=40, q_block_size=16, kv_block_size=16)
    with pytest.raises(ValueError, match="power of two"):
        SparseBlockMask(num, idx, None, None, q_len=32, kv_len=48, q_block_size=16, kv_block_size=24)
    with pytest.raises(ValueError, match="kv_num_blocks must be in"):
        SparseBlockMask(num + 4, idx, None, None, q_len=32, kv_len=48, q_block_size=16, kv_block_size=16)
    bad = idx.clone()
    bad[..., 0] = 7
    with pytest.raises(ValueError, match="kv_indices"):
        SparseBlockMask(num + 1, bad, None, None, q_len=32, kv_len=48, q_block_size=16, kv_block_size=16)
    with pytest.raises(ValueError, match="listed twice"):
        SparseBlockMask(num + 1, idx, num + 1, idx, q_len=32, kv_len=48, q_block_size=16, kv_block_size=16)
    with pytest.raises(ValueError, match="integer tensor"):
        SparseBlockMask(num.float(), idx, None, None, q_len=32, kv_len=48, q_block_size=16, kv_block_size=16)
    with pytest.raises(ValueError, match="describes"):
        SparseBlockMask.from_spec(SPECS[2], 16, q_len=10)
    with pytest.raises(ValueError, match="describes 60 tokens"):
        SparseBlockMask(num, idx, None, None, q_len=32, kv_len=48, q_block_size=16, kv_block_size=16, spec=SPECS[2])


# --- FlexAttention BlockMask interop ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: type(s).__name__)
def test_block_mask_round_trip(spec):
    from torch.nn.attention.flex_attention import create_block_mask

    n = spec.num_tokens
    ours = SparseBlockMask.from_spec(spec, 32)
    theirs = create_block_mask(spec.mask_mod, 1, 1, n, n, device="cpu", BLOCK_SIZE=32)
    back = ours.to_block_mask()
    # Same block structure as create_block_mask (tail blocks listed partial there), same kept elements.
    assert torch.equal(back.kv_num_blocks, theirs.kv_num_blocks)
    assert torch.equal(back.full_kv_num_blocks, theirs.full_kv_num_blocks)
    converted = SparseBlockMask.from_block_mask(theirs)
    assert converted.spec is spec
    assert torch.equal(materialize_mask(converted), materialize_mask(ours))


def test_block_mask_with_unknown_mask_mod_becomes_custom():
    from torch.nn.attention.flex_attention import create_block_mask

    def band(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= 5

    bm = create_block_mask(band, 1, 1, 50, 50, device="cpu", BLOCK_SIZE=16)
    conv = SparseBlockMask.from_block_mask(bm)
    assert isinstance(conv.spec, CustomMask)
    q = torch.arange(50)
    assert torch.equal(materialize_mask(conv)[0, 0], (q[:, None] - q[None, :]).abs() <= 5)
    # An explicit spec wins over the BlockMask's own mask_mod.
    spec = NeighborhoodMask((50,), 11)
    bm2 = create_block_mask(spec.mask_mod, 1, 1, 50, 50, device="cpu", BLOCK_SIZE=16)
    assert SparseBlockMask.from_block_mask(bm2, spec=spec).spec is spec


def test_classification_memory_chunks_agree(monkeypatch):
    import diffaccel.kernels.masks.block_mask as masks

    spec = NeighborhoodMask((12, 12), 5, text=TextSpec(4))
    full, partial = classify_blocks(spec, spec.num_tokens, spec.num_tokens, 16, 16)
    masks._classify_cached.cache_clear()
    monkeypatch.setattr(masks, "_CLASSIFY_CHUNK_ELEMENTS", 1)  # one query block per chunk
    f2, p2 = classify_blocks(spec, spec.num_tokens, spec.num_tokens, 16, 16)
    masks._classify_cached.cache_clear()
    assert torch.equal(full, f2) and torch.equal(partial, p2)
    assert math.isclose(float(full.float().mean() + partial.float().mean()),
                        SparseBlockMask.from_spec(spec, 16).density, abs_tol=1e-6)
