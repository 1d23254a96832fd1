"""Timings of ``diffaccel generate`` that compare like with like: interleaved runs, warm-up excluded, spreads.

Timing all the dense calls and then all the method calls (or the reverse) lets whatever drifts over the run
(allocator and cache warm-up, clocks, other processes) look like a speedup. Here the sides alternate round by
round (method, dense, method, dense, ...), each side's first ``warmup`` calls are made before any timed call and
their times are dropped, and every side reports its median with the min-max range. The speedup is the ratio of
the medians; its spread is the min-max of the per-round ratios (each round's two calls ran back to back, so a
slow round slows both). The same ideas as ``triton.testing.do_bench`` (warm-up, then the median of repeats).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Side", "Spread", "Timing", "interleaved", "paired_ratio", "spread"]

T = TypeVar("T")


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of one pipeline call, and of the denoiser forwards inside it."""

    total_s: float
    denoise_s: float


@dataclass(frozen=True)
class Side(Generic[T]):
    """One side of a comparison: ``activate`` puts its attention in place (outside any timing); ``call(label)``
    makes one call and returns its result (the caller's clock reads are inside ``call``)."""

    label: str
    activate: Callable[[], None]
    call: Callable[[str], T]


def interleaved(sides: Sequence[Side[T]], warmup: int, repeats: int) -> list[list[T]]:
    """``warmup`` untimed rounds (results dropped), then ``repeats`` timed rounds; a round is one call per side, in
    the order of ``sides``.

    Returns the timed results, one list per side (``repeats`` each). A side is re-activated before each of its
    calls whenever another side ran in between, so with two sides the timed order is ``a, b, a, b, ...``.
    """
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    if not sides:
        raise ValueError("interleaved needs at least one side")
    active: list[int] = []  # index of the side whose attention is in place

    def run(i: int, label: str) -> T:
        if active != [i]:
            sides[i].activate()
            active[:] = [i]
        return sides[i].call(label)

    for w in range(warmup):  # warm-up rounds alternate too: the first switch back to a side is warmed up as well
        for i, side in enumerate(sides):
            run(i, f"{side.label} warm-up {w + 1}")
    timed: list[list[T]] = [[] for _ in sides]
    for r in range(repeats):
        for i, side in enumerate(sides):
            timed[i].append(run(i, side.label if repeats == 1 else f"{side.label} {r + 1}/{repeats}"))
    return timed


@dataclass(frozen=True)
class Spread:
    """Median and range of a few measurements."""

    median: float
    low: float
    high: float
    count: int

    def format(self, spec: str = ".3f", suffix: str = "") -> str:
        """``0.123`` for one value, ``0.123 (0.120-0.130)`` for several."""
        text = f"{format(self.median, spec)}{suffix}"
        if self.count > 1:
            text += f" ({format(self.low, spec)}-{format(self.high, spec)}{suffix})"
        return text


def spread(values: Sequence[float]) -> Spread:
    """The median, min and max of ``values`` (at least one)."""
    if not values:
        raise ValueError("spread needs at least one value")
    return Spread(statistics.median(values), min(values), max(values), len(values))


def paired_ratio(reference: Sequence[float], values: Sequence[float]) -> Spread | None:
    """``median(reference) / median(values)`` with the min-max of the per-round ratios ``reference[i] /
    values[i]``; ``None`` when a time is not positive (no meaningful ratio)."""
    if len(reference) != len(values) or not values:
        raise ValueError(f"paired_ratio needs two equally long non-empty lists, got {len(reference)} and {len(values)}")
    if min(values) <= 0 or min(reference) <= 0:
        return None
    ratios = [r / v for r, v in zip(reference, values, strict=True)]
    return Spread(statistics.median(reference) / statistics.median(values), min(ratios), max(ratios), len(ratios))
