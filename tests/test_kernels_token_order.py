"""Token order inside the Triton kernel (gathered Q/K/V loads, scattered O/LSE stores) against the reference.

The oracle is the PyTorch reference on main: gather q, k, v into kernel order (``gather_tokens``), attend with the
block mask in kernel order and element masks at sequence positions (``materialize_mask(bm, token_order=...)``),
scatter the output back (``scatter_tokens``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffaccel.kernels import (
    CircleMask,
    NeighborhoodMask,
    ShiftedWindowMask,
    SparseBlockMask,
    TextSpec,
    TileMask,
    block_sparse_attention,
    block_sparse_attention_unchecked,
)
from diffaccel.kernels.reference import block_sparse_attention_reference, gather_tokens, scatter_tokens
from kernel_helpers import DEVICE, bias, qkv, rel_err, run

# Odd and prime sizes: 5x7 grid + 6 text = 41 tokens (prime), 3x4x5 + 0 = 60, 7x9 + 9 = 72 with 16/32 blocks.
SPECS = {
    "neighborhood": NeighborhoodMask((5, 7), (3, 3), (1, 2), text=TextSpec(6, "prefix")),
    "neighborhood_dil_3d": NeighborhoodMask((3, 4, 5), (2, 2, 2), (1, 1, 2), (1, 2, 2), (True, False, False)),
    "circle": CircleMask((5, 7), 2.2, text=TextSpec(6, "suffix")),
    "tile": TileMask((3, 4, 5), ((0,), (2,)), text=TextSpec(5, "prefix")),
    "window": ShiftedWindowMask((7, 9), (4, 5), (2, 3), text=TextSpec(9, "suffix")),
}


def _orders(n: int, heads: int, per_head: bool, gen: torch.Generator) -> torch.Tensor:
    if per_head:
        return torch.stack([torch.randperm(n, generator=gen) for _ in range(heads)]).to(DEVICE)
    return torch.randperm(n, generator=gen).to(DEVICE)


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("per_head", [False, True])
def test_order_matches_reference_partial_blocks(kind, per_head):
    """Every block partial, random (per-head) orders: element masks are evaluated on the gathered positions."""
    spec = SPECS[kind]
    n, heads = spec.num_tokens, 2
    gen = torch.Generator().manual_seed(n + per_head)
    nqb, nkb = -(-n // 16), -(-n // 16)
    keep = torch.rand(1, heads if per_head else 1, nqb, nkb, generator=gen) < 0.8
    bm = SparseBlockMask.from_block_keep(torch.zeros_like(keep), keep, q_len=n, kv_len=n, q_block_size=16,
                                         kv_block_size=16, spec=spec).to(DEVICE)
    order = _orders(n, heads, per_head, gen)
    q, k, v = qkv(2, heads, n, n, 16)
    out, lse = run(q, k, v, bm, token_order=order, return_lse=True)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, bm, token_order=order, return_lse=True)
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)  # fp32 LSE: ~1e-6 measured
    # The order matters: without it the same block mask gives another result (the comparison can fail).
    assert rel_err(block_sparse_attention_reference(q, k, v, bm, return_lse=False), ref) > 1e-2


def test_order_is_the_gathered_computation():
    """Definition check independent of the reference's order path: gather, attend in kernel order, scatter."""
    spec = SPECS["circle"]
    n = spec.num_tokens
    order = torch.randperm(n).to(DEVICE)
    # A spec-free block mask (element mask = keep all) with partial and full blocks and empty pairs.
    keep = torch.rand(1, 1, 3, 3) < 0.6
    keep[..., 0, 0] = True
    bm = SparseBlockMask.from_block_keep(keep, torch.rand(1, 1, 3, 3) < 0.5, q_len=n, kv_len=n, q_block_size=16,
                                         kv_block_size=16).to(DEVICE)
    q, k, v = qkv(1, 3, n, n, 24)
    out = run(q, k, v, bm, token_order=order)
    gathered = block_sparse_attention_reference(gather_tokens(q, order), gather_tokens(k, order),
                                                gather_tokens(v, order), bm)
    assert rel_err(out, scatter_tokens(gathered, order)) < 1e-5


@pytest.mark.parametrize("n,qbs,kvbs", [(37, 16, 16), (64, 32, 16), (53, 16, 32), (1, 16, 16)])
def test_order_full_blocks_ragged_lengths(n, qbs, kvbs):
    """Full blocks only (no element mask), ragged tails, int64 orders, non-contiguous q/k/v."""
    gen = torch.Generator().manual_seed(n)
    nqb, nkb = -(-n // qbs), -(-n // kvbs)
    keep = torch.rand(1, 2, nqb, nkb, generator=gen) < 0.6
    keep[..., -1] = True  # the ragged last key block is visited
    bm = SparseBlockMask.from_block_keep(keep, q_len=n, kv_len=n, q_block_size=qbs, kv_block_size=kvbs).to(DEVICE)
    order = torch.stack([torch.randperm(n, generator=gen), torch.randperm(n, generator=gen)]).to(DEVICE)
    base = torch.randn(3, 2, n, 2, 16, device=DEVICE)
    q, k, v = (base[i].transpose(1, 2) for i in range(3))
    out, lse = run(q, k, v, bm, token_order=order, return_lse=True)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, bm, token_order=order, return_lse=True)
    assert rel_err(out, ref) < 1e-5
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)


def test_identity_order_equals_no_order_and_half_precision():
    spec = SPECS["neighborhood"]
    n = spec.num_tokens
    bm = SparseBlockMask.from_spec(spec, 16, device=DEVICE)
    q, k, v = qkv(1, 2, n, n, 32, torch.bfloat16)
    plain = run(q, k, v, bm)
    ident = run(q, k, v, bm, token_order=torch.arange(n, device=DEVICE))
    assert torch.equal(plain, ident)
    order = torch.randperm(n).to(DEVICE)
    out = run(q, k, v, bm, token_order=order)
    ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), bm, token_order=order)
    # bf16 under the interpreter: measured 2.4e-3 relative L2 (inputs and P rounded to bf16).
    assert rel_err(out, ref) < 6e-3


@pytest.mark.parametrize("pv_int8", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
def test_order_with_int8_matches_int8_reference(pv_int8, per_head):
    """INT8 with an order: Q/K quantized in kernel order (kernel-order blocks), as the reference defines it."""
    spec = SPECS["window"]
    n = spec.num_tokens
    bm = SparseBlockMask.from_spec(spec, 16, 32, device=DEVICE)
    order = _orders(n, 2, per_head, torch.Generator().manual_seed(3))
    q, k, v = qkv(1, 2, n, n, 32)
    k[..., :4] += 6.0
    out, lse = run(q, k, v, bm, token_order=order, qk_int8=True, pv_int8=pv_int8, return_lse=True)
    sim, sim_lse = block_sparse_attention_reference(q, k, v, bm, token_order=order, qk_int8=True, pv_int8=pv_int8,
                                                    return_lse=True)
    exact = block_sparse_attention_reference(q, k, v, bm, token_order=order)
    # Same quantized operands (kernel-order blocks): float rounding and rare ties only. With INT8 P the reference
    # rounds P against the final row max, the kernel against the running one.
    assert rel_err(out, sim) < (1.5e-2 if pv_int8 else 1e-3)
    assert rel_err(out, exact) < (4e-2 if pv_int8 else 2e-2)
    assert torch.allclose(lse, sim_lse, atol=1e-3)
    # Unbiased: mean signed error relative to mean |ref| within 2e-3 of 0.
    assert abs(bias(out, exact)) < 2e-3


def test_int8_order_is_quantization_in_kernel_order():
    """Definition check for INT8 with an order (no element mask involved): gather, quantize and attend in kernel
    order, scatter back. Rows with large norms make per-block scales depend on which rows share a block."""
    n = 45
    keep = torch.rand(1, 1, 3, 3) < 0.6
    keep[..., 0] = True
    bm = SparseBlockMask.from_block_keep(keep, torch.rand(1, 1, 3, 3) < 0.5, q_len=n, kv_len=n, q_block_size=16,
                                         kv_block_size=16).to(DEVICE)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    q, k, v = qkv(1, 2, n, n, 32)
    q[:, :, ::7] *= 20
    k[:, :, ::5] *= 20
    definition = scatter_tokens(block_sparse_attention_reference(
        gather_tokens(q, order), gather_tokens(k, order), gather_tokens(v, order), bm, qk_int8=True), order)
    assert rel_err(block_sparse_attention_reference(q, k, v, bm, token_order=order, qk_int8=True), definition) < 1e-6
    out = run(q, k, v, bm, token_order=order, qk_int8=True)
    assert rel_err(out, definition) < 1e-3
    # Control: sequence-order blocks would give other scales, so the bound above can fail.
    seq_blocks = block_sparse_attention_reference(q, k, v, bm, qk_int8=True)
    seq_exact = block_sparse_attention_reference(q, k, v, bm)
    in_kernel_order = scatter_tokens(block_sparse_attention_reference(
        gather_tokens(q, order), gather_tokens(k, order), gather_tokens(v, order), bm), order)
    assert rel_err(seq_blocks, seq_exact) != pytest.approx(rel_err(definition, in_kernel_order), rel=1e-3)


def test_order_validation():
    q, k, v = qkv(1, 2, 32, 32, 16)
    bm = SparseBlockMask.dense(32, 32, 16, device=DEVICE)
    good = torch.randperm(32).to(DEVICE)
    with pytest.raises(TypeError, match="token_order must be an integer tensor"):
        block_sparse_attention(q, k, v, bm, token_order=good.float())
    with pytest.raises(ValueError, match=r"token_order must have shape \(32,\) or \(2, 32\)"):
        block_sparse_attention(q, k, v, bm, token_order=good[:31])
    with pytest.raises(ValueError, match="permutation of 0..31"):
        block_sparse_attention(q, k, v, bm, token_order=torch.zeros(32, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="permutation"):
        block_sparse_attention(q, k, v, bm, token_order=torch.stack([good, good.clamp(max=30)]))
    with pytest.raises(ValueError, match="q_len == kv_len"):
        block_sparse_attention(q[:, :, :16], k, v, SparseBlockMask.dense(16, 32, 16, device=DEVICE),
                               token_order=good)


# --- density 1: SDPA ------------------------------------------------------------------------------------------------


def test_dense_fast_path_calls_sdpa_and_can_be_turned_off(monkeypatch):
    import diffaccel.kernels.dispatch as dispatch

    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("scale"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch.F, "scaled_dot_product_attention", spy)
    q, k, v = qkv(1, 2, 40, 40, 16)
    bm = SparseBlockMask.dense(40, 40, 16, device=DEVICE)
    order = torch.randperm(40).to(DEVICE)
    expected = real(q.double(), k.double(), v.double(), scale=0.3)
    out = torch.full_like(q, float("nan"))
    assert block_sparse_attention(q, k, v, bm, scale=0.3, token_order=order, out=out) is out
    assert calls == [0.3]  # the order does not matter at density 1: SDPA on the original tensors
    assert rel_err(out, expected) < 1e-6
    # Not taken: forced off, an LSE request, INT8, backend="triton", or a block missing.
    sparse = SparseBlockMask.from_block_keep(torch.eye(3, dtype=torch.bool) | True, q_len=40, kv_len=40,
                                             q_block_size=16, kv_block_size=16).to(DEVICE)
    for kw in ({"dense_fast_path": False}, {"return_lse": True}, {"qk_int8": True}, {"backend": "triton"}):
        res = block_sparse_attention(q, k, v, bm, scale=0.3, **kw)
        res = res[0] if kw.get("return_lse") else res
        assert rel_err(res, expected) < (2e-2 if kw.get("qk_int8") else 1e-5)
    assert sparse.num_full == 9  # all-true from_block_keep is dense too
    block_sparse_attention(q, k, v, sparse, scale=0.3)
    assert calls == [0.3, 0.3]
    missing = SparseBlockMask.from_block_keep(~torch.eye(3, dtype=torch.bool), q_len=40, kv_len=40, q_block_size=16,
                                              kv_block_size=16).to(DEVICE)
    block_sparse_attention(q, k, v, missing, scale=0.3)
    assert calls == [0.3, 0.3]


# --- host path: unchecked entry, unvalidated masks ------------------------------------------------------------------


def test_unchecked_entry_skips_checks_and_matches_checked(monkeypatch):
    import diffaccel.kernels.dispatch as dispatch

    spec = SPECS["circle"]
    n = spec.num_tokens
    bm = SparseBlockMask.from_spec(spec, 16, device=DEVICE)
    q, k, v = qkv(1, 2, n, n, 16)
    order = torch.randperm(n).to(DEVICE).to(torch.int32)
    checked = block_sparse_attention(q, k, v, bm, token_order=order)

    def boom(*args, **kwargs):
        raise AssertionError("the unchecked entry validated its arguments")

    monkeypatch.setattr(dispatch, "_check_qkv", boom)
    monkeypatch.setattr(dispatch, "_check_mask", boom)
    monkeypatch.setattr(dispatch, "_check_token_order", boom)
    out = block_sparse_attention_unchecked(q, k, v, bm, token_order=order)
    assert torch.equal(out, checked)
    with pytest.raises(AssertionError, match="validated"):
        block_sparse_attention(q, k, v, bm)


def test_unvalidated_masks_give_the_same_results_without_host_reads(monkeypatch):
    spec = SPECS["neighborhood"]
    n = spec.num_tokens
    gen = torch.Generator().manual_seed(5)
    sel = torch.rand(1, 2, 3, 3, generator=gen) < 0.7
    checked = SparseBlockMask.from_spec(spec, 16, block_keep=sel, device=DEVICE)
    # No tensor value is read on the host while building an unvalidated mask (each read is a sync on CUDA).
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **kw):
            reads.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    fast = SparseBlockMask.from_spec(spec, 16, block_keep=sel, device=DEVICE, validate=False)
    keep_only = SparseBlockMask.from_block_keep(sel, q_len=n, kv_len=n, q_block_size=16, kv_block_size=16,
                                                validate=False)
    assert reads == []
    assert fast.may_have_partial and not keep_only.may_have_partial and not fast.known_dense
    monkeypatch.undo()
    assert fast.num_partial == checked.num_partial and fast.num_full == checked.num_full
    q, k, v = qkv(1, 2, n, n, 16)
    assert torch.equal(run(q, k, v, fast), run(q, k, v, checked))
    assert rel_err(run(q, k, v, keep_only.to(DEVICE)), block_sparse_attention_reference(q, k, v, keep_only)) < 1e-5
    # Validation still catches bad structures when asked (the default).
    idx = checked.kv_indices.clone()
    idx[..., 0] = 99
    with pytest.raises(ValueError, match="kv_indices must be key block indices"):
        SparseBlockMask(checked.kv_num_blocks, idx, checked.full_kv_num_blocks, checked.full_kv_indices, n, n, 16, 16,
                        spec)
    SparseBlockMask(checked.kv_num_blocks, idx, checked.full_kv_num_blocks, checked.full_kv_indices, n, n, 16, 16,
                    spec, validate=False)  # not checked: the caller's guarantee


def test_one_mask_serves_calls_of_different_shapes_and_options():
    """Launch arguments are prepared once per (mask, head_dim, precision, LSE, order, dtypes): reusing one mask
    across head dims, dtypes and options must not reuse another call's prepared launch."""
    spec = SPECS["neighborhood"]
    n = spec.num_tokens
    bm = SparseBlockMask.from_spec(spec, 16, device=DEVICE)
    order = torch.randperm(n).to(DEVICE)
    cases = ((16, torch.float32, {}), (32, torch.float32, {}), (24, torch.float32, {"token_order": order}),
             (16, torch.float16, {}), (32, torch.float32, {"return_lse": True}))
    for d, dtype, kw in cases * 2:  # the second round takes the prepared (steady-state) launches
        q, k, v = qkv(1, 2, n, n, d, dtype)
        out = run(q, k, v, bm, **kw)
        out = out[0] if kw.get("return_lse") else out
        ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), bm,
                                               token_order=kw.get("token_order"))
        assert rel_err(out, ref) < (6e-4 if dtype == torch.float16 else 1e-5), (d, dtype, kw)
