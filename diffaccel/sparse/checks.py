"""One checker per argument rule of the sparse layer, shared by :mod:`diffaccel.functional` and the methods.

Every checker raises :class:`~diffaccel.errors.ConfigError` (a ``ValueError``) naming the parameter, the value and
what is allowed. The NATTEN rules are those of ``natten/utils/checks.py`` (``kernel_size > 1``, ``dilation >= 1``,
``kernel_size * dilation <= size``, ``1 <= stride <= kernel_size``); the kernel-level spec
(:class:`~diffaccel.kernels.masks.NeighborhoodMask`) keeps its own structural check below this one.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from diffaccel.errors import ConfigError
from diffaccel.kernels.dispatch import BACKENDS

__all__ = [
    "BACKENDS",
    "check_backend",
    "check_block_size",
    "check_global_frames",
    "check_grid",
    "check_neighborhood_values",
    "check_radius",
    "neighborhood_parameters",
    "per_dim",
]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_backend(value: Any) -> str:
    """``backend`` must be one of :data:`BACKENDS`."""
    if value not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {value!r}")
    return value


def check_block_size(block_size: Any, name: str = "block_size") -> int:
    """A kernel block: a power of two >= 16 tokens (the Triton kernel's tile constraint)."""
    if not _is_int(block_size) or block_size < 16 or block_size & (block_size - 1):
        raise ConfigError(f"{name} must be a power of two >= 16 (kernel block, tokens), got {block_size!r}")
    return int(block_size)


def check_grid(grid: Any, *, dims: tuple[int, ...] = (1, 2, 3)) -> tuple[int, ...]:
    """A visual token grid: ``dims``-D tuple of positive ints (an int is a 1-D grid)."""
    if _is_int(grid):
        grid = (grid,)
    if not isinstance(grid, (list, tuple)) or len(grid) not in dims or not all(_is_int(g) and g >= 1 for g in grid):
        allowed = " or ".join(f"{d}-D" for d in dims)
        raise ConfigError(f"grid must be {allowed}: a tuple of positive integers (the visual token grid), got {grid!r}")
    return tuple(grid)


def per_dim(name: str, value: Any, ndim: int, *, kind: type = int) -> tuple:
    """One value or one per grid dimension, broadcast to ``ndim`` entries of type ``kind``."""
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * ndim
    if len(values) != ndim:
        raise ConfigError(f"{name} must be one value or one per grid dimension ({ndim}), got {value!r}")
    for x in values:
        ok = isinstance(x, bool) if kind is bool else _is_int(x)
        if not ok:
            raise ConfigError(f"{name} must hold {kind.__name__}s, got {value!r}")
    return values


def neighborhood_parameters(
    grid: tuple[int, ...],
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    is_causal: bool | Sequence[bool] = False,
    *,
    who: str = "",
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
    """Per-dimension NATTEN parameters, checked with NATTEN's rules (``natten/utils/checks.py``).

    ``kernel_size > 1`` (``1`` is accepted on a grid dimension of size 1, the only window it has: GNA's preset
    scaling gives it), ``dilation >= 1``, ``kernel_size * dilation <= size`` and ``1 <= stride <= kernel_size``
    in every dimension. ``who`` prefixes the message (``"gna: "``) so a method's error names the method.
    """
    nd = len(grid)
    ks = per_dim(who + "kernel_size", kernel_size, nd)
    st = per_dim(who + "stride", stride, nd)
    dl = per_dim(who + "dilation", dilation, nd)
    ca = per_dim(who + "is_causal", is_causal, nd, kind=bool)
    for i, (n, k) in enumerate(zip(grid, ks)):
        if k <= 1 and not (k == 1 == n):  # a grid dimension of size 1 takes the only window it has
            raise ConfigError(
                f"{who}kernel_size must be > 1 in every dimension (as in NATTEN; 1 only on a dimension of size 1), "
                f"got {ks} (dimension {i})"
            )
    check_neighborhood_values(None, None, dl, who=who)
    for i, (n, k, s, d) in enumerate(zip(grid, ks, st, dl)):
        if k * d > n:
            raise ConfigError(
                f"{who}kernel_size {ks} with dilation {dl} does not fit the grid {grid}: kernel_size * dilation must "
                f"be <= the grid size in every dimension (dimension {i}: {k} * {d} > {n}); use a smaller window, a "
                "per-layer override, or exclude the layer"
            )
        if not 1 <= s <= k:
            raise ConfigError(
                f"{who}stride must be in [1, kernel_size] in every dimension, got stride {st} with kernel_size {ks} "
                f"(dimension {i})"
            )
    return ks, st, dl, ca


def check_neighborhood_values(
    kernel_size: Any, stride: Any, dilation: Any, *, who: str = ""
) -> None:
    """The grid-free NATTEN minima: ``kernel_size > 1``, ``stride >= 1``, ``dilation >= 1`` (None: not given).

    Each argument is an int or a tuple of ints; :func:`neighborhood_parameters` adds the rules that need the grid.
    """
    for name, value, minimum, rule in (
        ("kernel_size", kernel_size, 2, "> 1 in every dimension (as in NATTEN)"),
        ("stride", stride, 1, ">= 1 in every dimension"),
        ("dilation", dilation, 1, ">= 1 in every dimension"),
    ):
        if value is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        for i, x in enumerate(values):
            if x < minimum:
                raise ConfigError(f"{who}{name} must be {rule}, got {value!r} (dimension {i})")


def check_global_frames(
    global_frames: Any, num_frames: int | None = None, heads: int | None = None, *, who: str = ""
) -> tuple[int, ...] | tuple[tuple[int, ...], ...]:
    """Explicit global frames of the attention-tile mask: frame indices, or one list per head.

    Indices are distinct integers >= 0 (and < ``num_frames`` when given); per-head lists need ``heads`` entries
    when ``heads`` is given. Returns a tuple (or a tuple of tuples).
    """
    g = global_frames
    if isinstance(g, (str, bytes)) or not isinstance(g, (list, tuple)):
        raise ConfigError(f"{who}global_frames must be a list of frame indices or one list per head, got {g!r}")
    per_head = len(g) > 0 and all(isinstance(x, (list, tuple)) for x in g)
    rows = [tuple(x) for x in g] if per_head else [tuple(g)]
    for row in rows:
        if any(not _is_int(f) or f < 0 for f in row):
            raise ConfigError(f"{who}global_frames must hold frame indices >= 0, got {g!r}")
        if len(set(row)) != len(row):
            raise ConfigError(f"{who}global_frames lists a frame twice: {g!r}")
        if num_frames is not None:
            bad = [f for f in row if f >= num_frames]
            if bad:
                raise ConfigError(
                    f"{who}global_frames {bad} are outside the clip's {num_frames} latent frames "
                    f"(frame indices in [0, {num_frames}))"
                )
    if per_head and heads is not None and len(rows) != heads:
        raise ConfigError(f"{who}global_frames gives {len(rows)} per-head lists but the layer has {heads} heads")
    return tuple(rows) if per_head else rows[0]


def check_radius(radius: Any) -> float:
    """CLEAR's window radius: a finite number > 0 (latent tokens)."""
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius <= 0:
        raise ConfigError(f"radius must be a finite number > 0 (latent tokens), got {radius!r}")
    return float(radius)
