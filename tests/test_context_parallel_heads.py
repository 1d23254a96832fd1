"""Per-head state by global head id under Ulysses (issue 17), in one process: a rank's share of the heads gets the
same decisions as those heads in a single-process call (AdaSpa's head tiers, tile's per-head frames)."""

from __future__ import annotations

import pytest
import torch

from diffaccel.context import HeadShard, RunContext
from diffaccel.layout import TokenLayout
from diffaccel.methods.adaspa import select_blocks
from diffaccel.methods.base import get_method


def _mass(heads: int, nq: int = 4, nk: int = 4) -> torch.Tensor:
    """Block mass (1, H, nq, nk), rows summing to one: the first half of the heads peaked (high recall), the rest
    diffuse, so a ranking over every head differs from a ranking over each half."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, heads, nq, nk, generator=g)
    logits[:, : heads // 2] *= 6.0
    return logits.softmax(-1)


def _base_recall(mass: torch.Tensor, **kw) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    h = mass.shape[1]
    # the recall each head has before the tiers: what a rank hands to the gather (total 2h: always >= 2 heads)
    select_blocks(mass, *_no_text(mass), heads=HeadShard(0, 2 * h, lambda x: seen.append(x) or torch.cat([x, x], -1)),
                  **kw)
    return seen[0]


def _no_text(mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nq, nk = mass.shape[-2:]
    return torch.zeros(nq, dtype=torch.bool), torch.zeros(nk, dtype=torch.bool)


@pytest.mark.parametrize("world", [2, 4])
def test_adaspa_head_tiers_rank_every_head_of_the_model(world):
    heads = 4
    kw = dict(sparsity=0.5, recall_threshold=0.0, head_adaptive=True)
    mass = _mass(heads)
    full = select_blocks(mass, *_no_text(mass), **kw)
    local = heads // world
    parts = [mass[:, r * local:(r + 1) * local] for r in range(world)]
    recalls = torch.cat([_base_recall(p, **kw) for p in parts], dim=-1)
    for r, part in enumerate(parts):
        def gather(x, r=r):
            assert torch.equal(x, recalls[..., r * local:(r + 1) * local])
            return recalls

        got = select_blocks(part, *_no_text(part), heads=HeadShard(r * local, heads, gather), **kw)
        assert torch.equal(got.keep, full.keep[:, r * local:(r + 1) * local])
        assert torch.equal(got.head_sparsity, full.head_sparsity[:, r * local:(r + 1) * local])
    # without the shard each part ranks its own heads only: different tiers (the case the gather exists for)
    alone = select_blocks(parts[0], *_no_text(parts[0]), **kw)
    assert not torch.equal(alone.head_sparsity, full.head_sparsity[:, :local])


def test_adaspa_search_passes_the_shard_to_the_selection():
    """AdaSpa's method calls (not only select_blocks) use ctx.heads: a gather that sees every search."""
    method = get_method("adaspa", block_size=16, sparsity=0.5, search_at=[0.5], backend="reference",
                        recall_threshold=1e-6)
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    seen = []
    ctx = RunContext(grid=(8, 8), num_steps=2, layer="blocks.0.attn")
    ctx.heads = HeadShard(2, 4, lambda x: seen.append(x) or torch.cat([x, x], dim=-1))
    method(q, k, v, TokenLayout(num_tokens=64, grid=(8, 8)), ctx)
    assert len(seen) == 1 and seen[0].shape == (1, 2)


def test_tile_per_head_frames_by_global_head_id():
    method = get_method("tile", block_size=16, global_frames=[[0], [1], [2], [3]], backend="reference")
    layout = TokenLayout(num_tokens=64, grid=(4, 4, 4))
    cfg = method.config
    full = method.spec_for(layout, cfg, 4)
    for offset in (0, 2):
        shard = HeadShard(offset, 4, lambda x: x)
        part = method.spec_for(layout, cfg, 2, None, shard)
        assert part.global_frames == full.global_frames[offset:offset + 2]
    with pytest.raises(Exception, match="4 per-head lists but the layer has 2 heads"):
        method.spec_for(layout, cfg, 2)  # without the shard, the per-head lists do not fit a rank's heads
