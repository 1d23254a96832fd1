"""Block-sparse attention masks: element mask specs and the block index structure the kernel iterates.

Vocabulary follows FlexAttention (``torch.nn.attention.flex_attention``): a mask is a ``mask_mod(b, h, q_idx,
kv_idx) -> bool`` predicate; per (batch, head, query block) a :class:`SparseBlockMask` lists the *full* key blocks
(every in-bounds element kept, no element mask needed) and the *partial* key blocks (some kept: the kernel evaluates
the element mask on them). Key blocks in neither list are skipped without being read.

The mask specs below are small frozen dataclasses. Each one's ``mask_mod`` (plain torch, vmap-friendly) is the single
source of truth: the block classification, torch ``BlockMask`` s (``create_block_mask``) and the PyTorch reference
are all derived from it, and the Triton kernel evaluates the same predicate from token coordinates (tested equal).

Kinds (the value of ``kind`` is the kernel's ``MASK_KIND`` constexpr):

==========================  =====================================================================================
:class:`NeighborhoodMask`   GNA / NATTEN neighborhood: per-dimension ``kernel_size``, ``stride``, ``dilation``,
                            ``is_causal``, AND over dimensions (Hassani et al., arXiv 2504.16922; semantics of
                            NATTEN's Flex backend masks, ``natten/backends/flex.py``).
:class:`CircleMask`         CLEAR: keys within Euclidean distance ``< radius`` of the query on the visual grid, no
                            clamping at the borders (Liu et al., arXiv 2412.16112).
:class:`TileMask`           Efficient-vDiT attention tiles: each frame attends to itself and to global frames;
                            global frames attend to everything (Ding et al., arXiv 2502.06155).
:class:`ShiftedWindowMask`  HiDiffusion MSW-MSA: non-overlapping windows on the grid cyclically rolled by ``-shift``
                            (``torch.roll(x, -shift)`` then partition, no wrap-around mask; Zhang et al., ECCV 2024).
==========================  =====================================================================================

Every spec takes an optional :class:`TextSpec`: text tokens at a prefix (FLUX, CogVideoX, HunyuanVideo) or suffix
(SD3) of the sequence are dense rows and columns (text queries see every key, every query sees all text keys).

Arbitrary element masks are supported through :class:`CustomMask` on the PyTorch reference path only: the kernel
evaluates a fixed set of predicates and refuses a custom one with a clear error.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Kernel MASK_KIND values. 0 = no element mask (only sequence bounds).
KIND_NONE = 0
KIND_NEIGHBORHOOD = 1
KIND_CIRCLE = 2
KIND_TILE = 3
KIND_SHIFTED_WINDOW = 4
KIND_CUSTOM = -1

NUM_KERNEL_PARAMS = 12
"""Integer mask parameters the kernel receives (unused ones are 0)."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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

    Subclasses are frozen dataclasses with a ``grid`` and a ``text`` field and implement :meth:`_visual_mask`
    (torch) and :meth:`kernel_params`; the Triton kernel mirrors :meth:`_visual_mask` for the same ``kind``.
    """

    kind: ClassVar[int]
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
        """The kind's integer parameters, padded to :data:`NUM_KERNEL_PARAMS`."""
        raise NotImplementedError

    @property
    def kernel_ndim(self) -> int:
        """Grid dimensions the kernel evaluates (the last ones of :meth:`kernel_grid`)."""
        return len(self.grid)

    @property
    def kernel_has_dilation(self) -> bool:
        return False

    def kernel_table(self, device: torch.device | str) -> torch.Tensor | None:
        """A per-head int32 lookup table the kernel reads (only :class:`TileMask` has one)."""
        return None

    def __getstate__(self) -> dict:
        # The cached mask_mod closure does not pickle; it is rebuilt on first use.
        state = dict(self.__dict__)
        state.pop("mask_mod", None)
        return state

    def _check_text(self) -> None:
        if self.text is not None and not isinstance(self.text, TextSpec):
            raise TypeError(f"text must be a TextSpec or None, got {self.text!r}")


def _pad_params(params: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(params) + (0,) * (NUM_KERNEL_PARAMS - len(params))


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
    def kernel_has_dilation(self) -> bool:
        return any(d > 1 for d in self.dilation)  # type: ignore[union-attr]

    def kernel_params(self) -> tuple[int, ...]:
        pad = 3 - len(self.grid)
        params: list[int] = [1, 1, 1, 0] * pad
        for k, s, d, c in zip(self.kernel_size, self.stride, self.dilation, self.is_causal):
            params += [k, s, d, int(c)]
        return _pad_params(tuple(params))


@dataclass(frozen=True)
class CircleMask(MaskSpec):
    """CLEAR's circular window: visual keys at squared Euclidean grid distance ``< radius**2`` from the query.

    Not clamped at borders (border queries see fewer keys). The kernel compares the integer squared distance
    with :attr:`max_sq_dist` ``= ceil(radius**2) - 1``, which is the same set for integer distances.
    """

    kind: ClassVar[int] = KIND_CIRCLE
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
        return _pad_params((self.max_sq_dist,))


@dataclass(frozen=True)
class TileMask(MaskSpec):
    """Efficient-vDiT "attention tile" mask (the ``g : (T - g)`` family) on a ``(frames, ...)`` grid.

    A query in frame ``f`` attends to keys of frame ``f`` and of every global frame; queries in a global frame
    attend to every frame. ``global_frames`` is one tuple of frame indices shared by all heads, or one tuple per
    head (then the mask has ``len(global_frames)`` heads). Which frames are global is the caller's choice (the
    paper's choice is not stated; see ``research/locality.md`` §2.2).
    """

    kind: ClassVar[int] = KIND_TILE
    grid: tuple[int, ...]
    global_frames: tuple[int, ...] | tuple[tuple[int, ...], ...] = ()
    text: TextSpec | None = None

    def __post_init__(self) -> None:
        grid = _check_grid(self.grid)
        object.__setattr__(self, "grid", grid)
        gf = self.global_frames
        if not isinstance(gf, (list, tuple)):
            raise TypeError(f"global_frames must be a tuple of frame indices (or one tuple per head), got {gf!r}")
        per_head = len(gf) > 0 and all(isinstance(x, (list, tuple)) for x in gf)
        rows = [tuple(x) for x in gf] if per_head else [tuple(gf)]
        for row in rows:
            for f in row:
                if not _is_int(f) or not (0 <= f < grid[0]):
                    raise ValueError(f"global_frames entries must be frame indices in [0, {grid[0]}), got {gf!r}")
        object.__setattr__(self, "global_frames", tuple(rows) if per_head else rows[0])
        self._check_text()

    @property
    def per_head(self) -> bool:
        return len(self.global_frames) > 0 and isinstance(self.global_frames[0], tuple)

    @property
    def num_mask_heads(self) -> int:
        return len(self.global_frames) if self.per_head else 1

    def kernel_table(self, device: torch.device | str) -> torch.Tensor:
        return _tile_table(self, str(torch.device(device)))

    @functools.cached_property
    def _bool_tables(self) -> dict[torch.device, torch.Tensor]:
        """The global-frame table as bool, per device, filled on first eager use there (and by ``kernel_table``'s
        users through :meth:`bool_table`). ``mask_mod`` reads it with a plain dict lookup, no cached call, so
        torch.compile (FlexAttention) traces it: the table becomes a captured constant."""
        return {}

    def bool_table(self, device: torch.device | str) -> torch.Tensor:
        """``kernel_table(device)`` as bool, created once per device."""
        device = torch.device(device)
        table = self._bool_tables.get(device)
        if table is None:
            table = self._bool_tables[device] = _tile_table(self, str(device)).bool()
        return table

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_bool_tables", None)
        return state

    def _visual_mask(self, h, qc, kc):
        tables = self._bool_tables
        table = tables.get(qc[0].device)
        if table is None:  # first eager use on this device; traced calls find it filled
            table = self.bool_table(qc[0].device)
        fq, fk = qc[0], kc[0]
        head = h if self.per_head else torch.zeros_like(fq)
        gq = table[head, fq]
        gk = table[head, fk]
        return (fq == fk) | gq | gk

    def kernel_grid(self) -> tuple[int, int, int]:
        # frames first, everything else flattened: the kernel only needs the frame index.
        return (self.grid[0], 1, math.prod(self.grid[1:]))

    def kernel_params(self) -> tuple[int, ...]:
        return _pad_params(())


@functools.lru_cache(maxsize=64)
def _tile_table(spec: TileMask, device: str) -> torch.Tensor:
    rows = spec.global_frames if spec.per_head else (spec.global_frames,)
    table = torch.zeros(len(rows), spec.grid[0], dtype=torch.int32)
    for i, row in enumerate(rows):
        for f in row:
            table[i, f] = 1
    return table.to(device)


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
        return _pad_params((1,) * pad + tuple(self.window) + (0,) * pad + tuple(self.shift))


@dataclass(frozen=True)
class CustomMask:
    """An arbitrary ``mask_mod`` for partial blocks. Only the PyTorch reference evaluates it (the kernel refuses)."""

    kind: ClassVar[int] = KIND_CUSTOM
    mask_mod: MaskMod
    num_mask_heads: int = 1


Spec = MaskSpec | CustomMask


# ---------------------------------------------------------------------------------------------------------------
# Block classification
# ---------------------------------------------------------------------------------------------------------------

_CLASSIFY_CHUNK_ELEMENTS = 1 << 24


def classify_blocks(
    spec: Spec,
    q_len: int,
    kv_len: int,
    q_block_size: int,
    kv_block_size: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (query block, key block) pairs are full, partial or empty under ``spec``.

    Returns ``(full, partial)``, bool tensors of shape ``(num_mask_heads, num_q_blocks, num_kv_blocks)``. Elements
    past ``q_len`` / ``kv_len`` are ignored (the kernel masks sequence bounds itself), so a tail block whose
    in-bounds elements are all kept is full. Computed by evaluating ``spec.mask_mod`` in chunks of query blocks
    on ``device``; results are cached per (spec, lengths, block sizes, device): treat them as read-only.
    """
    device = str(torch.device(device))
    return _classify_cached(spec, int(q_len), int(kv_len), int(q_block_size), int(kv_block_size), device)


@functools.lru_cache(maxsize=32)
def _classify_cached(spec: Spec, q_len: int, kv_len: int, qbs: int, kvbs: int, device: str):
    dev = torch.device(device)
    nqb, nkb = _cdiv(q_len, qbs), _cdiv(kv_len, kvbs)
    hs = spec.num_mask_heads
    heads = torch.arange(hs, device=dev).view(hs, 1, 1)
    kv = torch.arange(nkb * kvbs, device=dev)
    kv_in = (kv < kv_len).view(1, 1, -1)
    kv_c = kv.clamp(max=kv_len - 1).view(1, 1, -1)
    full = torch.empty(hs, nqb, nkb, dtype=torch.bool, device=dev)
    anyk = torch.empty_like(full)
    step = max(1, _CLASSIFY_CHUNK_ELEMENTS // (hs * qbs * nkb * kvbs))
    zero = torch.zeros((), dtype=torch.long, device=dev)
    for qb0 in range(0, nqb, step):
        qb1 = min(nqb, qb0 + step)
        q = torch.arange(qb0 * qbs, qb1 * qbs, device=dev)
        q_in = (q < q_len).view(1, -1, 1)
        q_c = q.clamp(max=q_len - 1).view(1, -1, 1)
        m = spec.mask_mod(zero, heads, q_c, kv_c).expand(hs, q.numel(), kv.numel())
        inb = q_in & kv_in
        shape = (hs, qb1 - qb0, qbs, nkb, kvbs)
        full[:, qb0:qb1] = (m | ~inb).view(shape).transpose(2, 3).reshape(hs, qb1 - qb0, nkb, -1).all(-1)
        anyk[:, qb0:qb1] = (m & inb).view(shape).transpose(2, 3).reshape(hs, qb1 - qb0, nkb, -1).any(-1)
    return full, anyk & ~full


def _indices_from_keep(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and ascending indices (kept first) of the True entries of ``keep`` along its last dimension."""
    counts = keep.sum(-1, dtype=torch.int32)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts.contiguous(), order.contiguous()


def _keep_from_indices(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    nkb = indices.shape[-1]
    valid = torch.arange(nkb, device=indices.device) < counts.unsqueeze(-1).long()
    keep = torch.zeros(indices.shape, dtype=torch.int32, device=indices.device)
    keep.scatter_add_(-1, indices.long().clamp(0, nkb - 1), valid.to(torch.int32))
    return keep


# ---------------------------------------------------------------------------------------------------------------
# SparseBlockMask
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SparseBlockMask:
    """Per (batch, head, query block): the key blocks to visit, split into full and partial ones.

    Same fields as FlexAttention's ``BlockMask`` (``kv_num_blocks`` / ``kv_indices`` are the *partial* blocks,
    ``full_kv_num_blocks`` / ``full_kv_indices`` the full ones); indices are ascending with the kept ones first.
    Leading dimensions are ``(B or 1, H or 1)`` and broadcast over the batch and heads of the attention call.
    ``spec`` is the element mask of partial blocks (``None``: every in-bounds element of a kept block is kept).
    Build one with :meth:`from_spec`, :meth:`from_block_keep`, :meth:`dense` or :meth:`from_block_mask`.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor | None
    full_kv_indices: torch.Tensor | None
    q_len: int
    kv_len: int
    q_block_size: int = 128
    kv_block_size: int = 128
    spec: Spec | None = None
    num_full: int = field(init=False, default=0)
    num_partial: int = field(init=False, default=0)
    derived: dict = field(init=False, default_factory=dict, repr=False, compare=False)
    """Per-mask values the kernels derive from it once (launch arguments), keyed by their user; not part of it."""

    def __post_init__(self) -> None:
        for name in ("q_len", "kv_len", "q_block_size", "kv_block_size"):
            val = getattr(self, name)
            if not _is_int(val) or val < 1:
                raise ValueError(f"SparseBlockMask.{name} must be an integer >= 1, got {val!r}")
        for name, bs in (("q_block_size", self.q_block_size), ("kv_block_size", self.kv_block_size)):
            if bs < 16 or bs & (bs - 1):
                raise ValueError(f"SparseBlockMask.{name} must be a power of two >= 16, got {bs}")
        if self.spec is not None and not isinstance(self.spec, (MaskSpec, CustomMask)):
            raise TypeError(
                f"spec must be a mask spec from diffaccel.kernels.masks or None, got {type(self.spec).__name__}"
            )
        spec_n = self.spec.num_tokens if isinstance(self.spec, MaskSpec) else None
        if spec_n is not None and (self.q_len != spec_n or self.kv_len != spec_n):
            raise ValueError(
                f"the mask spec describes {self.spec.num_tokens} tokens (grid {self.spec.grid}, {self.spec.num_text} "
                f"text) but the block mask has q_len={self.q_len}, kv_len={self.kv_len}"
            )
        nqb, nkb = self.num_q_blocks, self.num_kv_blocks
        num, idx = self.kv_num_blocks, self.kv_indices
        fnum, fidx = self.full_kv_num_blocks, self.full_kv_indices
        if (fnum is None) != (fidx is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices must both be given or both be None")
        if fnum is None:
            fnum, fidx = torch.zeros_like(num), torch.zeros_like(idx)
        for name, t, nd in (("kv_num_blocks", num, 3), ("kv_indices", idx, 4), ("full_kv_num_blocks", fnum, 3),
                            ("full_kv_indices", fidx, 4)):
            if not isinstance(t, torch.Tensor) or t.dim() != nd or t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor with {nd} dimensions, got {_describe(t)}")
        counts_ok = num.shape[-1] == nqb and fnum.shape[-1] == nqb
        if not counts_ok or idx.shape[-2:] != (nqb, nkb) or fidx.shape[-2:] != (nqb, nkb):
            raise ValueError(
                f"block mask shapes do not match q_len={self.q_len}, kv_len={self.kv_len} with blocks "
                f"({self.q_block_size}, {self.kv_block_size}): expected (..., {nqb}) counts and (..., {nqb}, {nkb}) "
                f"indices, got {tuple(num.shape)}, {tuple(idx.shape)}, {tuple(fnum.shape)}, {tuple(fidx.shape)}"
            )
        devices = {t.device for t in (num, idx, fnum, fidx)}
        if len(devices) != 1:
            raise ValueError(f"block mask tensors must be on one device, got {sorted(map(str, devices))}")
        try:
            lead = torch.broadcast_shapes(num.shape[:2], idx.shape[:2], fnum.shape[:2], fidx.shape[:2])
        except RuntimeError:
            raise ValueError(
                f"block mask leading (batch, head) dimensions do not broadcast: {tuple(num.shape[:2])}, "
                f"{tuple(idx.shape[:2])}, {tuple(fnum.shape[:2])}, {tuple(fidx.shape[:2])}"
            ) from None
        num, fnum = (t.expand(*lead, nqb).to(torch.int32).contiguous() for t in (num, fnum))
        idx, fidx = (t.expand(*lead, nqb, nkb).to(torch.int32).contiguous() for t in (idx, fidx))
        # Validate values once here (one device sync per mask), so the kernel never reads out of range.
        for name, c, i in (("kv", num, idx), ("full_kv", fnum, fidx)):
            if bool(((c < 0) | (c > nkb)).any()):
                raise ValueError(f"{name}_num_blocks must be in [0, {nkb}]")
            valid = torch.arange(nkb, device=c.device) < c.unsqueeze(-1)
            if bool((valid & ((i < 0) | (i >= nkb))).any()):
                raise ValueError(f"{name}_indices must be key block indices in [0, {nkb}) for the first counts entries")
        keep_p, keep_f = _keep_from_indices(num, idx), _keep_from_indices(fnum, fidx)
        if bool(((keep_p + keep_f) > 1).any()):
            raise ValueError("a key block is listed twice (repeated, or both full and partial) for some query block")
        object.__setattr__(self, "kv_num_blocks", num)
        object.__setattr__(self, "kv_indices", idx)
        object.__setattr__(self, "full_kv_num_blocks", fnum)
        object.__setattr__(self, "full_kv_indices", fidx)
        object.__setattr__(self, "num_partial", int(num.sum()))
        object.__setattr__(self, "num_full", int(fnum.sum()))

    # -- shape ----------------------------------------------------------------------------------------------------
    @property
    def num_q_blocks(self) -> int:
        return _cdiv(self.q_len, self.q_block_size)

    @property
    def num_kv_blocks(self) -> int:
        return _cdiv(self.kv_len, self.kv_block_size)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B or 1, H or 1, q_len, kv_len)``, like ``BlockMask.shape``."""
        return (*self.kv_num_blocks.shape[:2], self.q_len, self.kv_len)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    @property
    def density(self) -> float:
        """Fraction of (query block, key block) pairs visited, averaged over the leading dimensions."""
        total = self.kv_num_blocks.numel() * self.num_kv_blocks
        return (self.num_full + self.num_partial) / total

    def block_keep(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean ``(full, partial)`` block matrices of shape ``(B or 1, H or 1, num_q_blocks, num_kv_blocks)``."""
        assert self.full_kv_num_blocks is not None and self.full_kv_indices is not None
        full = _keep_from_indices(self.full_kv_num_blocks, self.full_kv_indices) > 0
        partial = _keep_from_indices(self.kv_num_blocks, self.kv_indices) > 0
        return full, partial

    def to(self, device: torch.device | str) -> SparseBlockMask:
        if torch.device(device) == self.device:
            return self
        assert self.full_kv_num_blocks is not None and self.full_kv_indices is not None
        return SparseBlockMask(
            self.kv_num_blocks.to(device), self.kv_indices.to(device), self.full_kv_num_blocks.to(device),
            self.full_kv_indices.to(device), self.q_len, self.kv_len, self.q_block_size, self.kv_block_size, self.spec,
        )

    # -- constructors -----------------------------------------------------------------------------------------------
    @classmethod
    def from_block_keep(
        cls,
        full: torch.Tensor,
        partial: torch.Tensor | None = None,
        *,
        q_len: int,
        kv_len: int,
        q_block_size: int = 128,
        kv_block_size: int = 128,
        spec: Spec | None = None,
    ) -> SparseBlockMask:
        """From boolean block matrices ``(B or 1, H or 1, num_q_blocks, num_kv_blocks)`` (or 2-D/3-D, broadcast).

        ``full`` blocks are visited without an element mask, ``partial`` ones with ``spec``'s element mask.
        """
        def _as4(t: torch.Tensor, name: str) -> torch.Tensor:
            if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or not (2 <= t.dim() <= 4):
                raise ValueError(f"{name} must be a bool tensor with 2 to 4 dimensions, got {_describe(t)}")
            while t.dim() < 4:
                t = t.unsqueeze(0)
            return t

        full = _as4(full, "full")
        partial = torch.zeros_like(full) if partial is None else _as4(partial, "partial")
        lead = torch.broadcast_shapes(full.shape[:2], partial.shape[:2])
        full = full.expand(*lead, *full.shape[2:])
        partial = partial.expand(*lead, *partial.shape[2:])
        fnum, fidx = _indices_from_keep(full)
        num, idx = _indices_from_keep(partial & ~full)
        return cls(num, idx, fnum, fidx, q_len, kv_len, q_block_size, kv_block_size, spec)

    @classmethod
    def from_spec(
        cls,
        spec: Spec,
        q_block_size: int = 128,
        kv_block_size: int | None = None,
        *,
        device: torch.device | str = "cpu",
        block_keep: torch.Tensor | None = None,
        q_len: int | None = None,
        kv_len: int | None = None,
    ) -> SparseBlockMask:
        """Classify every block pair under ``spec`` (cached); optionally keep only blocks where ``block_keep`` is True.

        ``block_keep`` (bool, ``(B or 1, H or 1, num_q_blocks, num_kv_blocks)``) combines a block-level selection
        (PARO, AdaSpa) with the element mask: the result keeps ``block_keep AND spec``. ``q_len``/``kv_len`` are
        only needed for a :class:`CustomMask` (the other specs know their length).
        """
        kv_block_size = q_block_size if kv_block_size is None else kv_block_size
        if isinstance(spec, MaskSpec):
            n = spec.num_tokens
            if (q_len is not None and q_len != n) or (kv_len is not None and kv_len != n):
                raise ValueError(f"the mask spec describes {n} tokens, got q_len={q_len}, kv_len={kv_len}")
            q_len = kv_len = n
        elif isinstance(spec, CustomMask):
            if q_len is None or kv_len is None:
                raise ValueError("a CustomMask needs q_len and kv_len")
        else:
            raise TypeError(f"spec must be a mask spec from diffaccel.kernels.masks, got {type(spec).__name__}")
        _check_block_size("q_block_size", q_block_size)
        _check_block_size("kv_block_size", kv_block_size)
        if block_keep is None:
            return _from_spec_cached(spec, q_block_size, kv_block_size, q_len, kv_len, str(torch.device(device)))
        full, partial = classify_blocks(spec, q_len, kv_len, q_block_size, kv_block_size, device)
        keep = block_keep.to(device)
        return cls.from_block_keep(
            full.unsqueeze(0) & keep, partial.unsqueeze(0) & keep, q_len=q_len, kv_len=kv_len,
            q_block_size=q_block_size, kv_block_size=kv_block_size, spec=spec,
        )

    @classmethod
    def dense(
        cls, q_len: int, kv_len: int | None = None, q_block_size: int = 128, kv_block_size: int | None = None,
        *, device: torch.device | str = "cpu",
    ) -> SparseBlockMask:
        """Every key block full for every query block (density 1)."""
        kv_len = q_len if kv_len is None else kv_len
        kv_block_size = q_block_size if kv_block_size is None else kv_block_size
        _check_block_size("q_block_size", q_block_size)
        _check_block_size("kv_block_size", kv_block_size)
        shape = (1, 1, _cdiv(q_len, q_block_size), _cdiv(kv_len, kv_block_size))
        full = torch.ones(shape, dtype=torch.bool, device=device)
        return cls.from_block_keep(full, q_len=q_len, kv_len=kv_len, q_block_size=q_block_size,
                                   kv_block_size=kv_block_size)

    # -- FlexAttention interop ----------------------------------------------------------------------------------------
    @classmethod
    def from_block_mask(cls, block_mask: Any, spec: Spec | None = None) -> SparseBlockMask:
        """From a torch ``BlockMask`` (``torch.nn.attention.flex_attention``).

        Its partial blocks need an element mask the kernel knows: ``spec`` if given; else the spec whose
        ``mask_mod`` built the BlockMask (``create_block_mask(spec.mask_mod, ...)``); else none when the BlockMask's
        mask_mod is FlexAttention's ``noop_mask`` or it has no partial blocks. Any other mask_mod becomes a
        :class:`CustomMask`, which only the PyTorch reference evaluates (the Triton backend refuses it).
        """
        from torch.nn.attention.flex_attention import noop_mask

        q_bs, kv_bs = block_mask.BLOCK_SIZE
        q_len, kv_len = block_mask.seq_lengths
        mask_mod = block_mask.mask_mod
        if spec is None:
            owner = getattr(mask_mod, "__diffaccel_spec__", None)
            if isinstance(owner, MaskSpec):
                spec = owner
            elif mask_mod is noop_mask or int(block_mask.kv_num_blocks.sum()) == 0:
                spec = None
            else:
                spec = CustomMask(mask_mod, num_mask_heads=int(block_mask.kv_num_blocks.shape[1]))
        return cls(
            block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices, int(q_len), int(kv_len), int(q_bs), int(kv_bs), spec,
        )

    def to_block_mask(self) -> Any:
        """A torch ``BlockMask`` with the same kept elements, for ``flex_attention``.

        Full blocks that reach past ``q_len``/``kv_len`` are listed as partial there (as ``create_block_mask`` does),
        so FlexAttention's bounds handling and ours agree.
        """
        from torch.nn.attention.flex_attention import BlockMask, noop_mask

        full, partial = self.block_keep()
        tail = torch.zeros_like(full)
        if self.kv_len % self.kv_block_size:
            tail[..., -1] = True
        if self.q_len % self.q_block_size:
            tail[..., -1, :] = True
        partial = partial | (full & tail)
        full = full & ~tail
        fnum, fidx = _indices_from_keep(full)
        num, idx = _indices_from_keep(partial)
        mask_mod = noop_mask if self.spec is None else self.spec.mask_mod
        return BlockMask.from_kv_blocks(
            num, idx, fnum, fidx, BLOCK_SIZE=(self.q_block_size, self.kv_block_size), mask_mod=mask_mod,
            seq_lengths=(self.q_len, self.kv_len),
        )


@functools.lru_cache(maxsize=32)
def _from_spec_cached(spec: Spec, qbs: int, kvbs: int, q_len: int, kv_len: int, device: str) -> SparseBlockMask:
    full, partial = classify_blocks(spec, q_len, kv_len, qbs, kvbs, device)
    return SparseBlockMask.from_block_keep(
        full.unsqueeze(0), partial.unsqueeze(0), q_len=q_len, kv_len=kv_len, q_block_size=qbs,
        kv_block_size=kvbs, spec=spec,
    )


def _check_block_size(name: str, value: Any) -> None:
    if not _is_int(value) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value!r}")


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return repr(type(t).__name__)
