"""``kept_blocks(layer)`` (the mask-display contract the demo reads, issue 15): the key blocks a method kept at
its most recent call of a layer, checked against the plan's block mask and against the element mask itself."""

from __future__ import annotations

import pytest
import torch

from diffaccel.context import RunContext
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import MethodBase, get_method, list_methods

GRID = (8, 8)
BLOCK = 16  # 64 visual tokens: 4 x 4 blocks


def qkv(n: int, heads: int = 2):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, heads, n, 16, generator=g) for _ in range(3)]


def call(method, layer: str, step: int = 0, grid=GRID, text: int = 0):
    n = grid[0] * grid[1] * (grid[2] if len(grid) == 3 else 1)
    layout = TokenLayout(n + text, grid, text=slice(n, n + text) if text else None)
    ctx = RunContext(grid=grid, text_len=text, step=step, layer=layer)
    q, k, v = qkv(n + text)
    return method(q, k, v, layout, ctx)


def element_blocks(mod, n: int, block: int) -> torch.Tensor:
    """Blocks that hold at least one kept (query, key) pair of ``mod`` (sequence order = kernel order here)."""
    i = torch.arange(n)
    keep = mod(0, 0, i[:, None], i[None, :])
    nb = -(-n // block)
    pad = nb * block - n
    keep = torch.nn.functional.pad(keep, (0, pad, 0, pad))
    return keep.reshape(nb, block, nb, block).any(dim=3).any(dim=1)


def test_base_default_is_none_and_every_registered_method_answers():
    assert MethodBase().kept_blocks("any") is None
    for name in list_methods():
        method = get_method(name, **({"layers": ["x"]} if name == "softpag" else {}))
        assert method.kept_blocks("never-ran") is None, name


def test_gna_kept_blocks_is_the_plan_block_mask_and_the_element_mask():
    m = get_method("gna", kernel_size=3, block_size=BLOCK, backend="reference")
    call(m, "blocks.0")
    keep = m.kept_blocks("blocks.0")
    assert keep is not None and keep.dtype == torch.bool and keep.shape == (1, 4, 4)
    layout = TokenLayout(64, GRID)
    plan = m.plan(layout, RunContext(grid=GRID, layer="blocks.0"), heads=2)
    full, partial = plan.block_mask.block_keep()
    assert torch.equal(keep, (full | partial)[0])
    if plan.order is None:  # row-major: the block matrix is the element mask's
        assert torch.equal(keep[0], element_blocks(plan.mask_mod, 64, BLOCK))
    assert 0 < keep.float().mean() < 1  # a 3x3 window on 8x8 skips blocks
    assert m.kept_blocks("blocks.1") is None  # never ran there


def test_clear_kept_blocks_follow_the_element_mask_and_the_radius():
    small = get_method("clear", radius=2.0, block_size=BLOCK, backend="reference")
    big = get_method("clear", radius=16.0, block_size=BLOCK, backend="reference")
    call(small, "l")
    call(big, "l")
    ks, kb = small.kept_blocks("l"), big.kept_blocks("l")
    plan = small.plan(TokenLayout(64, GRID), RunContext(grid=GRID, layer="l"), heads=2)
    assert torch.equal(ks[0], element_blocks(plan.mask_mod, 64, BLOCK))
    assert ks.sum() < kb.sum() == kb.numel()  # radius 16 covers the grid: every block


def test_dense_steps_and_excluded_layers_report_none_at_their_most_recent_call():
    m = get_method("gna", kernel_size=3, block_size=BLOCK, backend="reference", dense_steps=1,
                   exclude_layers=("skip",))
    call(m, "l", step=1)
    assert m.kept_blocks("l") is not None
    call(m, "l", step=0)  # a dense step: the most recent call kept no block mask
    assert m.kept_blocks("l") is None
    call(m, "skip", step=1)
    assert m.kept_blocks("skip") is None


def test_msw_kept_blocks_are_the_plan_of_the_current_shift():
    m = get_method("msw", window=4, shift_policy="cyclic", block_size=BLOCK, backend="reference")
    masks = []
    for step in range(2):
        call(m, "l", step=step)
        masks.append(m.kept_blocks("l"))
    assert all(k is not None for k in masks)
    plan = m.plan(TokenLayout(64, GRID), RunContext(grid=GRID, layer="l", step=1), heads=2)
    full, partial = plan.block_mask.block_keep()
    assert torch.equal(masks[1], (full | partial)[0])


def test_joint_text_blocks_are_in_the_mask():
    m = get_method("gna", kernel_size=3, block_size=BLOCK, backend="reference")
    call(m, "l", text=16)
    keep = m.kept_blocks("l")
    assert keep.shape == (1, 5, 5)
    assert keep[0, :, -1].all() and keep[0, -1, :].all()  # text keys and text queries are global


def test_softpag_delegates_to_its_inner_method():
    m = get_method("softpag", layers=["other"], method="gna",
                   method_config={"kernel_size": 3, "block_size": BLOCK, "backend": "reference"})
    call(m.inner, "l")
    assert torch.equal(m.kept_blocks("l"), m.inner.kept_blocks("l"))


@pytest.mark.parametrize("name", ["dense", "agent"])
def test_methods_without_block_masks_report_none_after_running(name):
    m = get_method(name)
    call(m, "l")
    assert m.kept_blocks("l") is None
