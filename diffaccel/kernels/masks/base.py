"""Element mask specs, shared part: text placement (:class:`TextSpec`), the spec base class, :class:`CustomMask`.

Vocabulary follows FlexAttention (``torch.nn.attention.flex_attention``): a mask is a ``mask_mod(b, h, q_idx,
kv_idx) -> bool`` predicate. Each spec kind lives in its own module (``neighborhood.py``, ``circle.py``, ``tile.py``,
``shifted_window.py``) with three things side by side: the frozen dataclass, its torch ``mask_mod`` (the single
source of truth: block classification, torch ``BlockMask`` s and the PyTorch reference derive from it) and its
``@triton.jit`` predicate, which the block-sparse kernel receives as a constexpr and calls on partial tiles.

The predicate contract (``MaskSpec.mask_fn``)::

    keep = mask_fn(q0, q1, q2, k0, k1, k2, h, Params, G0, G1, G2, NDIM: tl.constexpr, VARIANT: tl.constexpr)

``q0..q2`` (``BLOCK_M``) and ``k0..k2`` (``BLOCK_N``) are the row-major visual coordinates of the tile's query and
key tokens on the grid ``(G0, G1, G2)`` (leading 1s for 1-D/2-D grids; ``NDIM`` real axes, the last ones); ``h``
the head; ``Params`` a pointer to the spec's packed int32 parameters (:meth:`MaskSpec.kernel_params`, layout
documented by each kind); ``VARIANT`` a spec-chosen compile-time switch (:attr:`MaskSpec.kernel_variant`). It
returns the ``(BLOCK_M, BLOCK_N)`` keep mask of the visual part; text rows/columns and sequence bounds are handled
by the kernel, generically. A new kind is a new module with a spec class and its predicate, no kernel edit.

Every spec takes an optional :class:`TextSpec`: text tokens at a prefix or a suffix of the sequence (which one is
the model's choice, told by its adapter) are dense rows and columns (text queries see every key, every query sees all text
keys). Arbitrary element masks go through :class:`CustomMask`, on the PyTorch reference path only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch

from diffaccel.kernels._util import _cdiv, _is_int  # noqa: F401 - _cdiv re-exported for the mask modules
from diffaccel.kernels.masks._triton import jit, tl

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Stable identifiers of the spec kinds (logs, tuning keys, pickles of old code). The kernel does not read them: it
# receives each spec's predicate (``mask_fn``) instead.
KIND_NONE = 0
KIND_NEIGHBORHOOD = 1
KIND_CIRCLE = 2
KIND_TILE = 3
KIND_SHIFTED_WINDOW = 4
KIND_CUSTOM = -1


@jit
def keep_all(q0, q1, q2, k0, k1, k2, h, Params, G0, G1, G2, NDIM: tl.constexpr, VARIANT: tl.constexpr):
    """The predicate of "no element mask" (``spec=None``): every in-bounds element of a partial block is kept."""
    return (q2[:, None] >= 0) & (k2[None, :] >= 0)


def _per_dim(name: str, value: Any, ndim: int, kind: type = int) -> tuple:
    """Broadcast an int (or bool) to one value per grid dimension; check the length of a sequence."""
    if isinstance(value, (list, tuple)):
        if len(value) != ndim:
            raise ValueError(f"{name} must have one entry per grid dimension ({ndim}), got {value!r}")
        out = tuple(value)
    else:
        out = (value,) * ndim
    for v in out:
        ok = isinstance(v, bool) if kind is bool else _is_int(v)
        if not ok:
            raise TypeError(f"{name} entries must be {kind.__name__}s, got {value!r}")
    return out


def _check_grid(grid: Any) -> tuple[int, ...]:
    if not isinstance(grid, (list, tuple)) or not (1 <= len(grid) <= 3) or not all(_is_int(g) and g >= 1 for g in grid):
        raise ValueError(f"grid must be 1 to 3 positive integers (the visual token grid), got {grid!r}")
    return tuple(grid)


def _unravel(idx: torch.Tensor, grid: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Row-major coordinates of flat visual indices on ``grid`` (the order models flatten latents)."""
    coords = []
    rest = idx
    for n in reversed(grid[1:]):
        coords.append(rest % n)
        rest = rest // n
    coords.append(rest)
    return tuple(reversed(coords))


@dataclass(frozen=True)
class TextSpec:
    """Text tokens that sit at the start (``"prefix"``) or end (``"suffix"``) of the sequence; dense in the mask."""

    length: int
    position: Literal["prefix", "suffix"] = "prefix"

    def __post_init__(self) -> None:
        if not _is_int(self.length) or self.length < 0:
            raise ValueError(f"TextSpec.length must be an integer >= 0, got {self.length!r}")
        if self.position not in ("prefix", "suffix"):
            raise ValueError(f"TextSpec.position must be 'prefix' or 'suffix', got {self.position!r}")



class MaskSpec:
    """Base of the element mask specs: text handling, coordinates, and the kernel's view of the spec.

    Subclasses are frozen dataclasses with a ``grid`` and a ``text`` field; they implement :meth:`_visual_mask`
    (torch) and :meth:`kernel_params`, and set :attr:`mask_fn` to their ``@triton.jit`` predicate, which computes
    the same set as :meth:`_visual_mask` from token coordinates (tested equal).
    """

    kind: ClassVar[int]
    mask_fn: ClassVar[Any] = None
    """The kind's Triton predicate (contract in this module's docstring); the kernel takes it as a constexpr."""
    grid: tuple[int, ...]
    text: TextSpec | None

    # -- token layout -------------------------------------------------------------------------------------------
    @property
    def num_visual(self) -> int:
        return math.prod(self.grid)

    @property
    def num_text(self) -> int:
        return 0 if self.text is None else self.text.length

    @property
    def num_tokens(self) -> int:
        """Sequence length the spec describes (queries and keys): text plus visual tokens."""
        return self.num_visual + self.num_text

    @property
    def text_mode(self) -> int:
        """0: no text, 1: text prefix, 2: text suffix (the kernel's ``TEXT_MODE``)."""
        if self.text is None or self.text.length == 0:
            return 0
        return 1 if self.text.position == "prefix" else 2

    @property
    def num_mask_heads(self) -> int:
        """1 when the mask is the same for every head; otherwise the number of heads it describes."""
        return 1

    # -- FlexAttention-style predicate --------------------------------------------------------------------------
    @functools.cached_property
    def mask_mod(self) -> MaskMod:
        """The spec as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` (a plain 4-argument function).

        True where query ``q_idx`` may attend key ``kv_idx`` (indices into the whole sequence, text included).
        The function carries the spec (``mask_mod.__diffaccel_spec__``), so a ``BlockMask`` built from it converts
        back to a :class:`SparseBlockMask` with the same element mask.
        """
        spec = self

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return spec._mask(h, q_idx, kv_idx)

        mask_mod.__diffaccel_spec__ = spec  # type: ignore[attr-defined]
        return mask_mod

    def _mask(self, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        nt, nv = self.num_text, self.num_visual
        mode = self.text_mode
        if mode == 0:
            return self._visual_mask(h, _unravel(q_idx, self.grid), _unravel(kv_idx, self.grid))
        if mode == 1:
            q_text, k_text = q_idx < nt, kv_idx < nt
            qv, kv = q_idx - nt, kv_idx - nt
        else:
            q_text, k_text = q_idx >= nv, kv_idx >= nv
            qv, kv = q_idx, kv_idx
        qv = qv.clamp(0, nv - 1)
        kv = kv.clamp(0, nv - 1)
        vis = self._visual_mask(h, _unravel(qv, self.grid), _unravel(kv, self.grid))
        return q_text | k_text | vis

    def _visual_mask(self, h: torch.Tensor, qc: tuple[torch.Tensor, ...], kc: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise NotImplementedError

    # -- kernel view ----------------------------------------------------------------------------------------------
    def kernel_grid(self) -> tuple[int, int, int]:
        """The grid as three sizes (leading 1s), as the kernel computes coordinates."""
        return (1,) * (3 - len(self.grid)) + tuple(self.grid)  # type: ignore[return-value]

    def kernel_params(self) -> tuple[int, ...]:
        """The kind's integer parameters, packed in the order its predicate reads them from ``Params``."""
        raise NotImplementedError

    def kernel_param_tensor(self, device: torch.device | str) -> torch.Tensor:
        """:meth:`kernel_params` as one int32 tensor on ``device`` (cached per spec and device)."""
        return _param_tensor(self, str(torch.device(device)))

    @property
    def kernel_variant(self) -> int:
        """A compile-time switch of the predicate (its ``VARIANT`` constexpr); 0 unless the kind says otherwise."""
        return 0

    @property
    def kernel_ndim(self) -> int:
        """Grid dimensions the kernel evaluates (the last ones of :meth:`kernel_grid`)."""
        return len(self.grid)

    def kernel_table(self, device: torch.device | str) -> torch.Tensor | None:
        """A per-head int32 lookup table (only :class:`TileMask` has one; the kernel reads it inside ``Params``)."""
        return None

    def __getstate__(self) -> dict:
        # The cached mask_mod closure does not pickle; it is rebuilt on first use.
        state = dict(self.__dict__)
        state.pop("mask_mod", None)
        return state

    def _check_text(self) -> None:
        if self.text is not None and not isinstance(self.text, TextSpec):
            raise TypeError(f"text must be a TextSpec or None, got {self.text!r}")



@dataclass(frozen=True)
class CustomMask:
    """An arbitrary ``mask_mod`` for partial blocks. Only the PyTorch reference evaluates it (the kernel refuses)."""

    kind: ClassVar[int] = KIND_CUSTOM
    mask_mod: MaskMod
    num_mask_heads: int = 1


Spec = MaskSpec | CustomMask



Spec = MaskSpec | CustomMask


@functools.lru_cache(maxsize=128)
def _param_tensor(spec: MaskSpec, device: str) -> torch.Tensor:
    params = spec.kernel_params()
    return torch.tensor(params if params else (0,), dtype=torch.int32).to(device)
