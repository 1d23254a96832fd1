"""Block-sparse attention kernel against the PyTorch reference and SDPA.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (set by conftest), so shapes stay tiny. Tests marked
``gpu`` run the compiled kernel on CUDA at larger sizes in bf16/fp16.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffaccel.kernels import (
    CircleMask,
    CustomMask,
    NeighborhoodMask,
    ShiftedWindowMask,
    SparseBlockMask,
    TextSpec,
    TileMask,
    block_sparse_attention,
    materialize_mask,
)
from diffaccel.kernels.reference import block_sparse_attention_reference
from diffaccel.warn import DiffAccelWarning
from kernel_helpers import DEVICE, qkv, rel_err, run

def spec_for(kind: str, text: str | None):
    t = None if text is None else TextSpec(9, text)
    if kind == "neighborhood":
        return NeighborhoodMask((7, 9), (3, 4), (2, 1), (2, 1), (False, True), text=t)
    if kind == "neighborhood_even":
        return NeighborhoodMask((7, 9), (4, 2), (3, 2), (1, 3), text=t)
    if kind == "neighborhood_3d":
        return NeighborhoodMask((3, 4, 5), (2, 3, 2), (1, 2, 2), (1, 1, 2), (True, False, False), text=t)
    if kind == "window_3d":
        return ShiftedWindowMask((3, 4, 6), (2, 3, 4), (1, 2, 5), text=t)
    if kind == "circle_1d":
        return CircleMask((40,), 3.2, text=t)
    if kind == "circle":
        return CircleMask((8, 9), 2.5, text=t)
    if kind == "tile":
        return TileMask((3, 4, 6), (1,), text=t)
    return ShiftedWindowMask((8, 10), (4, 5), (2, 3), text=t)


KINDS = ["neighborhood", "circle", "tile", "window"]


@pytest.mark.parametrize("kind", [*KINDS, "neighborhood_even", "neighborhood_3d", "window_3d", "circle_1d"])
@pytest.mark.parametrize("text", [None, "prefix", "suffix"])
def test_in_kernel_mask_equals_mask_mod(kind, text):
    """Every block partial: the kernel evaluates the element mask everywhere. With q = 0 the scores are all 0, so
    exp(LSE) counts the kept keys of each row: it must equal the mask_mod's count exactly."""
    spec = spec_for(kind, text)
    n = spec.num_tokens
    nqb, nkb = -(-n // 32), -(-n // 16)
    bm = SparseBlockMask.from_block_keep(
        torch.zeros(nqb, nkb, dtype=torch.bool), torch.ones(nqb, nkb, dtype=torch.bool), q_len=n, kv_len=n,
        q_block_size=32, kv_block_size=16, spec=spec,
    ).to(DEVICE)
    q = torch.zeros(1, 1, n, 16, device=DEVICE)
    k, v = torch.randn(1, 1, n, 16, device=DEVICE), torch.randn(1, 1, n, 16, device=DEVICE)
    out, lse = run(q, k, v, bm, return_lse=True)
    kept = spec.mask_mod(torch.tensor(0), torch.tensor(0), torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1))
    assert torch.equal(torch.exp(lse[0, 0].double().cpu()).round().long(), kept.sum(-1).long())
    expected = (kept.double() @ v[0, 0].double().cpu()) / kept.sum(-1, keepdim=True).double()
    assert rel_err(out[0, 0].cpu(), expected) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("text", [None, "prefix", "suffix"])
def test_matches_reference_per_kind(kind, text):
    spec = spec_for(kind, text)
    bm = SparseBlockMask.from_spec(spec, 32, 16, device=DEVICE)
    assert bm.num_partial > 0
    q, k, v = qkv(1, 2, spec.num_tokens, spec.num_tokens, 32)
    out, lse = run(q, k, v, bm, return_lse=True)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, bm, return_lse=True)
    assert rel_err(out, ref) < 1e-5
    assert torch.allclose(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_per_head_tile_mask():
    spec = TileMask((3, 4, 5), ((0,), (2,)), text=TextSpec(6, "suffix"))
    bm = SparseBlockMask.from_spec(spec, 16, device=DEVICE)
    assert bm.kv_num_blocks.shape[:2] == (1, 2)
    q, k, v = qkv(2, 2, spec.num_tokens, spec.num_tokens, 16)
    assert rel_err(run(q, k, v, bm), block_sparse_attention_reference(q, k, v, bm)) < 1e-5


@pytest.mark.parametrize(
    "lq,lk,d,qbs,kvbs",
    [(64, 64, 32, 32, 32), (37, 53, 16, 16, 32), (100, 45, 24, 32, 16), (1, 1, 16, 16, 16), (1, 70, 32, 16, 64),
     (50, 70, 16, 64, 64)],
)
def test_density_one_equals_sdpa(lq, lk, d, qbs, kvbs):
    q, k, v = qkv(2, 2, lq, lk, d)
    bm = SparseBlockMask.dense(lq, lk, qbs, kvbs, device=DEVICE)
    out, lse = run(q, k, v, bm, return_lse=True)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    ref_lse = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) / math.sqrt(d), dim=-1)
    assert rel_err(out, ref) < 1e-5
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)


def test_custom_scale():
    q, k, v = qkv(1, 1, 40, 40, 16)
    out = run(q, k, v, SparseBlockMask.dense(40, 40, 16, device=DEVICE), scale=0.37)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, scale=0.37)) < 1e-5


def test_empty_rows_give_zeros_and_neg_inf_lse():
    full = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    bm = SparseBlockMask.from_block_keep(full, q_len=40, kv_len=40, q_block_size=16, kv_block_size=16).to(DEVICE)
    q, k, v = qkv(1, 2, 40, 40, 16)
    out, lse = run(q, k, v, bm, return_lse=True)
    assert torch.equal(out[:, :, 16:32], torch.zeros_like(out[:, :, 16:32]))
    assert torch.isneginf(lse[:, :, 16:32]).all() and torch.isfinite(lse[:, :, :16]).all()
    assert rel_err(out, block_sparse_attention_reference(q, k, v, bm)) < 1e-5
    # A partial block whose element mask keeps nothing for some rows: those rows are empty too.
    spec = ShiftedWindowMask((4, 8), (2, 4))
    nothing = SparseBlockMask.from_block_keep(
        torch.zeros(2, 2, dtype=torch.bool), torch.tensor([[True, False], [True, False]]), q_len=32, kv_len=32,
        q_block_size=16, kv_block_size=16, spec=spec,
    ).to(DEVICE)
    out, lse = run(*qkv(1, 1, 32, 32, 16), nothing, return_lse=True)
    rows_empty = ~materialize_mask(nothing)[0, 0].any(-1).to(DEVICE)
    assert rows_empty.any()
    assert (out[0, 0, rows_empty] == 0).all() and torch.isneginf(lse[0, 0, rows_empty]).all()


def test_mask_kind_none_with_ragged_tails_and_broadcast():
    keep = torch.rand(2, 1, 3, 4) < 0.6
    keep[..., 0] = True
    bm = SparseBlockMask.from_block_keep(keep, q_len=45, kv_len=55, q_block_size=16, kv_block_size=16).to(DEVICE)
    q, k, v = qkv(2, 3, 45, 55, 16)
    assert rel_err(run(q, k, v, bm), block_sparse_attention_reference(q, k, v, bm)) < 1e-5


# Measured under the interpreter (seeds 0-2): fp16 2.4e-4, bf16 4.5e-3 relative L2 (P rounded to the input dtype).
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 6e-4), (torch.bfloat16, 9e-3)])
def test_half_precision(dtype, tol):
    spec = NeighborhoodMask((6, 8), 3, text=TextSpec(5))
    bm = SparseBlockMask.from_spec(spec, 16, device=DEVICE)
    q, k, v = qkv(1, 2, spec.num_tokens, spec.num_tokens, 32, dtype)
    out = run(q, k, v, bm)
    assert out.dtype == dtype
    assert rel_err(out, block_sparse_attention_reference(q.float(), k.float(), v.float(), bm)) < tol


def test_non_contiguous_inputs():
    # (B, N, H, D) -> (B, H, N, D) views, as diffusers produces them.
    spec = CircleMask((5, 7), 2)
    bm = SparseBlockMask.from_spec(spec, 16, device=DEVICE)
    base = torch.randn(3, 2, spec.num_tokens, 2, 16, device=DEVICE)
    q, k, v = (base[i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    assert rel_err(run(q, k, v, bm), block_sparse_attention_reference(q, k, v, bm)) < 1e-5


def test_torch_block_mask_input():
    from torch.nn.attention.flex_attention import create_block_mask

    spec = NeighborhoodMask((6, 7), (3, 3), text=TextSpec(4, "suffix"))
    n = spec.num_tokens
    flex_mask = create_block_mask(spec.mask_mod, 1, 1, n, n, device=DEVICE, BLOCK_SIZE=16)
    q, k, v = qkv(1, 1, n, n, 16)
    ref = block_sparse_attention_reference(q, k, v, SparseBlockMask.from_spec(spec, 16, device=DEVICE))
    assert rel_err(run(q, k, v, flex_mask), ref) < 1e-5
    # A BlockMask whose mask_mod is not a diffaccel spec: give the spec explicitly.
    anon = create_block_mask(lambda b, h, qi, ki: spec.mask_mod(b, h, qi, ki), 1, 1, n, n, device=DEVICE, BLOCK_SIZE=16)
    assert rel_err(run(q, k, v, anon, mask_spec=spec), ref) < 1e-5


def test_custom_mask_falls_back_to_reference_once(recwarn):
    def band(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= 3

    n = 40
    custom = SparseBlockMask.from_spec(CustomMask(band), 16, q_len=n, kv_len=n, device=DEVICE)
    q, k, v = qkv(1, 1, n, n, 16)
    with pytest.warns(DiffAccelWarning, match="custom mask_mod"):
        out = run(q, k, v, custom)
    i = torch.arange(n, device=DEVICE)
    dense_ref = F.scaled_dot_product_attention(q, k, v, attn_mask=(i[:, None] - i[None, :]).abs() <= 3)
    assert rel_err(out, dense_ref) < 1e-5
    with pytest.raises(ValueError, match="backend='triton'.*custom mask_mod"):
        block_sparse_attention(q, k, v, custom, backend="triton")


def test_cpu_without_interpreter_warns_and_uses_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv(1, 1, 20, 20, 16, device="cpu")
    bm = SparseBlockMask.dense(20, 20, 16)
    with pytest.warns(DiffAccelWarning, match="falls back to the PyTorch reference"):
        out = block_sparse_attention(q, k, v, bm, dense_fast_path=False)
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v)) < 1e-5
    with pytest.raises(ValueError, match="backend='triton' cannot run"):
        block_sparse_attention(q, k, v, bm, backend="triton")
    # Density 1 with the fast path (default): SDPA, which runs anywhere, so no fallback warning.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DiffAccelWarning)
        assert rel_err(block_sparse_attention(q, k, v, bm), F.scaled_dot_product_attention(q, k, v)) < 1e-6


def test_bad_arguments():
    q, k, v = qkv(1, 2, 32, 32, 16)
    bm = SparseBlockMask.dense(32, 32, 16, device=DEVICE)
    with pytest.raises(ValueError, match="q must be \\(batch, heads, tokens, head_dim\\)"):
        block_sparse_attention(q[0], k, v, bm)
    with pytest.raises(TypeError, match="dtype must be float16, bfloat16 or float32"):
        block_sparse_attention(q.double(), k.double(), v.double(), bm)
    with pytest.raises(TypeError, match="share one dtype"):
        block_sparse_attention(q, k.half(), v, bm)
    with pytest.raises(ValueError, match="share head_dim"):
        block_sparse_attention(q, k[..., :8], v, bm)
    with pytest.raises(ValueError, match="share batch and heads"):
        block_sparse_attention(q, k[:, :1], v[:, :1], bm)
    with pytest.raises(ValueError, match="built for q_len=32, kv_len=32"):
        block_sparse_attention(q[:, :, :20], k, v, bm)
    with pytest.raises(ValueError, match="batch/heads"):
        block_sparse_attention(q, k, v, SparseBlockMask.from_block_keep(torch.ones(3, 2, 2, dtype=torch.bool),
                               q_len=32, kv_len=32, q_block_size=16, kv_block_size=16).to(DEVICE))
    with pytest.raises(ValueError, match="scale must be"):
        block_sparse_attention(q, k, v, bm, scale=-1.0)
    with pytest.raises(TypeError, match="qk_int8 must be a bool"):
        block_sparse_attention(q, k, v, bm, qk_int8=1)
    with pytest.raises(ValueError, match="out must be"):
        block_sparse_attention(q, k, v, bm, out=torch.empty(1, device=DEVICE))
    with pytest.raises(TypeError, match="block_mask must be"):
        block_sparse_attention(q, k, v, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend must be one of"):
        block_sparse_attention(q, k, v, bm, backend="cuda")
    with pytest.raises(ValueError, match="mask_spec is only for a torch BlockMask"):
        block_sparse_attention(q, k, v, bm, mask_spec=CircleMask((4, 8), 2))
    big = torch.randn(1, 1, 16, 320, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim 320 is larger than the kernel's maximum 256"):
        block_sparse_attention(big, big, big, SparseBlockMask.dense(16, 16, 16, device=DEVICE), backend="triton")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="block_mask is on cpu but q is on meta"):
            block_sparse_attention(q.to("meta"), k.to("meta"), v.to("meta"), bm)


# --- property-based fuzzing of block masks ------------------------------------------------------------------------


@st.composite
def fuzz_cases(draw):
    kind = draw(st.sampled_from(["none", *KINDS]))
    text = draw(st.sampled_from([None, "prefix", "suffix"])) if kind != "none" else None
    qbs = draw(st.sampled_from([16, 32, 64]))
    kvbs = draw(st.sampled_from([16, 32, 64]))
    if kind == "none":
        spec = None
        lq = draw(st.integers(1, 90))
        lk = draw(st.integers(1, 90))
    else:
        t = None if text is None else TextSpec(draw(st.integers(1, 12)), text)
        h, w = draw(st.integers(2, 8)), draw(st.integers(2, 9))
        if kind == "neighborhood":
            ks = (draw(st.integers(1, h)), draw(st.integers(1, w)))
            spec = NeighborhoodMask(
                (h, w), ks, (draw(st.integers(1, ks[0])), draw(st.integers(1, ks[1]))), 1,
                (draw(st.booleans()), draw(st.booleans())), text=t,
            )
        elif kind == "circle":
            spec = CircleMask((h, w), draw(st.floats(0.5, 4.0)), text=t)
        elif kind == "tile":
            spec = TileMask((h, w), tuple(draw(st.sets(st.integers(0, h - 1), max_size=2))), text=t)
        else:
            spec = ShiftedWindowMask((h, w), (draw(st.integers(1, h)), draw(st.integers(1, w))),
                                     (draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))), text=t)
        lq = lk = spec.num_tokens
    b, hh = draw(st.sampled_from([(1, 1), (1, 2), (2, 2)]))
    mb, mh = draw(st.sampled_from([(1, 1), (b, 1), (1, hh), (b, hh)]))
    seed = draw(st.integers(0, 2**31 - 1))
    return spec, lq, lk, qbs, kvbs, b, hh, mb, mh, seed


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_cases())
def test_fuzz_block_masks_against_reference(case):
    spec, lq, lk, qbs, kvbs, b, h, mb, mh, seed = case
    gen = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-lq // qbs), -(-lk // kvbs)
    if spec is None:
        r = torch.rand(mb, mh, nqb, nkb, generator=gen)
        bm = SparseBlockMask.from_block_keep(r < 0.4, r > 0.7, q_len=lq, kv_len=lk, q_block_size=qbs,
                                             kv_block_size=kvbs)
    else:
        keep = torch.rand(mb, mh, nqb, nkb, generator=gen) < 0.7
        bm = SparseBlockMask.from_spec(spec, qbs, kvbs, block_keep=keep)
    bm = bm.to(DEVICE)
    q = torch.randn(b, h, lq, 16, generator=gen).to(DEVICE)
    k = torch.randn(b, h, lk, 16, generator=gen).to(DEVICE)
    v = torch.randn(b, h, lk, 16, generator=gen).to(DEVICE)
    out, lse = run(q, k, v, bm, return_lse=True)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, bm, return_lse=True)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)


# --- GPU (compiled kernel) ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_matches_fp32_reference(dtype, d, kind):
    text = TextSpec(77, "prefix")
    specs = {
        "neighborhood": NeighborhoodMask((24, 40), (8, 16), (8, 8), text=text),
        "circle": CircleMask((24, 40), 6.0, text=text),
        "tile": TileMask((4, 12, 20), (0,), text=text),
        "window": ShiftedWindowMask((24, 40), (12, 20), (3, 5), text=text),
    }
    spec = specs[kind]
    for qbs in (64, 128):
        bm = SparseBlockMask.from_spec(spec, qbs, 64, device="cuda")
        q, k, v = qkv(2, 3, spec.num_tokens, spec.num_tokens, d, dtype, "cuda")
        out, lse = run(q, k, v, bm, return_lse=True)
        ref, ref_lse = block_sparse_attention_reference(q.float(), k.float(), v.float(), bm, return_lse=True)
        # bf16 measured 2.2-2.3e-3 relative L2 on an H100 (benchmarks/NOTES-kernels-gpu.md); fp16 has 3 more
        # mantissa bits (interpreter: 2.4e-4). The LSE sees the same bf16/fp16 inputs with fp32 logits in both:
        # only fp32 summation order differs (~1e-5), so 1e-3 catches a 0.1 % logit-scale error.
        assert rel_err(out, ref) < (6e-3 if dtype == torch.bfloat16 else 1.5e-3)
        assert torch.allclose(lse, ref_lse, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_dense_equals_sdpa_ragged(dtype):
    q, k, v = qkv(1, 4, 1000, 1531, 128, dtype, "cuda")
    out = run(q, k, v, SparseBlockMask.dense(1000, 1531, 128, device="cuda"))  # Triton (dense_fast_path off)
    assert rel_err(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float())) < (
        6e-3 if dtype == torch.bfloat16 else 1.5e-3)  # see test_gpu_matches_fp32_reference


@pytest.mark.gpu
def test_gpu_matches_compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    spec = NeighborhoodMask((32, 48), (13, 17), (1, 1), text=TextSpec(100, "prefix"))
    bm = SparseBlockMask.from_spec(spec, 128, device="cuda")
    q, k, v = qkv(1, 4, spec.num_tokens, spec.num_tokens, 64, torch.bfloat16, "cuda")
    flex = torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=bm.to_block_mask())
    out = run(q, k, v, bm)
    assert rel_err(out, flex) < 6e-3  # two bf16 kernels, each ~2.3e-3 from fp32


@pytest.mark.gpu
@pytest.mark.parametrize("pv_int8", [False, True])
def test_gpu_int8_error_bound(pv_int8):
    spec = NeighborhoodMask((32, 48), (16, 16), (8, 8), text=TextSpec(64, "prefix"))
    bm = SparseBlockMask.from_spec(spec, 64, device="cuda")
    q, k, v = qkv(2, 4, spec.num_tokens, spec.num_tokens, 128, torch.bfloat16, "cuda")
    k[..., :4] += 8.0  # outlier channels, removed by K smoothing
    out, lse = run(q, k, v, bm, qk_int8=True, pv_int8=pv_int8, return_lse=True)
    ref, ref_lse = block_sparse_attention_reference(q.float(), k.float(), v.float(), bm, return_lse=True)
    # INT8 P with the fixed scale 127 (PARO) costs ~2-3.5e-2 on flat random-input attention maps; see kernel_gpu.md.
    assert rel_err(out, ref) <= (4e-2 if pv_int8 else 2e-2)
    assert torch.allclose(lse, ref_lse, atol=5e-2)


def test_torch_block_mask_is_converted_once_and_again_after_an_in_place_change():
    """A torch BlockMask input is validated and converted on its first call only (the conversion reads device
    values); modifying its block tensors in place invalidates the memo, and results follow the new blocks."""
    from diffaccel.kernels.dispatch import _as_sparse_block_mask

    n, block = 64, 16
    spec = CircleMask((8, 8), 8)  # near block pairs full, far ones partial
    fbm = SparseBlockMask.from_spec(spec, block).to_block_mask()
    first = _as_sparse_block_mask(fbm, None)
    assert first.num_full > 0 and first.num_partial > 0 and first.spec == spec
    assert _as_sparse_block_mask(fbm, None) is first
    assert _as_sparse_block_mask(fbm, CircleMask((8, 8), 2)) is not first  # another spec: converted again
    q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
    before = block_sparse_attention(q, k, v, fbm, backend="reference")
    fbm.full_kv_num_blocks.zero_()  # drop every full block
    again = _as_sparse_block_mask(fbm, None)
    assert again is not first and again.num_full == 0
    after = block_sparse_attention(q, k, v, fbm, backend="reference")
    assert not torch.allclose(before, after)
    ref = block_sparse_attention_reference(q, k, v, again, scale=1 / 4)
    torch.testing.assert_close(after, ref)
