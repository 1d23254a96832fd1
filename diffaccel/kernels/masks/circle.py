"""CLEAR's circular window (Liu et al., arXiv 2412.16112): spec, torch ``mask_mod`` and Triton predicate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar


from diffaccel.kernels.masks._triton import jit, tl
from diffaccel.kernels.masks.base import KIND_CIRCLE, MaskSpec, TextSpec, _check_grid


@jit
def circle_keep(q0, q1, q2, k0, k1, k2, h, Params, G0, G1, G2, NDIM: tl.constexpr, VARIANT: tl.constexpr):
    """Predicate of :class:`CircleMask`. ``Params``: (largest kept integer squared distance,)."""
    d2 = q2[:, None] - k2[None, :]
    dist = d2 * d2
    if NDIM >= 2:
        d1 = q1[:, None] - k1[None, :]
        dist += d1 * d1
    if NDIM >= 3:
        d0 = q0[:, None] - k0[None, :]
        dist += d0 * d0
    return dist <= tl.load(Params)


@dataclass(frozen=True)
class CircleMask(MaskSpec):
    """CLEAR's circular window: visual keys at squared Euclidean grid distance ``< radius**2`` from the query.

    Not clamped at borders (border queries see fewer keys). The kernel compares the integer squared distance
    with :attr:`max_sq_dist` ``= ceil(radius**2) - 1``, which is the same set for integer distances.
    """

    kind: ClassVar[int] = KIND_CIRCLE
    mask_fn: ClassVar = circle_keep
    grid: tuple[int, ...]
    radius: float
    text: TextSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", _check_grid(self.grid))
        if isinstance(self.radius, bool) or not isinstance(self.radius, (int, float)) or not self.radius > 0:
            raise ValueError(f"radius must be a number > 0 (in latent tokens), got {self.radius!r}")
        self._check_text()

    @property
    def max_sq_dist(self) -> int:
        return math.ceil(float(self.radius) * float(self.radius)) - 1

    def _visual_mask(self, h, qc, kc):
        d2 = None
        for xq, xk in zip(qc, kc):
            t = (xq - xk) * (xq - xk)
            d2 = t if d2 is None else d2 + t
        return d2 <= self.max_sq_dist

    def kernel_params(self) -> tuple[int, ...]:
        return (self.max_sq_dist,)

