"""Random block masks of the kernel benchmark, in the two forms the sparse kernels take.

One mask per (shape, density): ``round(density * n_k_blocks)`` key blocks per query block, chosen at random and
independently per (batch, head, query block) like the per-head masks of AdaSpa or PARO, the diagonal block always
kept. Built once as a torch ``BlockMask`` (FlexAttention) and converted once to diffaccel's ``SparseBlockMask``,
so both kernels skip exactly the same tiles. This is the benchmark's own generator: the kernels package has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = ["BenchMask", "MaskModSlot", "MaskStats", "random_block_mask"]


@dataclass
class BenchMask:
    """One random block mask in the two forms the kernels take, plus the exact fraction of work it keeps."""

    flex: Any  # torch.nn.attention.flex_attention.BlockMask
    kernel: Any  # what our kernel is given (converted once, outside the timing)
    blocks: torch.Tensor  # (B, H, n_q_blocks, n_k_blocks) bool, kept tiles (for the float32 reference)
    block_size: int
    density_blocks: float  # kept tiles / all tiles
    kept_pairs: float  # (query, key) pairs inside kept tiles, ragged tail tiles counted exactly


def random_block_mask(
    batch: int,
    heads: int,
    n_q: int,
    n_k: int,
    block_size: int,
    density: float,
    *,
    generator: torch.Generator,
    device: torch.device | str,
    slot: MaskModSlot | None = None,
) -> BenchMask:
    """Keep ``round(density * n_k_blocks)`` key blocks per query block (at least one, always the diagonal one).

    The kept blocks are chosen at random, independently per (batch, head, query block), like the per-head masks
    of AdaSpa or PARO. All kept blocks are *full* (no element mask inside), so both sparse kernels time pure
    block skipping. The BlockMask's ``mask_mod`` says the same thing element-wise (FlexAttention's eager path
    reads only the mask_mod); it reads the tile table from ``slot``, which masks of one shape share so that
    compiled FlexAttention sees the same function for every density and does not recompile. A slot holds one
    table at a time: the previous mask of that slot is stale once a new one is drawn.
    """
    from torch.nn.attention.flex_attention import BlockMask

    n_qb, n_kb = -(-n_q // block_size), -(-n_k // block_size)
    if slot is None:
        slot = MaskModSlot((batch, heads, n_qb, n_kb), block_size, device)
    keep = max(1, min(n_kb, round(density * n_kb)))
    scores = torch.rand((batch, heads, n_qb, n_kb), generator=generator, device=generator.device)
    diagonal = (torch.arange(n_qb, device=scores.device) * n_kb) // n_qb
    scores[..., torch.arange(n_qb, device=scores.device), diagonal] = 2.0  # ranks first: always kept
    kept = scores.topk(keep, dim=-1).indices.sort(dim=-1).values.to(device=device, dtype=torch.int32)

    full_indices = torch.zeros((batch, heads, n_qb, n_kb), dtype=torch.int32, device=device)
    full_indices[..., :keep] = kept
    full_counts = torch.full((batch, heads, n_qb), keep, dtype=torch.int32, device=device)
    partial_counts = torch.zeros_like(full_counts)
    partial_indices = torch.zeros_like(full_indices)
    blocks = torch.zeros((batch, heads, n_qb, n_kb), dtype=torch.bool, device=device)
    blocks.scatter_(-1, kept.long(), True)
    slot.fill(blocks)
    flex_mask = BlockMask.from_kv_blocks(
        partial_counts,
        partial_indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=block_size,
        mask_mod=slot.mask_mod,
        seq_lengths=(n_q, n_k),
    )
    q_sizes = torch.full((n_qb,), float(block_size), dtype=torch.float64, device=device)
    k_sizes = torch.full((n_kb,), float(block_size), dtype=torch.float64, device=device)
    q_sizes[-1] = n_q - (n_qb - 1) * block_size
    k_sizes[-1] = n_k - (n_kb - 1) * block_size
    kept_pairs = float(torch.einsum("bhij,i,j->", blocks.double(), q_sizes, k_sizes))
    return BenchMask(
        flex=flex_mask,
        kernel=_kernel_mask(flex_mask),
        blocks=blocks,
        block_size=block_size,
        density_blocks=keep / n_kb,
        kept_pairs=kept_pairs,
    )


class MaskStats(Protocol):
    """What :func:`diffaccel.bench.measure.measure` reads from a mask: the (query, key) pairs it keeps and its kept-block fraction."""

    kept_pairs: float
    density_blocks: float


class MaskModSlot:
    """A (B, H, n_q_blocks, n_k_blocks) tile table and a FlexAttention ``mask_mod`` that reads it.

    Masks of one shape share a slot, so compiled FlexAttention sees one function for every density.
    """

    def __init__(self, shape: tuple[int, int, int, int], block_size: int, device: torch.device | str) -> None:
        self.table = torch.zeros(shape, dtype=torch.bool, device=device)
        table = self.table

        def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 (FlexAttention's mask_mod signature)
            return table[b, h, q_idx // block_size, kv_idx // block_size]

        self.mask_mod = mask_mod

    def fill(self, blocks: torch.Tensor) -> None:
        if blocks.shape != self.table.shape:
            raise ValueError(
                f"block table shape {tuple(blocks.shape)} does not fit this slot {tuple(self.table.shape)}"
            )
        self.table.copy_(blocks)


def _kernel_mask(flex_mask: Any) -> Any:
    """Our kernel's own block-mask form of a torch BlockMask, converted once, outside the timing.

    The mask has only full blocks, so no element mask travels with it (the custom ``mask_mod`` is not needed).
    """
    from diffaccel.kernels.masks import SparseBlockMask

    return SparseBlockMask.from_block_mask(flex_mask)

