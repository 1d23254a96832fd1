"""PARO's axis orders: exact permutations and inverses on odd grids, text in place, and the kernel's per-head
token order against the reference (and against an explicit gather / masked attention / scatter)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from diffaccel.kernels import SparseBlockMask, TextSpec, block_sparse_attention
from diffaccel.kernels.reference import block_sparse_attention_reference
from diffaccel.sparse.axis_orders import (
    AXIS_ORDERS,
    axis_order_names,
    head_token_order,
    inverse_order,
    visual_axis_order,
)

ODD_GRIDS = [(3, 5, 7), (1, 3, 2), (5, 1, 3), (7, 5), (3, 1), (2, 9)]


@pytest.mark.parametrize("grid", ODD_GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_every_order_and_its_inverse_round_trip_exactly(grid):
    n = math.prod(grid)
    orders = AXIS_ORDERS[len(grid)]
    assert len(orders) == (6 if len(grid) == 3 else 2)
    assert sorted(orders) == sorted(itertools.permutations(range(len(grid))))
    x = torch.randn(n, 4)
    for index, axes in enumerate(orders):
        perm = visual_axis_order(grid, index)
        assert torch.equal(perm.sort().values, torch.arange(n))
        inv = inverse_order(perm)
        assert torch.equal(perm[inv], torch.arange(n)) and torch.equal(inv[perm], torch.arange(n))
        assert torch.equal(x[perm][inv], x)  # gather then inverse gather: the identity, bit for bit
        # position i holds the token whose coordinates, read in ``axes`` order, are i in mixed radix
        expected = []
        ranges = [range(grid[a]) for a in axes]
        for combo in itertools.product(*ranges):
            coord = [0] * len(grid)
            for a, c in zip(axes, combo):
                coord[a] = c
            flat = 0
            for size, c in zip(grid, coord):
                flat = flat * size + c
            expected.append(flat)
        assert perm.tolist() == expected, (grid, axes)


def test_order_names_follow_the_release_indexing():
    assert axis_order_names(3) == ("FHW", "FWH", "HWF", "HFW", "WHF", "WFH")
    assert axis_order_names(2) == ("HW", "WH")
    with pytest.raises(ValueError, match="2-D"):
        visual_axis_order((5,), 0)
    with pytest.raises(ValueError, match="index"):
        visual_axis_order((3, 5), 2)


@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_text_stays_in_place(position):
    grid, nt = (3, 5, 7), 6
    nv = math.prod(grid)
    order = head_token_order(grid, [0, 2, 5], TextSpec(nt, position))
    assert order.shape == (3, nv + nt)
    text = torch.arange(nt) if position == "prefix" else torch.arange(nv, nv + nt)
    where = slice(0, nt) if position == "prefix" else slice(nv, nv + nt)
    for h, o in enumerate((0, 2, 5)):
        assert torch.equal(order[h].sort().values, torch.arange(nv + nt))
        assert torch.equal(order[h, where], text)
        vis = order[h, nt:] - nt if position == "prefix" else order[h, :nv]
        assert torch.equal(vis, visual_axis_order(grid, o))


def _manual(q, k, v, keep, order, block, scale):
    """Gather each head into its order, attend with the block mask expanded to elements, scatter back."""
    B, H, N, D = q.shape
    out = torch.empty_like(q)
    for h in range(H):
        o = order[h]
        qh, kh, vh = q[:, h, o], k[:, h, o], v[:, h, o]
        el = keep[h].repeat_interleave(block, 0).repeat_interleave(block, 1)[:N, :N]
        s = (qh @ kh.transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(~el, float("-inf")), dim=-1)
        out[:, h, o] = p @ vh
    return out


def test_kernel_with_per_head_order_equals_the_reference():
    """Head 0 runs an axis order (text in place), head 1 a random permutation of the whole sequence."""
    g = torch.Generator().manual_seed(3)
    grid, nt, heads, block = (3, 3, 5), 6, 2, 16
    n = math.prod(grid) + nt
    q, k, v = (torch.randn(1, heads, n, 16, generator=g) for _ in range(3))
    order = torch.stack([head_token_order(grid, [3], TextSpec(nt, "prefix"))[0], torch.randperm(n, generator=g)])
    nb = -(-n // block)
    keep = torch.rand(heads, nb, nb, generator=g) < 0.5
    keep[:, torch.arange(nb), torch.arange(nb)] = True
    mask = SparseBlockMask.from_block_keep(keep.unsqueeze(0), q_len=n, kv_len=n, q_block_size=block,
                                           kv_block_size=block)
    scale = 16 ** -0.5
    tri = block_sparse_attention(q, k, v, mask, token_order=order, backend="triton")
    ref = block_sparse_attention_reference(q, k, v, mask, token_order=order)
    manual = _manual(q, k, v, keep, order, block, scale)
    assert torch.isfinite(tri).all()
    assert (tri - ref).abs().max().item() <= 1e-5
    assert (ref - manual).abs().max().item() <= 1e-5
