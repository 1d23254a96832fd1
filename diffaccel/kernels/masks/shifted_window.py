"""HiDiffusion MSW-MSA shifted windows (Zhang et al., ECCV 2024): spec, torch ``mask_mod`` and Triton predicate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


from diffaccel.kernels.masks._triton import jit, tl
from diffaccel.kernels.masks.base import KIND_SHIFTED_WINDOW, MaskSpec, TextSpec, _check_grid, _per_dim


@jit
def _window_id(c0, c1, c2, G0, G1, G2, W0, W1, W2, S0, S1, S2):
    """Window index of each token after rolling the grid by -shift."""
    w0 = (c0 - S0 + G0) % G0 // W0
    w1 = (c1 - S1 + G1) % G1 // W1
    w2 = (c2 - S2 + G2) % G2 // W2
    return (w0 * ((G1 + W1 - 1) // W1) + w1) * ((G2 + W2 - 1) // W2) + w2


@jit
def shifted_window_keep(q0, q1, q2, k0, k1, k2, h, Params, G0, G1, G2, NDIM: tl.constexpr, VARIANT: tl.constexpr):
    """Predicate of :class:`ShiftedWindowMask`. ``Params``: (window per axis (3), shift per axis (3)) of the padded
    3-D grid (leading axes: window 1, shift 0)."""
    # Padded leading axes (NDIM < 3) have window 1 and shift 0: constants, so their divisions fold away.
    if NDIM >= 3:
        W0 = tl.load(Params)
        S0 = tl.load(Params + 3)
    else:
        W0 = 1
        S0 = 0
    if NDIM >= 2:
        W1 = tl.load(Params + 1)
        S1 = tl.load(Params + 4)
    else:
        W1 = 1
        S1 = 0
    W2 = tl.load(Params + 2)
    S2 = tl.load(Params + 5)
    wq = _window_id(q0, q1, q2, G0, G1, G2, W0, W1, W2, S0, S1, S2)
    wk = _window_id(k0, k1, k2, G0, G1, G2, W0, W1, W2, S0, S1, S2)
    return wq[:, None] == wk[None, :]


@dataclass(frozen=True)
class ShiftedWindowMask(MaskSpec):
    """Non-overlapping windows on the grid rolled by ``-shift`` (MSW-MSA, HiDiffusion; Swin's cyclic shift).

    Token at coordinate ``x`` (per dimension) is in window ``((x - shift) mod n) // window``: exactly the windows
    that ``torch.roll(x, -shift)`` followed by a partition gives, with tokens wrapped across the border attending
    to each other (HiDiffusion applies no Swin wrap-around mask). ``window`` need not divide the grid: the last
    window of a dimension is then smaller. HiDiffusion uses ``window = ceil(n / 2)`` and ``shift`` in
    ``{0, 1/4, 1/2, 3/4}`` of the window.
    """

    kind: ClassVar[int] = KIND_SHIFTED_WINDOW
    mask_fn: ClassVar = shifted_window_keep
    grid: tuple[int, ...]
    window: int | tuple[int, ...]
    shift: int | tuple[int, ...] = 0
    text: TextSpec | None = None

    def __post_init__(self) -> None:
        grid = _check_grid(self.grid)
        nd = len(grid)
        win = _per_dim("window", self.window, nd)
        sh = _per_dim("shift", self.shift, nd)
        for n, w, s in zip(grid, win, sh):
            if not (1 <= w <= n):
                raise ValueError(f"window must be in [1, grid size] in every dimension, got window {win}, grid {grid}")
            if not (0 <= s < n):
                raise ValueError(f"shift must be in [0, grid size) in every dimension, got shift {sh}, grid {grid}")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "window", win)
        object.__setattr__(self, "shift", sh)
        self._check_text()

    def _visual_mask(self, h, qc, kc):
        keep = None
        for n, w, s, xq, xk in zip(self.grid, self.window, self.shift, qc, kc):
            m = ((xq - s + n) % n) // w == ((xk - s + n) % n) // w
            keep = m if keep is None else keep & m
        return keep

    def kernel_params(self) -> tuple[int, ...]:
        pad = 3 - len(self.grid)
        return (1,) * pad + tuple(self.window) + (0,) * pad + tuple(self.shift)

