"""Token Merging (ToMe) bipartite matching on a visual grid: merge similar tokens, attend, copy back.

Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023) and Bolya & Hoffman, "Token Merging for Fast
Stable Diffusion" (CVPR-W 2023, ToMeSD): tokens are split into *destination* tokens, one per ``stride`` cell of
the grid, and *source* tokens (all others). Each source finds its most cosine-similar destination; the ``r``
sources with the highest similarity are averaged into their destination (the mean includes the destination
itself), the others stay. After attention, every merged source receives its destination's output (unmerge).

AgentSD (Han et al., ECCV 2024, ``agentsd/merge.py``) ranks the sources once and builds two merges from the
same ranking: one with ``r`` merged sources for the attention tokens and one with ``agent_r >= r`` for the
agent tokens. :class:`Matching` therefore holds the ranking, and :meth:`Matching.plan` builds a
:class:`MergePlan` for any ``r``.

Everything here is plain tensor code on ``(batch, heads, tokens, dim)`` tensors: the plan's indices are per
batch element and shared by all heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from diffaccel.errors import ConfigError


def destination_positions(
    grid: tuple[int, ...],
    stride: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Flat positions of the destination tokens, one per full ``stride`` cell of ``grid``, in cell order.

    With a generator the destination is a random position inside each cell (ToMeSD's ``use_rand``), drawn on
    the generator's device; without one it is the cell's first (top-left) position. Rows and columns left over
    when a grid side is not a multiple of the stride hold only source tokens, as in ToMeSD.
    """
    grid, stride = tuple(grid), tuple(stride)
    if len(stride) != len(grid):
        raise ConfigError(f"stride {stride} must have one entry per grid dimension of {grid}")
    if any(g // s == 0 for g, s in zip(grid, stride)):
        raise ConfigError(f"stride {stride} is larger than the grid {grid} in some dimension")
    device = torch.device(device) if device is not None else (generator.device if generator is not None else "cpu")
    origins, offsets = _cell_tables(grid, stride, torch.device(device))
    if generator is None:
        return origins
    pick = torch.randint(offsets.numel(), (origins.numel(),), generator=generator, device=device)
    return origins + offsets[pick]


@lru_cache(maxsize=64)
def _cell_tables(grid: tuple[int, ...], stride: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat position of each cell's first token, and flat offsets of the positions inside a cell."""
    cells = tuple(g // s for g, s in zip(grid, stride))
    origins = _ravel(_unravel(torch.arange(math.prod(cells)), cells) * torch.tensor(stride), grid)
    offsets = _ravel(_unravel(torch.arange(math.prod(stride)), stride), grid)
    return origins.to(device), offsets.to(device)


def _unravel(flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat = flat // size
    return torch.stack(list(reversed(coords)), dim=-1)


def _ravel(coords: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    flat = torch.zeros(coords.shape[0], dtype=torch.long)
    for d, size in enumerate(shape):
        flat = flat * size + coords[:, d]
    return flat


def _sources(dst: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Ascending positions that are not destinations (a stable sort: no host synchronisation, unlike nonzero)."""
    is_dst = torch.zeros(num_tokens, dtype=torch.int8, device=dst.device).index_fill_(0, dst, 1)
    return torch.argsort(is_dst, stable=True)[: num_tokens - dst.numel()]


@lru_cache(maxsize=32)
def _fixed_split(grid: tuple[int, ...], stride: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    dst = destination_positions(grid, stride, device=device)
    return _sources(dst, math.prod(grid)), dst


@dataclass
class Matching:
    """Sources ranked by their best cosine similarity to a destination.

    Attributes:
        src_pos: ``(num_src,)`` sequence positions of the source tokens (ascending).
        dst_pos: ``(num_dst,)`` sequence positions of the destination tokens (cell order).
        order: ``(batch, num_src)`` source indices (into ``src_pos``) from most to least similar.
        best_dst: ``(batch, num_src)`` index (into ``dst_pos``) of each source's most similar destination.
    """

    src_pos: torch.Tensor
    dst_pos: torch.Tensor
    order: torch.Tensor
    best_dst: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.src_pos.numel() + self.dst_pos.numel()

    @property
    def num_src(self) -> int:
        return self.src_pos.numel()

    def plan(self, r: int) -> "MergePlan":
        """The merge of the ``r`` most similar sources (clamped to the number of sources)."""
        r = max(0, min(int(r), self.num_src))
        batch, device = self.order.shape[0], self.order.device
        kept, merged = self.order[:, r:], self.order[:, :r]
        into = torch.gather(self.best_dst, 1, merged)
        num_kept, num_dst = kept.shape[1], self.dst_pos.numel()
        # Slot of every token in the merged sequence [kept sources (ranking order), destinations].
        src_slot = torch.empty(batch, self.num_src, dtype=torch.long, device=device)
        src_slot.scatter_(1, kept, torch.arange(num_kept, device=device).expand(batch, num_kept))
        src_slot.scatter_(1, merged, into + num_kept)
        slot = torch.empty(batch, self.num_tokens, dtype=torch.long, device=device)
        slot[:, self.src_pos] = src_slot
        slot[:, self.dst_pos] = torch.arange(num_kept, num_kept + num_dst, device=device).expand(batch, num_dst)
        return MergePlan(
            src_pos=self.src_pos, dst_pos=self.dst_pos, kept_src=kept, merged_src=merged, merged_into=into, slot=slot,
        )


def bipartite_matching(
    metric: torch.Tensor,
    grid: tuple[int, ...],
    stride: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
) -> Matching:
    """Rank the source tokens of ``metric`` ``(batch, tokens, channels)`` by similarity to the destinations.

    ``tokens`` must equal ``prod(grid)``. Destinations are chosen by :func:`destination_positions` (one draw
    shared by the batch, as ToMeSD); a generator must live on ``metric``'s device.
    """
    batch, num_tokens, _ = metric.shape
    if num_tokens != math.prod(grid):
        raise ConfigError(f"metric has {num_tokens} tokens but the grid {grid} holds {math.prod(grid)}")
    if generator is None:
        src_pos, dst_pos = _fixed_split(tuple(grid), tuple(stride), metric.device)
    else:
        dst_pos = destination_positions(grid, stride, generator=generator, device=metric.device)
        src_pos = _sources(dst_pos, num_tokens)

    metric = metric.float()
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = metric[:, src_pos] @ metric[:, dst_pos].transpose(1, 2)  # (batch, num_src, num_dst)
    best_score, best_dst = scores.max(dim=-1)
    order = best_score.argsort(dim=-1, descending=True)
    return Matching(src_pos=src_pos, dst_pos=dst_pos, order=order, best_dst=best_dst)


@dataclass
class MergePlan:
    """One merge: ``kept_src`` sources stay, ``merged_src`` sources are averaged into ``merged_into``.

    Merged sequences are ordered ``[kept sources (ranking order), destinations (cell order)]``; ``slot[b, p]``
    is the merged position of token ``p``. Merging is one ``index_add`` over all heads (and over several
    tensors at once with :meth:`merge_many`), unmerging one ``index_select``.
    """

    src_pos: torch.Tensor
    dst_pos: torch.Tensor
    kept_src: torch.Tensor  # (batch, num_kept) indices into src_pos
    merged_src: torch.Tensor  # (batch, r) indices into src_pos
    merged_into: torch.Tensor  # (batch, r) indices into dst_pos
    slot: torch.Tensor  # (batch, num_tokens) merged position of every token

    def __post_init__(self) -> None:
        batch = self.slot.shape[0]
        n = self.num_merged_tokens
        self._flat_slot = (self.slot + torch.arange(batch, device=self.slot.device)[:, None] * n).reshape(-1)
        counts = torch.zeros(batch * n, device=self.slot.device).index_add_(
            0, self._flat_slot, torch.ones(self._flat_slot.numel(), device=self.slot.device)
        )
        self._inv_counts = counts.reciprocal_().unsqueeze(1)

    @property
    def num_merged_tokens(self) -> int:
        """Length of a merged sequence."""
        return self.kept_src.shape[1] + self.dst_pos.numel()

    @property
    def num_tokens(self) -> int:
        return self.src_pos.numel() + self.dst_pos.numel()

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, heads, tokens, dim)`` to ``(batch, heads, num_merged_tokens, dim)`` by mean merging."""
        return self.merge_many(x)[0]

    def merge_many(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`merge` of several ``(batch, heads, tokens, dim)`` tensors in one accumulation (float32 or wider)."""
        batch, n = self.slot.shape[0], self.num_merged_tokens
        rows = [x.transpose(1, 2).reshape(batch * x.shape[2], -1) for x in xs]
        acc_dtype = torch.promote_types(xs[0].dtype, torch.float32)
        flat = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)
        acc = torch.zeros(batch * n, flat.shape[1], dtype=acc_dtype, device=flat.device)
        acc.index_add_(0, self._flat_slot, flat.to(acc_dtype)).mul_(self._inv_counts.to(acc_dtype))
        outs, start = [], 0
        for x in xs:
            width = x.shape[1] * x.shape[3]
            part = acc[:, start : start + width].reshape(batch, n, x.shape[1], x.shape[3]).transpose(1, 2)
            outs.append(part.to(x.dtype))
            start += width
        return outs

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """``(batch, heads, num_merged_tokens, dim)`` back to every position: merged sources copy their destination."""
        batch, heads, n, dim = y.shape
        rows = y.transpose(1, 2).reshape(batch * n, heads * dim)
        out = rows.index_select(0, self._flat_slot)
        return out.reshape(batch, self.num_tokens, heads, dim).transpose(1, 2)
