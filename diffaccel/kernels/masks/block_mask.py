"""Block index structure the kernel iterates: classification, :class:`SparseBlockMask`, FlexAttention interop.

Vocabulary follows FlexAttention (``torch.nn.attention.flex_attention``): per (batch, head, query block) a
:class:`SparseBlockMask` lists the *full* key blocks (every in-bounds element kept, no element mask needed) and the
*partial* key blocks (some kept: the kernel evaluates the spec's element mask on them). Key blocks in neither list
are skipped without being read.
"""

from __future__ import annotations

import functools
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch

from diffaccel.kernels._util import _cdiv, _describe, _is_int
from diffaccel.kernels.masks.base import CustomMask, MaskSpec, Spec


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



@dataclass(frozen=True, eq=False)
class SparseBlockMask:
    """Per (batch, head, query block): the key blocks to visit, split into full and partial ones.

    Same fields as FlexAttention's ``BlockMask`` (``kv_num_blocks`` / ``kv_indices`` are the *partial* blocks,
    ``full_kv_num_blocks`` / ``full_kv_indices`` the full ones); indices are ascending with the kept ones first.
    Leading dimensions are ``(B or 1, H or 1)`` and broadcast over the batch and heads of the attention call.
    ``spec`` is the element mask of partial blocks (``None``: every in-bounds element of a kept block is kept).
    Build one with :meth:`from_spec`, :meth:`from_block_keep`, :meth:`dense` or :meth:`from_block_mask`.

    ``validate=False`` skips the value checks (counts in range, indices in range, no block listed twice), which
    read device values (host synchronizations on CUDA); for masks built by diffaccel code that guarantees them
    (e.g. per denoising step from a block selection). :attr:`num_full` / :attr:`num_partial` are then computed on
    first use (one synchronization), and the kernel assumes partial blocks may exist unless told otherwise.
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
    validate: InitVar[bool] = True
    _counts: tuple = field(init=False, default=(None, None), repr=False, compare=False)
    """(num_full, num_partial) once known (None: not computed yet)."""
    derived: dict = field(init=False, default_factory=dict, repr=False, compare=False)
    """Per-mask values the kernels derive from it once (launch arguments), keyed by their user; not part of it."""

    def __post_init__(self, validate: bool = True) -> None:
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
        object.__setattr__(self, "kv_num_blocks", num)
        object.__setattr__(self, "kv_indices", idx)
        object.__setattr__(self, "full_kv_num_blocks", fnum)
        object.__setattr__(self, "full_kv_indices", fidx)
        if not validate:
            return
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
        object.__setattr__(self, "_counts", (int(fnum.sum()), int(num.sum())))

    # -- counts -----------------------------------------------------------------------------------------------------
    @property
    def num_full(self) -> int:
        """Number of (query block, key block) pairs listed as full, over the leading dimensions."""
        full, partial = self._counts
        if full is None:
            full = int(self.full_kv_num_blocks.sum())  # type: ignore[union-attr]
            object.__setattr__(self, "_counts", (full, partial))
        return full

    @property
    def num_partial(self) -> int:
        """Number of (query block, key block) pairs listed as partial (element mask evaluated)."""
        full, partial = self._counts
        if partial is None:
            partial = int(self.kv_num_blocks.sum())
            object.__setattr__(self, "_counts", (full, partial))
        return partial

    @property
    def may_have_partial(self) -> bool:
        """False only when the mask is known (without reading device values) to list no partial block."""
        return self._counts[1] != 0

    @property
    def known_dense(self) -> bool:
        """True when the counts are known (no device read) and every key block of every query block is full."""
        full, partial = self._counts
        return partial == 0 and full is not None and full == self.kv_num_blocks.numel() * self.num_kv_blocks

    def _with_counts(self, counts: tuple) -> SparseBlockMask:
        object.__setattr__(self, "_counts", counts)
        return self

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
        # Same values, already checked: no second validation.
        return SparseBlockMask(
            self.kv_num_blocks.to(device), self.kv_indices.to(device), self.full_kv_num_blocks.to(device),
            self.full_kv_indices.to(device), self.q_len, self.kv_len, self.q_block_size, self.kv_block_size, self.spec,
            validate=False,
        )._with_counts(self._counts)

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
        validate: bool = True,
    ) -> SparseBlockMask:
        """From boolean block matrices ``(B or 1, H or 1, num_q_blocks, num_kv_blocks)`` (or 2-D/3-D, broadcast).

        ``full`` blocks are visited without an element mask, ``partial`` ones with ``spec``'s element mask.
        The indices built here are valid by construction; ``validate=False`` skips re-checking them (no host
        synchronization: for masks built per call or per step, e.g. from a block selection on the GPU).
        """
        def _as4(t: torch.Tensor, name: str) -> torch.Tensor:
            if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or not (2 <= t.dim() <= 4):
                raise ValueError(f"{name} must be a bool tensor with 2 to 4 dimensions, got {_describe(t)}")
            while t.dim() < 4:
                t = t.unsqueeze(0)
            return t

        full = _as4(full, "full")
        no_partial = partial is None
        partial = torch.zeros_like(full) if partial is None else _as4(partial, "partial")
        lead = torch.broadcast_shapes(full.shape[:2], partial.shape[:2])
        full = full.expand(*lead, *full.shape[2:])
        partial = partial.expand(*lead, *partial.shape[2:])
        fnum, fidx = _indices_from_keep(full)
        num, idx = _indices_from_keep(partial & ~full)
        mask = cls(num, idx, fnum, fidx, q_len, kv_len, q_block_size, kv_block_size, spec, validate=validate)
        if not validate and no_partial:
            mask._with_counts((None, 0))
        return mask

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
        validate: bool = True,
    ) -> SparseBlockMask:
        """Classify every block pair under ``spec`` (cached); optionally keep only blocks where ``block_keep`` is True.

        ``block_keep`` (bool, ``(B or 1, H or 1, num_q_blocks, num_kv_blocks)``) combines a block-level selection
        (e.g. from block attention mass) with the element mask: the result keeps ``block_keep AND spec``. ``q_len``/``kv_len`` are
        only needed for a :class:`CustomMask` (the other specs know their length). ``validate=False``: see
        :meth:`from_block_keep` (the per-step ``block_keep`` path).
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
            q_block_size=q_block_size, kv_block_size=kv_block_size, spec=spec, validate=validate,
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

