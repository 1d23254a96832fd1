"""Local attention patterns as functions of ``(q, k, v, grid)``, named after the math as in NATTEN.

    from diffaccel.functional import neighborhood_attention
    out = neighborhood_attention(q, k, v, grid=(64, 64), kernel_size=(20, 20), stride=(4, 4))

Tensors are ``(batch, heads, tokens, head_dim)`` like :func:`torch.nn.functional.scaled_dot_product_attention`,
tokens flattened row-major over ``grid`` (the order diffusers models flatten latents). Joint attention passes the
text tokens as ``text=``, a prefix (FLUX, CogVideoX) or suffix (SD3, HunyuanVideo) slice of the sequence: text
queries attend to every token and visual queries to every text key plus their local set.

Each function validates its arguments (the checkers of :mod:`diffaccel.sparse.checks`, shared with the methods),
builds the mask spec of :mod:`diffaccel.kernels.masks`, and makes one call into the kernel through a cached plan
(token order + block mask, :mod:`diffaccel.sparse.plans`).
``backend`` picks the kernel implementation (``"auto"``: Triton on CUDA or under ``TRITON_INTERPRET=1``, else the
PyTorch reference with a warning). The ``*_reference`` functions are the plain PyTorch definitions (a dense boolean
mask and SDPA) that tests compare against.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from diffaccel.errors import ConfigError
from diffaccel.kernels.masks import CircleMask, MaskSpec, NeighborhoodMask, ShiftedWindowMask, TextSpec, TileMask
from diffaccel.sparse.checks import (
    check_backend,
    check_block_size,
    check_global_frames,
    check_grid,
    check_radius,
    neighborhood_parameters,
)
from diffaccel.sparse.checks import per_dim as _per_dim
from diffaccel.sparse.run import per_frame_circle_attention, run_spec
from diffaccel.sparse.text import text_spec_for

IntOrTuple = int | Sequence[int]
BoolOrTuple = bool | Sequence[bool]
TextArg = slice | TextSpec | None

DEFAULT_BLOCK_SIZE = 128
"""Kernel block (tokens per query and key block). GNA tiles of 128 tokens are the NATTEN Hopper/Blackwell choice
(``research/locality.md`` §1.5): 2-D (16, 8), 3-D (2, 8, 8) or (4, 4, 8)."""

__all__ = [
    "circular_window_attention",
    "circular_window_attention_reference",
    "neighborhood_attention",
    "neighborhood_attention_reference",
    "shifted_window_attention",
    "shifted_window_attention_reference",
    "tile_attention",
    "tile_attention_reference",
]

# ----------------------------------------------------------------------------------------------- validation


def _check_qkv(q: Any, k: Any, v: Any) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
    if not (q.shape == k.shape and k.shape[:3] == v.shape[:3]):
        raise ValueError(
            f"q, k, v must be self/joint attention inputs with one token sequence, got shapes {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Any, text: TextArg, *, dims=(1, 2, 3)):
    _check_qkv(q, k, v)
    grid = check_grid(grid, dims=dims)
    return grid, text_spec_for(text, q.shape[2], math.prod(grid))


def _dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float | None):
    """Masked SDPA in float32 with a boolean ``keep`` mask broadcastable to ``(B, H, N, N)``."""
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=keep, scale=scale)
    return out.to(q.dtype)


def _spec_mask(spec: MaskSpec, heads: int, device: torch.device) -> torch.Tensor:
    n = spec.num_tokens
    idx = torch.arange(n, device=device)
    h = torch.arange(max(heads, 1), device=device).view(1, -1, 1, 1)
    return spec.mask_mod(torch.zeros((), dtype=torch.long, device=device), h, idx.view(1, 1, -1, 1), idx.view(1, 1, 1, -1))


def _run(q, k, v, spec: MaskSpec, scale, block_size, backend) -> torch.Tensor:
    check_backend(backend)
    check_block_size(block_size)
    return run_spec(q, k, v, spec, block_size=block_size, scale=scale, backend=backend)


# ----------------------------------------------------------------------------------------------- GNA / NATTEN


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: IntOrTuple,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    text: TextArg = None,
    *,
    scale: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    backend: str = "auto",
) -> torch.Tensor:
    """Generalized neighborhood attention (GNA) on a 1-D, 2-D or 3-D token grid, with NATTEN's exact semantics.

    Hassani et al., "Generalized Neighborhood Attention" (arXiv 2504.16922); NATTEN ``na1d/na2d/na3d``. Per
    dimension, each query sees exactly ``kernel_size`` keys: the window is centered on the query's stride-group
    leader and slides inward at the borders; ``dilation`` splits the axis into interleaved groups; ``is_causal``
    keeps keys at or before the query (the group shares the window of its last query). The mask is the AND over
    dimensions. ``stride == kernel_size`` is blocked (window) attention, ``stride == 1`` sliding-window NA.

    When ``stride`` and ``kernel_size`` make the mask fully block-sparse on some tile of ``block_size`` tokens,
    tokens are permuted tile-major once per call (cached index) and the kernel visits only dense blocks; otherwise
    it runs in the sequence order with in-kernel masking of partial blocks. A window covering the grid runs SDPA.

    Args:
        q, k, v: ``(batch, heads, tokens, head_dim)``; tokens = ``prod(grid)`` plus the text tokens.
        grid: visual token grid ``(X,)``, ``(H, W)`` or ``(F, H, W)``.
        kernel_size, stride, dilation, is_causal: one value or one per dimension; checked as NATTEN does
            (``kernel_size > 1``, ``kernel_size * dilation <= size``, ``1 <= stride <= kernel_size``).
        text: text tokens as a prefix or suffix ``slice`` (or a :class:`~diffaccel.kernels.masks.TextSpec`).
        scale: softmax scale (default ``head_dim ** -0.5``).
        block_size: kernel block in tokens (power of two); also the GNA tile volume.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.
    """
    grid, tspec = _prepare(q, k, v, grid, text)
    ks, st, dl, ca = neighborhood_parameters(grid, kernel_size, stride, dilation, is_causal)
    spec = NeighborhoodMask(grid, ks, st, dl, ca, text=tspec)
    return _run(q, k, v, spec, scale, block_size, backend)


def neighborhood_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: IntOrTuple,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    text: TextArg = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`neighborhood_attention` in plain PyTorch: the dense boolean mask and SDPA (float32)."""
    grid, tspec = _prepare(q, k, v, grid, text)
    ks, st, dl, ca = neighborhood_parameters(grid, kernel_size, stride, dilation, is_causal)
    spec = NeighborhoodMask(grid, ks, st, dl, ca, text=tspec)
    return _dense_reference(q, k, v, _spec_mask(spec, 1, q.device), scale)


# ----------------------------------------------------------------------------------------------- Efficient-vDiT


def _tile_spec(q: torch.Tensor, grid: tuple[int, ...], global_frames: Any, tspec: TextSpec | None) -> TileMask:
    if len(grid) != 3:
        raise ConfigError(
            f"tile attention needs a video grid (frames, height, width), got grid {grid}: attention tiles are "
            "frame blocks (Efficient-vDiT), so image models are not supported"
        )
    frames = check_global_frames(global_frames, grid[0], q.shape[1])
    return TileMask(grid, frames, text=tspec)


def tile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    global_frames: Sequence[int] | Sequence[Sequence[int]],
    text: TextArg = None,
    *,
    scale: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    backend: str = "auto",
) -> torch.Tensor:
    """Efficient-vDiT "attention tile" sparsity on a ``(frames, height, width)`` grid.

    Ding et al., "Efficient Video Diffusion Transformers with Attention Tile" (arXiv 2502.06155): a query in frame
    ``f`` attends to the keys of frame ``f`` and of every global frame; queries of global frames attend to every
    frame. The cost is linear in the number of frames (``g : (T - g)`` masks of the paper).

    Args:
        grid: ``(frames, height, width)``; 2-D grids are refused (the pattern is defined over frames).
        global_frames: frame indices, or one list per head (heads may use different global frames).
        text, scale, block_size, backend: as in :func:`neighborhood_attention`.
    """
    grid, tspec = _prepare(q, k, v, grid, text)
    spec = _tile_spec(q, grid, global_frames, tspec)
    return _run(q, k, v, spec, scale, block_size, backend)


def tile_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    global_frames: Sequence[int] | Sequence[Sequence[int]],
    text: TextArg = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`tile_attention` in plain PyTorch (dense mask + SDPA)."""
    grid, tspec = _prepare(q, k, v, grid, text)
    spec = _tile_spec(q, grid, global_frames, tspec)
    return _dense_reference(q, k, v, _spec_mask(spec, spec.num_mask_heads, q.device), scale)


# ----------------------------------------------------------------------------------------------- CLEAR


_check_radius = check_radius


def circular_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    radius: float,
    text: TextArg = None,
    *,
    per_frame: bool = False,
    scale: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    backend: str = "auto",
) -> torch.Tensor:
    """CLEAR's circular local window: visual keys at Euclidean grid distance ``< radius`` from the query.

    Liu et al., "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up" (arXiv 2412.16112).
    Unlike neighborhood attention the circle is not moved inward at the borders (border queries see fewer keys).
    The distance is measured over every grid dimension; on a ``(frames, height, width)`` grid ``per_frame=True``
    applies the 2-D circle inside each frame instead (frames folded into the batch, text merged by log-sum-exp).

    Args:
        radius: in latent tokens (CLEAR's released models: 8, 16, 32 at 1024 px FLUX).
        per_frame: 3-D grids only: the circle in (height, width) within the query's frame.
        text, scale, block_size, backend: as in :func:`neighborhood_attention`.
    """
    grid, tspec = _prepare(q, k, v, grid, text)
    radius = _check_radius(radius)
    check_backend(backend)
    check_block_size(block_size)
    if per_frame:
        if len(grid) != 3:
            raise ConfigError(f"per_frame=True needs a (frames, height, width) grid, got {grid}")
        return per_frame_circle_attention(
            q, k, v, grid, radius, tspec, block_size=block_size, scale=scale, backend=backend
        )
    return _run(q, k, v, CircleMask(grid, radius, text=tspec), scale, block_size, backend)


def circular_window_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    radius: float,
    text: TextArg = None,
    *,
    per_frame: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`circular_window_attention` in plain PyTorch (dense mask + SDPA)."""
    grid, tspec = _prepare(q, k, v, grid, text)
    radius = _check_radius(radius)
    if per_frame and len(grid) != 3:
        raise ConfigError(f"per_frame=True needs a (frames, height, width) grid, got {grid}")
    coords = torch.stack(
        torch.meshgrid(*[torch.arange(n, device=q.device) for n in grid], indexing="ij"), -1
    ).reshape(-1, len(grid))
    use = coords[:, 1:] if per_frame else coords
    d2 = ((use[:, None, :] - use[None, :, :]) ** 2).sum(-1)
    vis = d2.double() < radius * radius
    if per_frame:
        vis &= coords[:, None, 0] == coords[None, :, 0]
    return _dense_reference(q, k, v, _with_text_rows(vis, tspec), scale)


def _with_text_rows(visual_keep: torch.Tensor, text: TextSpec | None) -> torch.Tensor:
    """Embed a visual ``(nv, nv)`` mask in the full sequence with dense text rows and columns."""
    if text is None:
        return visual_keep
    nv, nt = visual_keep.shape[0], text.length
    keep = torch.ones(nv + nt, nv + nt, dtype=torch.bool, device=visual_keep.device)
    vis = slice(nt, nt + nv) if text.position == "prefix" else slice(0, nv)
    keep[vis, vis] = visual_keep
    return keep


# ----------------------------------------------------------------------------------------------- MSW-MSA


def window_parameters(
    grid: tuple[int, ...], window: IntOrTuple | None, shift: IntOrTuple
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Window (default ``ceil(size / 2)`` per dimension: HiDiffusion's 2x2 windows) and shift, checked."""
    nd = len(grid)
    win = tuple(-(-n // 2) for n in grid) if window is None else _per_dim("window", window, nd)
    sh = _per_dim("shift", shift, nd)
    for i, (n, w, s) in enumerate(zip(grid, win, sh)):
        if not 1 <= w <= n:
            raise ConfigError(f"window must be in [1, grid size] in every dimension, got {win} for grid {grid}")
        if s < 0:
            raise ConfigError(f"shift must be >= 0 in every dimension, got {sh} (dimension {i})")
    return win, tuple(s % n for s, n in zip(sh, grid))


def shifted_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    window: IntOrTuple | None = None,
    shift: IntOrTuple = 0,
    text: TextArg = None,
    *,
    scale: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    backend: str = "auto",
) -> torch.Tensor:
    """HiDiffusion's MSW-MSA: window attention on the grid cyclically rolled by ``-shift``, no wrap-around mask.

    Zhang et al., "HiDiffusion" (ECCV 2024): ``torch.roll(x, -shift)``, partition into windows, attention inside
    each window, roll back. Tokens wrapped across the border share windows (no Swin mask). Default window
    ``ceil(size / 2)`` per dimension (2x2 windows on an image). When the windows tile the grid exactly, tokens are
    reordered window by window (cached index) so the kernel sees 1-D blocked attention.

    Args:
        window: one value or one per dimension; default ``ceil(size / 2)``. A window that does not divide the grid
            leaves a smaller last window (HiDiffusion resizes the map instead; we keep tokens exact).
        shift: one value or one per dimension (taken modulo the grid size).
        text, scale, block_size, backend: as in :func:`neighborhood_attention`.
    """
    grid, tspec = _prepare(q, k, v, grid, text)
    win, sh = window_parameters(grid, window, shift)
    return _run(q, k, v, ShiftedWindowMask(grid, win, sh, text=tspec), scale, block_size, backend)


def shifted_window_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    window: IntOrTuple | None = None,
    shift: IntOrTuple = 0,
    text: TextArg = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`shifted_window_attention` in plain PyTorch: roll, partition, per-window SDPA, roll back.

    Written as HiDiffusion computes it (not from the mask spec) when there is no text and the windows tile the
    grid; otherwise the dense mask of the definition.
    """
    grid, tspec = _prepare(q, k, v, grid, text)
    win, sh = window_parameters(grid, window, shift)
    if tspec is None and all(n % w == 0 for n, w in zip(grid, win)):
        B, H, _, D = q.shape
        m = len(grid)
        outs = []
        for t in (q, k, v):
            x = t.float().reshape(B, H, *grid, D)
            x = torch.roll(x, shifts=tuple(-s for s in sh), dims=tuple(range(2, 2 + m)))
            split = [B, H]
            for n, w in zip(grid, win):
                split += [n // w, w]
            x = x.reshape(*split, D)
            perm = [0, 1] + [2 + 2 * a for a in range(m)] + [3 + 2 * a for a in range(m)] + [2 + 2 * m]
            outs.append(x.permute(*perm).reshape(B, H, -1, math.prod(win), D))
        o = F.scaled_dot_product_attention(*outs, scale=scale)
        nwin = [n // w for n, w in zip(grid, win)]
        o = o.reshape(B, H, *nwin, *win, D)
        inv = [0, 1]
        for a in range(m):
            inv += [2 + a, 2 + m + a]
        o = o.permute(*inv, 2 + 2 * m).reshape(B, H, *grid, D)
        o = torch.roll(o, shifts=sh, dims=tuple(range(2, 2 + m)))
        return o.reshape(B, H, -1, D).to(q.dtype)
    spec = ShiftedWindowMask(grid, win, sh, text=tspec)
    return _dense_reference(q, k, v, _spec_mask(spec, 1, q.device), scale)
