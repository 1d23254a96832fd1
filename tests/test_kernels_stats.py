"""Block attention mass and dense attention with LSE: Triton kernels (interpreter on CPU) against the references."""

from __future__ import annotations

import math

import pytest
import torch

from diffaccel.kernels.reference import attention_with_lse_reference, block_attention_mass_reference
from diffaccel.kernels.stats import attention_with_lse, block_attention_mass


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "NaN/Inf never passes"
    return float((a.float() - b.float()).norm() / b.float().norm())


def _random_case(seed: int) -> dict:
    """A random small shape: ragged lengths (rarely block multiples), N_q != N_k, odd head dims, tuple blocks."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    block = pick([16, 32, (16, 32), (32, 16)])
    return dict(
        batch=pick([1, 2]),
        heads=pick([1, 3]),
        n_q=int(torch.randint(1, 130, (1,), generator=g)),
        n_k=int(torch.randint(1, 130, (1,), generator=g)),
        head_dim=pick([16, 24, 64, 80]),
        block=block,
        dtype=pick([torch.float32, torch.float16, torch.bfloat16]),
    )


def _inputs(batch, heads, n_q, n_k, head_dim, dtype, std=1.0):
    q = (torch.randn(batch, heads, n_q, head_dim) * std).to(dtype)
    k = (torch.randn(batch, heads, n_k, head_dim) * std).to(dtype)
    v = torch.randn(batch, heads, n_k, head_dim).to(dtype)
    return q, k, v


def _valid_per_block(n: int, block: int) -> torch.Tensor:
    counts = torch.full((math.ceil(n / block),), float(block))
    counts[-1] = n - (counts.numel() - 1) * block
    return counts


@pytest.mark.parametrize("seed", range(6))
def test_block_mass_matches_reference_on_random_shapes(seed):
    case = _random_case(seed)
    q, k, v = _inputs(case["batch"], case["heads"], case["n_q"], case["n_k"], case["head_dim"], case["dtype"], std=1.5)
    _, lse = attention_with_lse_reference(q, k, v)
    mass = block_attention_mass(q, k, lse, case["block"])
    ref = block_attention_mass_reference(q, k, lse, case["block"])
    bq, bk = (case["block"],) * 2 if isinstance(case["block"], int) else case["block"]
    assert mass.dtype == torch.float32
    assert mass.shape == (case["batch"], case["heads"], math.ceil(case["n_q"] / bq), math.ceil(case["n_k"] / bk))
    assert _rel(mass, ref) < 1e-5, case


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_sums_equal_valid_queries(dtype):
    # Ragged on both axes and N_q != N_k; block (32, 16): every row of tiles holds each query's full softmax.
    q, k, v = _inputs(2, 2, 75, 53, 32, dtype, std=2.0)
    _, lse = attention_with_lse_reference(q, k, v, scale=0.3)
    mass = block_attention_mass(q, k, lse, (32, 16), scale=0.3)
    expected = _valid_per_block(75, 32).expand(2, 2, -1)
    torch.testing.assert_close(mass.sum(dim=-1), expected, rtol=1e-5, atol=1e-5)
    # A different scale than the LSE's breaks the property: the scale is really used.
    wrong = block_attention_mass(q, k, lse, (32, 16), scale=0.2).sum(dim=-1)
    assert (wrong - expected).abs().max() > 1e-2


def test_mass_concentrates_where_attention_does():
    # Keys equal to scaled queries: each query's mass sits in its own (diagonal) block.
    q = torch.randn(1, 1, 64, 16)
    k = q * 8.0
    _, lse = attention_with_lse_reference(q, k, k)
    mass = block_attention_mass(q, k, lse, 16)
    assert mass.diagonal(dim1=-2, dim2=-1).min() > 0.9 * 16


def test_strided_views_into_nan_padding_are_never_read():
    # q and k are views into NaN-filled storage (beyond N and head_dim); lse is a strided view too.
    n_q, n_k, d = 37, 50, 24
    big_q = torch.full((1, 2, 64, 40), float("nan"))
    big_k = torch.full((1, 2, 64, 40), float("nan"))
    big_q[..., :n_q, :d] = torch.randn(1, 2, n_q, d)
    big_k[..., :n_k, :d] = torch.randn(1, 2, n_k, d)
    q, k = big_q[..., :n_q, :d], big_k[..., :n_k, :d]
    assert not q.is_contiguous()
    _, lse_c = attention_with_lse_reference(q.contiguous(), k.contiguous(), k.contiguous())
    big_lse = torch.full((1, 2, n_q, 3), float("nan"))
    big_lse[..., 1] = lse_c
    lse = big_lse[..., 1]
    mass = block_attention_mass(q, k, lse, 16)
    ref = block_attention_mass_reference(q.contiguous(), k.contiguous(), lse_c, 16)
    assert _rel(mass, ref) < 1e-5


def test_nan_in_inputs_propagates_to_its_tiles_only():
    q, k, v = _inputs(1, 1, 48, 48, 16, torch.float32)
    _, lse = attention_with_lse_reference(q, k, v)
    q[0, 0, 20, 3] = float("nan")  # query block 1
    k[0, 0, 40, 0] = float("nan")  # key block 2
    mass = block_attention_mass(q, k, lse, 16)
    nan = torch.isnan(mass[0, 0])
    expected = torch.zeros(3, 3, dtype=torch.bool)
    expected[1, :] = True
    expected[:, 2] = True
    assert torch.equal(nan, expected)
    assert torch.equal(torch.isnan(block_attention_mass_reference(q, k, lse, 16)[0, 0]), expected)


def test_attention_with_lse_matches_reference():
    q, k, v = _inputs(1, 2, 70, 45, 32, torch.float32)
    out, lse = attention_with_lse(q, k, v, scale=0.2)
    ref_out, ref_lse = attention_with_lse_reference(q, k, v, scale=0.2)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (1, 2, 70) and lse.dtype == torch.float32
    assert _rel(out, ref_out) < 1e-4
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)  # fp32: measured max |diff| 4.8e-7


def test_attention_with_lse_then_mass_bf16():
    # The two passes of AdaSpa's search chained, in bf16: the kernel's own LSE normalises the block mass.
    q, k, v = _inputs(1, 2, 90, 90, 64, torch.bfloat16)
    out, lse = attention_with_lse(q, k, v)
    ref_out, ref_lse = attention_with_lse_reference(q, k, v)
    assert _rel(out, ref_out) < 1e-2  # measured 5.4e-3 (interpreter, seeds 0-2: P rounded to bf16)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)  # fp32 logits of the same bf16 inputs: 4.8e-7
    mass = block_attention_mass(q, k, lse, 32)
    torch.testing.assert_close(mass.sum(-1), _valid_per_block(90, 32).expand(1, 2, -1), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------------------ bad arguments


def _small():
    q, k, v = _inputs(1, 2, 20, 20, 16, torch.float32)
    _, lse = attention_with_lse_reference(q, k, v)
    return q, k, v, lse


@pytest.mark.parametrize("block", [48, 8, 512, 0, True, (16, 24), (16,), 16.0])
def test_block_size_must_be_a_power_of_two_in_range(block):
    q, k, _, lse = _small()
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        block_attention_mass(q, k, lse, block)


@pytest.mark.parametrize("lse_shape", [(1, 2, 19), (1, 2), (2, 2, 20)])
def test_lse_shape_mismatch(lse_shape):
    q, k, _, _ = _small()
    with pytest.raises(ValueError, match=r"lse must have shape \(batch, heads, N_q\) = \(1, 2, 20\)"):
        block_attention_mass(q, k, torch.zeros(lse_shape), 16)


def test_lse_must_be_float32():
    q, k, _, lse = _small()
    with pytest.raises(TypeError, match="lse must be float32"):
        block_attention_mass(q, k, lse.bfloat16(), 16)


def test_dtype_and_device_mismatch():
    q, k, v, lse = _small()
    with pytest.raises(TypeError, match=r"k.dtype must equal q.dtype"):
        block_attention_mass(q, k.half(), lse, 16)
    with pytest.raises(TypeError, match=r"v.dtype must equal q.dtype"):
        attention_with_lse(q, k, v.half())
    with pytest.raises(ValueError, match="k must be on q's device"):
        block_attention_mass(q, k.to("meta"), lse, 16)
    with pytest.raises(ValueError, match="lse must be on q's device"):
        block_attention_mass(q, k, lse.to("meta"), 16)
    with pytest.raises(TypeError, match="q must be float16, bfloat16 or float32"):
        block_attention_mass(q.double(), k.double(), lse, 16)


def test_shape_errors_name_the_argument():
    q, k, v, lse = _small()
    with pytest.raises(ValueError, match="q must be 4-D"):
        block_attention_mass(q[0], k, lse, 16)
    with pytest.raises(ValueError, match="k head_dim must equal q head_dim"):
        block_attention_mass(q, k[..., :8], lse, 16)
    with pytest.raises(ValueError, match="k must have q's batch and heads"):
        block_attention_mass(q, k[:, :1], lse, 16)
    with pytest.raises(ValueError, match="v must have as many tokens as k"):
        attention_with_lse(q, k, v[..., :5, :])
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        block_attention_mass(q, k, lse, 16, scale=-1.0)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        attention_with_lse(q, k, v, scale=float("nan"))


# ------------------------------------------------------------------------------------------------------ dispatch


def test_cpu_without_interpreter_falls_back_to_reference_with_one_warning(monkeypatch):
    from diffaccel.warn import DiffAccelWarning

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _inputs(1, 1, 20, 30, 16, torch.float32)
    with pytest.warns(DiffAccelWarning, match="attention_with_lse falls back to the PyTorch reference"):
        out, lse = attention_with_lse(q, k, v)
    with pytest.warns(DiffAccelWarning, match="block_attention_mass falls back to the PyTorch reference"):
        mass = block_attention_mass(q, k, lse, 16)
    ref_out, ref_lse = attention_with_lse_reference(q, k, v)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert torch.equal(mass, block_attention_mass_reference(q, k, lse, 16))
    with pytest.raises(ValueError, match="backend='triton' cannot run block_attention_mass"):
        block_attention_mass(q, k, lse, 16, backend="triton")


def test_backend_choice_is_checked():
    q, k, v, lse = _small()
    with pytest.raises(ValueError, match="backend must be one of"):
        block_attention_mass(q, k, lse, 16, backend="cuda")
    ref = block_attention_mass(q, k, lse, 16, backend="reference")
    assert _rel(block_attention_mass(q, k, lse, 16, backend="triton"), ref) < 1e-5


def test_head_dim_limit():
    q = torch.randn(1, 1, 16, 272)
    with pytest.raises(ValueError, match="head_dim must be at most 256"):
        block_attention_mass(q, q, torch.zeros(1, 1, 16), 16)
