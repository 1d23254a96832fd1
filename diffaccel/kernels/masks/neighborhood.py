"""Neighborhood attention (GNA / NATTEN): spec, torch ``mask_mod`` and Triton predicate.

Generalized Neighborhood Attention (Hassani et al., arXiv 2504.16922); semantics of NATTEN's Flex backend masks
(``natten/backends/flex.py``): per-dimension ``kernel_size``, ``stride``, ``dilation``, ``is_causal``, AND over
dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffaccel.kernels.masks._triton import jit, tl
from diffaccel.kernels.masks.base import KIND_NEIGHBORHOOD, MaskSpec, TextSpec, _check_grid, _per_dim


@jit
def _na_window(xq, n, k, s, d, causal):
    """NATTEN's window of each query on one axis: (dilation group, first key, span)."""
    gq = xq % d
    iq = xq // d
    n_g = n // d + (gq < (n % d)).to(tl.int32)
    left = k // 2
    right = k // 2 - (1 - k % 2)
    leader = tl.minimum((iq // s) * s + s // 2, n_g - 1)
    center = tl.minimum(tl.maximum(leader, left), n_g - 1 - right)
    leader_c = tl.minimum((iq // s) * s + (s - 1), n_g - 1)
    lo = tl.where(causal != 0, leader_c - k + 1, center - left)
    hi = tl.where(causal != 0, iq, center + right)
    return gq, lo, hi - lo


@jit
def _na_keep_axis(xq, xk, n, Params, HAS_DIL: tl.constexpr, UNIT_STRIDE: tl.constexpr):
    """One axis: keys (in-group coordinate) inside [lo, lo + span] of their query, via one subtraction and one
    unsigned compare (1-D per-query windows; the 2-D work per element stays a few integer ops).

    Dilation 1 and stride 1 are compile-time constants when the spec allows (``VARIANT``): the integer divisions
    by them then fold away, as when Triton specialized scalar arguments equal to 1."""
    if HAS_DIL:
        d = tl.load(Params + 2)
    else:
        d = 1
    if UNIT_STRIDE:
        s = 1
    else:
        s = tl.load(Params + 1)
    gq, lo, span = _na_window(xq, n, tl.load(Params), s, d, tl.load(Params + 3))
    keep = ((xk // d)[None, :] - lo[:, None]).to(tl.uint32) <= span[:, None].to(tl.uint32)
    if HAS_DIL:
        keep = keep & (gq[:, None] == (xk % d)[None, :])
    return keep


@jit
def neighborhood_keep(q0, q1, q2, k0, k1, k2, h, Params, G0, G1, G2, NDIM: tl.constexpr, VARIANT: tl.constexpr):
    """Predicate of :class:`NeighborhoodMask`. ``Params``: (kernel_size, stride, dilation, causal) for axes 0, 1, 2
    of the padded 3-D grid (12 ints); ``VARIANT``: bit 0 set when some dilation is > 1 (else dilation is the
    constant 1 and the group test is skipped), bit 1 set when every stride is 1 (then stride is the constant 1)."""
    keep = _na_keep_axis(q2, k2, G2, Params + 8, VARIANT % 2 == 1, VARIANT // 2 % 2 == 1)
    if NDIM >= 2:
        keep = keep & _na_keep_axis(q1, k1, G1, Params + 4, VARIANT % 2 == 1, VARIANT // 2 % 2 == 1)
    if NDIM >= 3:
        keep = keep & _na_keep_axis(q0, k0, G0, Params, VARIANT % 2 == 1, VARIANT // 2 % 2 == 1)
    return keep


@dataclass(frozen=True)
class NeighborhoodMask(MaskSpec):
    """Generalized Neighborhood Attention on the visual grid, exactly as NATTEN defines it.

    Per dimension of size ``n`` (``kernel_size`` k, ``stride`` s, ``dilation`` d, ``is_causal`` c): query and key
    must share the dilation group ``x mod d``; in group coordinates ``x' = x div d`` (group length ``n_g``):

    * non-causal: the stride group's leader ``min(floor(x'/s)*s + floor(s/2), n_g - 1)`` is clamped into
      ``[floor(k/2), n_g - 1 - R]`` with ``R = floor(k/2) - (1 if k even else 0)``; keys ``center - floor(k/2) ..
      center + R`` are kept, so every query sees exactly k keys (the window slides inward at borders);
    * causal: leader ``min(floor(x'/s)*s + s - 1, n_g - 1)``; keys ``j' <= x'`` with ``leader - j' < k``.

    The mask is the AND over dimensions. ``stride == kernel_size`` gives blocked (window) attention, ``stride == 1``
    sliding-window NA. Checks follow NATTEN: ``kernel_size * dilation <= n`` and ``1 <= stride <= kernel_size``.
    """

    kind: ClassVar[int] = KIND_NEIGHBORHOOD
    mask_fn: ClassVar = neighborhood_keep
    grid: tuple[int, ...]
    kernel_size: int | tuple[int, ...]
    stride: int | tuple[int, ...] = 1
    dilation: int | tuple[int, ...] = 1
    is_causal: bool | tuple[bool, ...] = False
    text: TextSpec | None = None

    def __post_init__(self) -> None:
        grid = _check_grid(self.grid)
        nd = len(grid)
        ks = _per_dim("kernel_size", self.kernel_size, nd)
        st = _per_dim("stride", self.stride, nd)
        dl = _per_dim("dilation", self.dilation, nd)
        ca = _per_dim("is_causal", self.is_causal, nd, bool)
        for i, (n, k, s, d) in enumerate(zip(grid, ks, st, dl)):
            if k < 1:
                raise ValueError(f"kernel_size must be >= 1 in every dimension, got {ks} (dimension {i})")
            if d < 1:
                raise ValueError(f"dilation must be >= 1 in every dimension, got {dl} (dimension {i})")
            if k * d > n:
                raise ValueError(
                    f"kernel_size * dilation must be <= the grid size in every dimension, got kernel_size {ks}, "
                    f"dilation {dl}, grid {grid} (dimension {i})"
                )
            if not (1 <= s <= k):
                raise ValueError(
                    f"stride must be in [1, kernel_size] in every dimension, got stride {st}, kernel_size {ks}"
                )
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "kernel_size", ks)
        object.__setattr__(self, "stride", st)
        object.__setattr__(self, "dilation", dl)
        object.__setattr__(self, "is_causal", ca)
        self._check_text()

    def _visual_mask(self, h, qc, kc):
        keep = None
        axes = zip(self.grid, self.kernel_size, self.stride, self.dilation, self.is_causal, qc, kc)  # type: ignore
        for n, k, s, d, c, xq, xk in axes:
            gq, iq = xq % d, xq // d
            gk, ik = xk % d, xk // d
            n_g = n // d + (gq < n % d).to(iq.dtype)  # length of the query's dilation group
            if c:
                leader = torch.minimum((iq // s) * s + (s - 1), n_g - 1)
                m = (ik <= iq) & (leader - ik < k)
            else:
                left = k // 2
                right = k // 2 - (1 - k % 2)
                leader = torch.minimum((iq // s) * s + s // 2, n_g - 1)
                center = torch.minimum(leader.clamp(min=left), n_g - 1 - right)
                m = (ik >= center - left) & (ik <= center + right)
            m = m & (gq == gk)
            keep = m if keep is None else keep & m
        return keep

    @property
    def kernel_variant(self) -> int:
        """Bit 0: some dilation > 1 (only then does the predicate compare dilation groups); bit 1: every stride
        is 1 (sliding-window NA; the predicate then divides by no runtime stride)."""
        return int(self.kernel_has_dilation) | (2 if all(s == 1 for s in self.stride) else 0)  # type: ignore

    @property
    def kernel_has_dilation(self) -> bool:
        return any(d > 1 for d in self.dilation)  # type: ignore[union-attr]

    def kernel_params(self) -> tuple[int, ...]:
        """(kernel_size, stride, dilation, causal) per axis of the padded 3-D grid (leading axes: 1, 1, 1, 0)."""
        pad = 3 - len(self.grid)
        params: list[int] = [1, 1, 1, 0] * pad
        for k, s, d, c in zip(self.kernel_size, self.stride, self.dilation, self.is_causal):
            params += [k, s, d, int(c)]
        return tuple(params)

