"""Synthetic PARO plans for tests (random orders and masks of a given geometry)."""

from __future__ import annotations

import math

import torch

from diffaccel.methods.paro_plan import ParoPlan, pack_bits, text_blocks
from diffaccel.sparse.axis_orders import axis_orders_for


def make_plan(grid=(3, 5, 7), text_len=6, text_first=True, heads=2, layers=("transformer_blocks.0.attn",),
              steps=4, num_buckets=3, block=16, density=0.5, keep=None, orders=None, seed=0,
              model="tiny-test", config_hash="0123456789abcdef") -> ParoPlan:
    g = torch.Generator().manual_seed(seed)
    n = math.prod(grid) + text_len
    nb = -(-n // block)
    if orders is None:
        orders = torch.randint(0, len(axis_orders_for(len(grid))), (len(layers), heads), generator=g)
    if keep is None:
        keep = torch.rand(num_buckets, len(layers), heads, nb, nb, generator=g) < density
        keep |= torch.eye(nb, dtype=torch.bool)
        flags = text_blocks(n, text_len, text_first, block)
        keep[..., flags, :] = True
        keep[..., :, flags] = True
    return ParoPlan(
        model=model, config_hash=config_hash, grid=grid, text_len=text_len, text_first=text_first, heads=heads,
        layers=tuple(layers), density=density, steps=steps, num_buckets=num_buckets, block=block, alpha=0.5,
        orders=torch.as_tensor(orders).to(torch.int8), masks=pack_bits(keep),
        recall=torch.rand(len(layers), heads, generator=g), kept_density=keep.float().mean((0, -1, -2)),
        prompts=1, package_version="test",
    )
