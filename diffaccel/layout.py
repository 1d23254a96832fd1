"""Where tokens sit in an attention call: the text slice and the visual grid.

Methods never guess the model's token order: adapters build a :class:`TokenLayout` for every call, and
methods read the text slice and the visual grid from it. SD3 and HunyuanVideo put text after the visual tokens,
FLUX and CogVideoX before; Wan's self-attention has none. Everything else a method would otherwise guess about the
model (padded prompts, the UNet level) is a field here, filled by the adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from diffaccel.errors import LayoutError

Grid = tuple[int, ...]


@dataclass(frozen=True)
class TokenLayout:
    """Token positions of one attention call.

    Attributes:
        num_tokens: sequence length of the queries (and, for self/joint attention, of the keys).
        grid: visual token grid in the order the model flattens it, ``(H, W)`` or ``(F, H, W)``; ``None`` when
            the call has no visual grid (a text-only refiner, an unknown layout). Methods run dense then.
        text: slice of text token positions inside the sequence, or ``None``.
        is_cross: cross-attention (queries visual, keys from the text encoder). Methods keep it dense unless
            they say otherwise.
        num_keys: key length, when it differs from ``num_tokens`` (cross-attention).
        text_lengths: valid text tokens per batch row when the prompt is padded (HunyuanVideo), as host ints; the
            valid tokens come first inside the text slice. When set, the call's ``attn_mask`` is exactly the
            key-padding mask these lengths describe, so a method may use the lengths instead of reading the mask.
            ``None``: every text token is valid (or the call has an ``attn_mask`` of another kind).
        downsample: how many times smaller (per spatial axis) this call's grid is than the denoiser's latent grid:
            1 on DiTs and on a UNet's highest-resolution level, 2, 4, ... on the lower UNet levels.
        hierarchical: the grid is one level of a multi-resolution denoiser (a UNet), not the single token grid of
            a transformer.
        finest_downsample: the smallest ``downsample`` of any self-attention level of this denoiser: 1 on DiTs and
            SD 1.x/2.x, 2 on SDXL (its full-resolution level has no attention). Methods whose default is "the
            highest-resolution attention level" (AgentSD, HiDiffusion) compare ``downsample`` with it.
        unknown: why the grid of this self/joint call could not be derived (FLUX ``img_ids`` that are not one
            row-major grid, a video processor installed without :func:`diffaccel.apply`, ...), else ``None``. Such
            a layout has ``grid=None`` (and ``text=None`` when the text length was unknown too): dense attention
            runs exactly as stock, and a method that needs the grid falls back to dense for the call (one warning
            per layer) or, in strict mode, raises this reason.
    """

    num_tokens: int
    grid: Grid | None
    text: slice | None = None
    is_cross: bool = False
    num_keys: int | None = None
    text_lengths: tuple[int, ...] | None = None
    downsample: int = 1
    hierarchical: bool = False
    finest_downsample: int = 1
    unknown: str | None = None

    def __post_init__(self) -> None:
        if self.num_tokens < 0:
            raise LayoutError(f"num_tokens must be >= 0, got {self.num_tokens}")
        if self.unknown is not None and (self.grid is not None or self.is_cross):
            raise LayoutError("a layout whose grid is unknown has grid=None and is not cross-attention")
        if self.grid is not None:
            if not (1 <= len(self.grid) <= 3) or any(int(s) < 1 for s in self.grid):
                raise LayoutError(f"grid must be 1 to 3 positive sizes, got {self.grid}")
            object.__setattr__(self, "grid", tuple(int(s) for s in self.grid))
        if self.text is not None:
            for bound in (self.text.start, self.text.stop):
                if bound is not None and not -self.num_tokens <= bound <= self.num_tokens:
                    raise LayoutError(f"text {self.text} lies outside the {self.num_tokens} tokens")
            start, stop, step = self.text.indices(self.num_tokens)
            if step != 1 or stop < start:
                raise LayoutError(f"text must be a contiguous slice, got {self.text}")
            if start != 0 and stop != self.num_tokens:
                raise LayoutError(f"text must be a prefix or a suffix of the sequence, got {self.text}")
            object.__setattr__(self, "text", slice(start, stop))
        if self.grid is not None and not self.is_cross:
            expected = self.num_tokens - self.num_text
            if math.prod(self.grid) != expected:
                raise LayoutError(
                    f"grid {self.grid} holds {math.prod(self.grid)} tokens but the call has {expected} visual tokens "
                    f"({self.num_tokens} tokens, {self.num_text} text)"
                )

        if self.text_lengths is not None:
            lengths = tuple(int(n) for n in self.text_lengths)
            if not lengths or any(not 0 <= n <= self.num_text for n in lengths):
                raise LayoutError(
                    f"text_lengths must be one integer per batch row in [0, {self.num_text}], got {self.text_lengths}"
                )
            object.__setattr__(self, "text_lengths", lengths)
        if isinstance(self.downsample, bool) or not isinstance(self.downsample, int) or self.downsample < 1:
            raise LayoutError(f"downsample must be an integer >= 1, got {self.downsample!r}")
        finest = self.finest_downsample
        if isinstance(finest, bool) or not isinstance(finest, int) or not 1 <= finest <= self.downsample:
            raise LayoutError(
                f"finest_downsample must be an integer in [1, downsample={self.downsample}], got {finest!r}"
            )

    @property
    def num_text(self) -> int:
        return 0 if self.text is None else self.text.stop - self.text.start

    @property
    def num_visual(self) -> int:
        return self.num_tokens - self.num_text if not self.is_cross else self.num_tokens

    @property
    def text_first(self) -> bool:
        """True when the text tokens are a prefix of the sequence (FLUX, CogVideoX), False for a suffix (SD3)."""
        return self.text is not None and self.text.start == 0 and self.num_text > 0

    @property
    def visual(self) -> slice:
        """Slice of the visual tokens inside the sequence."""
        if self.text is None or self.num_text == 0:
            return slice(0, self.num_tokens)
        return slice(self.num_text, self.num_tokens) if self.text_first else slice(0, self.text.start)

    @property
    def has_grid(self) -> bool:
        return self.grid is not None and not self.is_cross

    @property
    def grid_unknown(self) -> bool:
        """True when this self/joint call has visual tokens whose grid could not be derived (:attr:`unknown`)."""
        return self.unknown is not None

    def visual_coords(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Grid coordinates of each visual token, shape ``(num_visual, len(grid))``, row-major as the model flattens."""
        if self.grid is None:
            raise LayoutError("this layout has no visual grid")
        return _coords(self.grid).to(device)


@lru_cache(maxsize=64)
def _coords(grid: Grid) -> torch.Tensor:
    axes = [torch.arange(s) for s in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


def downsampled_level(base: Grid, num_tokens: int) -> tuple[Grid, int] | None:
    """The grid a UNet level holds and its factor: ``base`` halved (rounding up, as stride-2 convs do) ``k`` times
    until it has ``num_tokens``; returns ``(grid, 2**k)``.

    Returns ``None`` when no level matches, so the caller can raise with its own context.
    """
    grid, factor = tuple(base), 1
    while True:
        if math.prod(grid) == num_tokens:
            return grid, factor
        if math.prod(grid) < num_tokens or all(s == 1 for s in grid):
            return None
        grid, factor = tuple(math.ceil(s / 2) for s in grid), factor * 2


def downsampled_grid(base: Grid, num_tokens: int) -> Grid | None:
    """The grid of :func:`downsampled_level` without its factor (``None`` when no level matches)."""
    level = downsampled_level(base, num_tokens)
    return None if level is None else level[0]


def square_grid(num_visual: int) -> Grid:
    """The square grid of ``num_visual`` tokens, for processors installed without :func:`diffaccel.apply`."""
    side = math.isqrt(num_visual)
    if side * side != num_visual:
        raise LayoutError(
            f"cannot infer the visual grid of {num_visual} tokens: it is not square. Install the processor with "
            "diffaccel.apply(pipe, method) so the grid is read from the latent shape."
        )
    return (side, side)
