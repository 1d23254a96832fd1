"""Attention shapes of the kernel benchmark, as data (the table of benchmarks/BENCHMARKS.md).

One row per model setting: batch 1, the self/joint attention of one transformer layer, text tokens and the
visual latent grid after patchification. The ``tiny-*`` rows are for CPU smoke runs (Triton interpreter or
the PyTorch reference): small enough for seconds of work, with token counts that are not multiples of the
block size so the ragged tail is exercised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SHAPES", "TINY_SHAPES", "AttentionShape", "get_shape"]


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: ``(batch, heads, text_tokens + prod(grid), head_dim)`` for q, k and v."""

    name: str
    model: str
    text_tokens: int
    grid: tuple[int, ...]
    heads: int
    head_dim: int
    batch: int = 1
    tiny: bool = False

    @property
    def visual_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def tokens(self) -> int:
        return self.text_tokens + self.visual_tokens

    @property
    def dense_flops(self) -> float:
        """FLOPs of dense attention: 2 matmuls x 2 FLOPs per multiply-add (4 * B * H * N^2 * d)."""
        return 4.0 * self.batch * self.heads * self.tokens * self.tokens * self.head_dim

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "model": self.model,
            "batch": self.batch,
            "heads": self.heads,
            "head_dim": self.head_dim,
            "text_tokens": self.text_tokens,
            "grid": list(self.grid),
            "tokens": self.tokens,
        }


_ROWS = [
    AttentionShape("flux-1024", "FLUX.1 1024x1024", 512, (64, 64), 24, 128),
    AttentionShape("sd35-1024", "SD3.5 Large 1024x1024", 333, (64, 64), 38, 64),
    AttentionShape("cogx-720", "CogVideoX-5B 720p, 49 frames", 226, (13, 30, 45), 48, 64),
    AttentionShape("wan13-480", "Wan2.1-1.3B 480p, 81 frames", 0, (21, 30, 52), 12, 128),
    AttentionShape("wan14-720", "Wan2.1-14B 720p, 81 frames", 0, (21, 45, 80), 40, 128),
    AttentionShape("hyv-720", "HunyuanVideo 720p, 129 frames", 256, (33, 45, 80), 24, 128),
]
_TINY_ROWS = [
    AttentionShape("tiny-image", "tiny joint image attention (text first)", 11, (8, 8), 2, 32, tiny=True),
    AttentionShape("tiny-video", "tiny video self-attention", 0, (3, 5, 7), 2, 64, tiny=True),
    AttentionShape("tiny-batch2", "tiny batched, head_dim not a power of two", 5, (6, 9), 3, 48, batch=2, tiny=True),
]

SHAPES: dict[str, AttentionShape] = {s.name: s for s in _ROWS}
TINY_SHAPES: dict[str, AttentionShape] = {s.name: s for s in _TINY_ROWS}


def get_shape(name: str) -> AttentionShape:
    """The shape called ``name`` (full-size or tiny); ValueError listing the known names otherwise."""
    table = {**SHAPES, **TINY_SHAPES}
    if name not in table:
        raise ValueError(f"shape must be one of {sorted(table)}, got {name!r}")
    return table[name]
