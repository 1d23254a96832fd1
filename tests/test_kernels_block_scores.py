"""The block-scoring kernel (VMoBA's router) against a brute-force loop and its PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from diffaccel.kernels import block_scores
from diffaccel.kernels.reference import block_scores_reference


def brute(q, c, block, order):
    B, H, N, D = q.shape
    P = c.shape[2]
    nb = -(-N // block)
    mean = torch.zeros(B, H, nb, P, dtype=torch.float64)
    per = torch.zeros(B, H, N, P, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            o = order if order is None or order.dim() == 1 else order[h]
            for i in range(N):
                row = i if o is None else int(o[i])
                for p in range(P):
                    per[b, h, i, p] = float(q[b, h, row].double() @ c[b, h, p].double())
            for j in range(nb):
                mean[b, h, j] = per[b, h, j * block:(j + 1) * block].mean(0)
    return mean, per


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("order_kind", [None, "shared", "per_head"])
def test_block_scores_match_brute_force(dtype, tol, order_kind):
    B, H, N, D, P, block = 2, 2, 45, 24, 19, 16  # ragged last block, head_dim and P not powers of two
    q = torch.randn(B, H, N, D).to(dtype)
    c = torch.randn(B, H, P, D)
    order = None
    if order_kind == "shared":
        order = torch.randperm(N)
    elif order_kind == "per_head":
        order = torch.stack([torch.randperm(N) for _ in range(H)])
    want_mean, want_per = brute(q.float(), c, block, order)
    for backend in ("triton", "reference"):
        mean, per = block_scores(q, c, block, token_order=order, per_query=True, backend=backend)
        assert mean.dtype == torch.float32 and mean.shape == (B, H, 3, P)
        scale = want_per.abs().max().item()
        assert torch.isfinite(mean).all() and torch.isfinite(per).all()
        assert (mean.double() - want_mean).abs().max().item() <= tol * scale
        assert (per.double() - want_per).abs().max().item() <= tol * scale
        mean_only, none = block_scores(q, c, block, token_order=order, backend=backend)
        assert none is None and torch.equal(mean_only, mean)


def test_block_scores_reference_is_the_definition():
    q, c = torch.randn(1, 1, 20, 16), torch.randn(1, 1, 3, 16)
    mean, per = block_scores_reference(q, c, 16, per_query=True)
    assert torch.allclose(per, q @ c.transpose(-1, -2), atol=1e-6)
    assert torch.allclose(mean[0, 0, 1], per[0, 0, 16:].mean(0), atol=1e-6)


def test_block_scores_validates_arguments():
    q, c = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match="block_size"):
        block_scores(q, c, 24)
    with pytest.raises(ValueError, match="centroids"):
        block_scores(q, c[:, :1], 16)
    with pytest.raises(ValueError, match="token_order"):
        block_scores(q, c, 16, token_order=torch.arange(19))
