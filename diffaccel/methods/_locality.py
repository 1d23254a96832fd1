"""Shared machinery of the locality methods (GNA, attention tiles, CLEAR, MSW-MSA).

Two jobs, both model-agnostic:

* **Attention plans** (:func:`plan_for`): for a mask spec of :mod:`diffaccel.kernels.masks`, the token order the
  kernel runs in and the block mask in that order, computed once per (spec, block size, device) and cached. A spec
  holds the grid, the method's parameters and the text length, so the cache key is (grid, config, lengths,
  device). Three layouts:

  - *tile-major* (GNA / NATTEN token permutation, ``research/locality.md`` §1.4): visual tokens reordered so each
    kernel block is one multi-dimensional tile of the grid (dilation groups outermost, as NATTEN's
    ``token_permute`` orders them), text moved after the visual tokens. Chosen when it makes the neighborhood
    mask *fully* block-sparse (every visited block dense, no element mask), the GNA paper's target;
  - *window-major* (MSW-MSA): the cyclically rolled grid partitioned window by window, so the mask becomes 1-D
    blocked attention that the kernel evaluates on the new order;
  - *row-major*: the model's own order, partial blocks masked in the kernel from token coordinates.

  A plan is applied with one ``index_select`` per tensor before the kernel and one on the output after it; no
  Python loop over heads or tokens.

* **Per-layer configuration** (:class:`LocalityConfig`, :class:`LocalityMethod`): include/exclude patterns on
  qualified layer names, per-layer overrides, dense warm-up steps, the kernel backend and block size.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.kernels import block_sparse_attention
from diffaccel.kernels.masks import (
    CircleMask,
    MaskSpec,
    NeighborhoodMask,
    ShiftedWindowMask,
    SparseBlockMask,
    TextSpec,
)
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import (
    BACKENDS,
    MethodBase,
    MethodConfig,
    check_choice,
    check_positive_int,
    config_help,
    in_dense_steps,
    sdpa,
)
from diffaccel.warn import warn_once

# ----------------------------------------------------------------------------------------------- text placement


def text_spec_for(text: Any, num_tokens: int, num_visual: int, *, name: str = "text") -> TextSpec | None:
    """The :class:`TextSpec` of ``text`` (a prefix/suffix slice, a TextSpec or None) in a ``num_tokens`` sequence.

    The sequence holds ``num_visual`` visual tokens; the rest must be exactly the text tokens.
    """
    num_text = num_tokens - num_visual
    if num_text < 0:
        raise ConfigError(f"the grid holds {num_visual} tokens but the sequence has only {num_tokens}")
    if text is None:
        if num_text:
            raise ConfigError(
                f"the sequence has {num_tokens} tokens but the grid holds {num_visual}: pass {name}= a slice "
                f"(prefix slice(0, {num_text}) or suffix slice({num_visual}, {num_tokens})) for the other {num_text}"
            )
        return None
    if isinstance(text, TextSpec):
        spec = text
    elif isinstance(text, slice):
        if text.step not in (None, 1):
            raise ConfigError(f"{name} must be a contiguous slice, got {text!r}")
        start, stop, _ = text.indices(num_tokens)
        stop = max(stop, start)
        if start == 0 and stop == num_text:
            spec = TextSpec(stop - start, "prefix")
        elif stop == num_tokens and start == num_visual:
            spec = TextSpec(stop - start, "suffix")
        else:
            raise ConfigError(
                f"{name}={text!r} must be the prefix slice(0, {num_text}) or the suffix slice({num_visual}, "
                f"{num_tokens}) of the {num_tokens} tokens (the grid holds {num_visual})"
            )
    else:
        raise ConfigError(f"{name} must be a slice, a TextSpec or None, got {type(text).__name__}")
    if spec.length != num_text:
        raise ConfigError(
            f"{name} has {spec.length} tokens but the sequence has {num_tokens} tokens and the grid {num_visual}"
        )
    return spec if spec.length else None


def layout_text_spec(layout: TokenLayout) -> TextSpec | None:
    """The text tokens of an attention call's layout as a :class:`TextSpec` (None without text)."""
    if layout.num_text == 0:
        return None
    return TextSpec(layout.num_text, "prefix" if layout.text_first else "suffix")


# ----------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """How to run one mask spec: the kernel's token order and the block mask in that order.

    Attributes:
        layout: ``"dense"`` (the spec keeps every pair: plain SDPA, as NATTEN does for a window covering the grid),
            ``"row-major"``, ``"tile-major <tile>"`` or ``"window-major"``.
        block_mask: the block mask in kernel order (``None`` when dense).
        order: kernel position -> sequence position (``None``: the sequence order itself).
        inverse: sequence position -> kernel position.
        tile: the tile shape of a tile-major plan.
    """

    layout: str
    block_mask: SparseBlockMask | None = None
    order: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    tile: tuple[int, ...] | None = None

    @property
    def dense(self) -> bool:
        return self.block_mask is None

    @property
    def kept_block_fraction(self) -> float:
        """Fraction of (query block, key block) pairs the kernel visits (1 when dense)."""
        return 1.0 if self.block_mask is None else self.block_mask.density


def plan_for(spec: MaskSpec, block_size: int, device: torch.device | str) -> AttentionPlan:
    """The cached :class:`AttentionPlan` of ``spec`` with square kernel blocks of ``block_size`` tokens."""
    check_block_size(block_size)
    return _plan_cached(spec, int(block_size), str(torch.device(device)))


def check_block_size(block_size: Any) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 16 or block_size & (block_size - 1):
        raise ConfigError(f"block_size must be a power of two >= 16 (kernel block, tokens), got {block_size!r}")


@functools.lru_cache(maxsize=128)
def _plan_cached(spec: MaskSpec, block_size: int, device: str) -> AttentionPlan:
    if isinstance(spec, NeighborhoodMask):
        if _neighborhood_is_dense(spec):
            return AttentionPlan("dense")
        tiled = _tile_major_neighborhood(spec, block_size, device)
        if tiled is not None:
            return tiled
    elif isinstance(spec, ShiftedWindowMask):
        if tuple(spec.window) == tuple(spec.grid):
            return AttentionPlan("dense")  # one window: the roll permutes tokens inside it only
        if all(n % w == 0 for n, w in zip(spec.grid, spec.window)):
            return _window_major(spec, block_size, device)
    elif isinstance(spec, CircleMask):
        if spec.max_sq_dist >= sum((n - 1) ** 2 for n in spec.grid):
            return AttentionPlan("dense")
    block_mask = SparseBlockMask.from_spec(spec, block_size, device=device)
    if block_mask.num_partial == 0 and block_mask.num_full == block_mask.kv_num_blocks.numel() * block_mask.num_kv_blocks:
        return AttentionPlan("dense")
    return AttentionPlan("row-major", block_mask)


def _neighborhood_is_dense(spec: NeighborhoodMask) -> bool:
    return all(
        k == n and d == 1 and not c for n, k, d, c in zip(spec.grid, spec.kernel_size, spec.dilation, spec.is_causal)
    )


def _with_text(order_visual: torch.Tensor, text: TextSpec | None, num_visual: int) -> torch.Tensor:
    """Kernel order over the whole sequence: the visual order (sequence positions), then the text tokens."""
    if text is None or text.length == 0:
        return order_visual
    if text.position == "prefix":
        return torch.cat([order_visual + text.length, torch.arange(text.length)])
    return torch.cat([order_visual, torch.arange(num_visual, num_visual + text.length)])


def _finish_permuted(
    layout: str, order: torch.Tensor, block_mask: SparseBlockMask, device: str, tile: tuple[int, ...] | None = None
) -> AttentionPlan:
    if torch.equal(order, torch.arange(order.numel())):
        return AttentionPlan(layout, block_mask, tile=tile)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return AttentionPlan(layout, block_mask, order.to(device), inverse.to(device), tile=tile)


def _text_blocks(visual_full: torch.Tensor, num_text: int, block_size: int) -> torch.Tensor:
    """Block-level keep with text tokens (after the visual blocks) dense in both directions."""
    nbv = visual_full.shape[-1]
    nbt = -(-num_text // block_size)
    full = torch.ones(nbv + nbt, nbv + nbt, dtype=torch.bool)
    full[:nbv, :nbv] = visual_full
    return full


# -- GNA: tile-major token permutation ---------------------------------------------------------------------------


def tile_shapes(grid: tuple[int, ...], dilation: tuple[int, ...], volume: int) -> list[tuple[int, ...]]:
    """Tile shapes of ``volume`` tokens (powers of two per dimension) that tile every dilation group exactly.

    Tiles are taken inside dilation groups (NATTEN's layout, ``research/locality.md`` §1.4), so a dimension of size
    ``n`` with dilation ``d`` accepts a tile extent ``t`` when ``t * d`` divides ``n``.
    """
    exps = int(math.log2(volume))
    if 2**exps != volume:
        return []
    options = []
    for n, d in zip(grid, dilation):
        options.append([e for e in range(exps + 1) if n % (2**e * d) == 0])
    shapes = []
    for combo in itertools.product(*options):
        if sum(combo) == exps:
            shapes.append(tuple(2**e for e in combo))
    return shapes


def axis_neighborhood_mask(n: int, k: int, s: int, d: int, causal: bool) -> torch.Tensor:
    """NATTEN's mask on one axis, ``(n, n)`` bool, from the spec's own ``mask_mod`` (the single definition)."""
    spec = NeighborhoodMask((n,), k, s, d, causal)
    idx = torch.arange(n)
    zero = torch.zeros((), dtype=torch.long)
    return spec.mask_mod(zero, zero, idx.view(-1, 1), idx.view(1, -1))


def tiled_axis_order(n: int, tile: int, dilation: int) -> torch.Tensor:
    """Axis positions in (dilation group, tile index, position in tile) order: ``x = (r * tile + t) * d + g``."""
    return torch.arange(n).view(n // (tile * dilation), tile, dilation).permute(2, 0, 1).reshape(-1)


def tiled_token_order(grid: tuple[int, ...], tile: tuple[int, ...], dilation: tuple[int, ...]) -> torch.Tensor:
    """Row-major visual indices in tile-major order: dilation groups, then tiles, then tokens inside a tile."""
    m = len(grid)
    split = []
    for n, t, d in zip(grid, tile, dilation):
        split += [n // (t * d), t, d]
    idx = torch.arange(math.prod(grid)).view(*split)
    perm = [3 * a + 2 for a in range(m)] + [3 * a for a in range(m)] + [3 * a + 1 for a in range(m)]
    return idx.permute(*perm).reshape(-1)


def tiled_axis_counts(axis_mask: torch.Tensor, tile: int, dilation: int) -> torch.Tensor:
    """Kept elements per (query axis-tile, key axis-tile) pair, axis tiles in (group, tile index) order."""
    n = axis_mask.shape[0]
    order = tiled_axis_order(n, tile, dilation)
    m = axis_mask[order][:, order]
    na = n // tile
    return m.view(na, tile, na, tile).sum(dim=(1, 3))


def tiled_block_counts(
    axis_masks: list[torch.Tensor], grid: tuple[int, ...], tile: tuple[int, ...], dilation: tuple[int, ...]
) -> torch.Tensor:
    """Kept elements per (query tile, key tile) pair of the tile-major layout, ``(num_tiles, num_tiles)`` int64.

    The mask is the AND of per-axis masks and a tile is a product of per-axis intervals, so counts multiply across
    axes (the tile-counting idea behind the GNA paper's simulator, ``research/locality.md`` §1.10).
    """
    m = len(grid)
    groups = [n // (t * d) for n, t, d in zip(grid, tile, dilation)]
    lead = list(dilation) + groups  # tile ids are row-major over (groups..., tile indices...)
    counts = None
    for a in range(m):
        per_axis = tiled_axis_counts(axis_masks[a], tile[a], dilation[a])
        shape_g = [1] * (2 * m)
        shape_g[a] = dilation[a]
        shape_r = [1] * (2 * m)
        shape_r[m + a] = groups[a]
        axis_tile = (torch.arange(dilation[a]).view(shape_g) * groups[a] + torch.arange(groups[a]).view(shape_r))
        axis_tile = axis_tile.expand(lead).reshape(-1)
        c = per_axis[axis_tile][:, axis_tile]
        counts = c if counts is None else counts * c
    assert counts is not None
    return counts


def _tile_major_neighborhood(spec: NeighborhoodMask, block_size: int, device: str) -> AttentionPlan | None:
    """The fully block-sparse tile-major plan with the fewest visited blocks, if some tile shape gives one."""
    grid, dil = spec.grid, spec.dilation
    shapes = tile_shapes(grid, dil, block_size)
    if not shapes:
        return None
    axis_masks = [
        axis_neighborhood_mask(n, k, s, d, c)
        for n, k, s, d, c in zip(grid, spec.kernel_size, spec.stride, dil, spec.is_causal)
    ]
    best = None
    for tile in shapes:
        counts = tiled_block_counts(axis_masks, grid, tile, dil)
        full = counts == block_size * block_size
        if bool(((counts > 0) & ~full).any()):
            continue  # partially kept tiles would need an element mask in tile-major coordinates
        visited = int(full.sum())
        if best is None or visited < best[0]:
            best = (visited, tile, full)
    if best is None:
        return None
    _, tile, full = best
    nv, nt = spec.num_visual, spec.num_text
    order = _with_text(tiled_token_order(grid, tile, dil), spec.text, nv)
    keep = _text_blocks(full, nt, block_size).to(device)
    n = nv + nt
    block_mask = SparseBlockMask.from_block_keep(keep, q_len=n, kv_len=n, q_block_size=block_size,
                                                 kv_block_size=block_size)
    return _finish_permuted("tile-major " + "x".join(map(str, tile)), order, block_mask, device, tile)


# -- MSW-MSA: window-major order ---------------------------------------------------------------------------------


def window_token_order(grid: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...]) -> torch.Tensor:
    """Row-major visual indices rolled by ``-shift`` and grouped window by window (HiDiffusion's partition)."""
    idx = torch.arange(math.prod(grid)).view(grid)
    idx = torch.roll(idx, shifts=tuple(-s for s in shift), dims=tuple(range(len(grid))))
    split = []
    for n, w in zip(grid, window):
        split += [n // w, w]
    m = len(grid)
    perm = [2 * a for a in range(m)] + [2 * a + 1 for a in range(m)]
    return idx.view(*split).permute(*perm).reshape(-1)


def _window_major(spec: ShiftedWindowMask, block_size: int, device: str) -> AttentionPlan:
    nv = spec.num_visual
    order = _with_text(window_token_order(spec.grid, spec.window, spec.shift), spec.text, nv)
    text = None if spec.text is None or spec.num_text == 0 else TextSpec(spec.num_text, "suffix")
    blocked = ShiftedWindowMask((nv,), math.prod(spec.window), 0, text=text)
    block_mask = SparseBlockMask.from_spec(blocked, block_size, device=device)
    return _finish_permuted("window-major", order, block_mask, device)


# ----------------------------------------------------------------------------------------------- running


def run_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: AttentionPlan,
    *,
    scale: float | None,
    backend: str,
) -> torch.Tensor:
    """Attention of ``q`` over ``k``/``v`` under ``plan`` (tensors ``(batch, heads, tokens, head_dim)``)."""
    if plan.block_mask is None:
        return sdpa(q, k, v, scale=scale)
    if plan.order is not None:
        q, k, v = (t.index_select(2, plan.order) for t in (q, k, v))
    out = block_sparse_attention(q, k, v, plan.block_mask, scale=scale, backend=backend)
    assert isinstance(out, torch.Tensor)
    if plan.order is not None:
        out = out.index_select(2, plan.inverse)
    return out


def run_spec(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec, *, block_size: int, scale: float | None,
    backend: str,
) -> torch.Tensor:
    """Plan ``spec`` (cached) and run it."""
    return run_plan(q, k, v, plan_for(spec, block_size, q.device), scale=scale, backend=backend)


def merge_by_lse(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """Attention over a union of key sets from attentions over each set and their log-sum-exps (exact).

    ``out = sum_i exp(lse_i - m) * out_i / sum_i exp(lse_i - m)`` with ``m = max_i lse_i`` (as NATTEN's
    ``merge_attentions``, ``research/locality.md`` §1.6).
    """
    lses = torch.stack([lse for _, lse in parts])
    m = lses.amax(dim=0)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    weights = torch.exp(lses - m)
    total = weights.sum(dim=0)
    out = sum(w.unsqueeze(-1) * o.float() for w, (o, _) in zip(weights, parts))
    return (out / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)).to(dtype)


def dense_block_mask(q_len: int, kv_len: int, block_size: int, device: torch.device | str) -> SparseBlockMask:
    """A cached all-full block mask (for the dense passes that return a log-sum-exp)."""
    return _dense_cached(q_len, kv_len, block_size, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _dense_cached(q_len: int, kv_len: int, block_size: int, device: str) -> SparseBlockMask:
    return SparseBlockMask.dense(q_len, kv_len, block_size, device=device)


def per_frame_circle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    radius: float,
    text: TextSpec | None,
    *,
    block_size: int,
    scale: float | None,
    backend: str,
) -> torch.Tensor:
    """CLEAR's 2-D circle applied inside each frame of a ``(frames, height, width)`` grid, text dense.

    Visual queries: the circle inside their own frame (frames folded into the batch) merged by log-sum-exp with a
    dense pass over the text keys; text queries: dense over every key.
    """
    B, H, N, D = q.shape
    F, Hh, W = grid
    nv, nt = F * Hh * W, (0 if text is None else text.length)
    vis = slice(nt, N) if (text is not None and text.position == "prefix") else slice(0, nv)
    txt = slice(0, nt) if (text is not None and text.position == "prefix") else slice(nv, N)

    def fold(t: torch.Tensor) -> torch.Tensor:
        return t[:, :, vis].unflatten(2, (F, Hh * W)).transpose(1, 2).reshape(B * F, H, Hh * W, D)

    circle = CircleMask((Hh, W), radius)
    plan = plan_for(circle, block_size, q.device)
    qf, kf, vf = fold(q), fold(k), fold(v)
    local_mask = dense_block_mask(Hh * W, Hh * W, block_size, q.device) if plan.block_mask is None else plan.block_mask
    out_local, lse_local = block_sparse_attention(qf, kf, vf, local_mask, scale=scale, return_lse=True, backend=backend)
    out_local = out_local.reshape(B, F, H, Hh * W, D).transpose(1, 2).reshape(B, H, nv, D)
    lse_local = lse_local.reshape(B, F, H, Hh * W).transpose(1, 2).reshape(B, H, nv)
    if nt == 0:
        return out_local
    q_vis = q[:, :, vis]
    text_mask = dense_block_mask(nv, nt, block_size, q.device)
    out_text, lse_text = block_sparse_attention(
        q_vis, k[:, :, txt], v[:, :, txt], text_mask, scale=scale, return_lse=True, backend=backend
    )
    out = torch.empty_like(q)
    out[:, :, vis] = merge_by_lse([(out_local, lse_local), (out_text, lse_text)], q.dtype)
    out[:, :, txt] = sdpa(q[:, :, txt], k, v, scale=scale)
    return out


# ----------------------------------------------------------------------------------------------- configs

LAYER_FIELDS = ("layers", "exclude_layers", "layer_overrides")


def _as_patterns(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise ConfigError(f"{name} must be a list of qualified layer names or glob patterns, got {value!r}")
    return tuple(value)


def layer_matches(layer: str | None, pattern: str) -> bool:
    """Exact match on the qualified name, or a glob (``*``, ``?``, ``[...]``) over the whole name.

    Unlike diffusers' PAG regex search, ``transformer_blocks.1`` matches only that block, never blocks 10-19.
    """
    if layer is None:
        return False
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(layer, pattern)
    return layer == pattern


@dataclass
class LocalityConfig(MethodConfig):
    """Fields every locality method shares: where it applies, warm-up, kernel choices."""

    dense_steps: int = field(default=0, metadata=config_help("first denoising steps run dense (exact)"))
    layers: tuple[str, ...] | None = field(default=None, metadata=config_help(
        "qualified attention-module names (or glob patterns over the whole name) to change; None: every "
        "self/joint attention"))
    exclude_layers: tuple[str, ...] = field(default=(), metadata=config_help(
        "qualified names or glob patterns kept dense"))
    layer_overrides: dict[str, dict[str, Any]] = field(default_factory=dict, metadata=config_help(
        "{name or glob: {field: value}}: per-layer parameters (later patterns win)"))
    block_size: int = field(default=128, metadata=config_help("kernel block (tokens per query/key block, power of 2)"))
    backend: str = field(default="auto", metadata=config_help("'auto', 'triton' or 'reference' (PyTorch)"))

    def validate(self) -> None:
        check_positive_int("dense_steps", self.dense_steps, minimum=0)
        self.layers = _as_patterns("layers", self.layers)
        self.exclude_layers = _as_patterns("exclude_layers", self.exclude_layers) or ()
        check_block_size(self.block_size)
        check_choice("backend", self.backend, BACKENDS)
        if not isinstance(self.layer_overrides, dict):
            raise ConfigError(f"layer_overrides must be a dict {{layer pattern: {{field: value}}}}, got {self.layer_overrides!r}")
        allowed = {f.name for f in dataclasses.fields(self)} - set(LAYER_FIELDS)
        for pattern, values in self.layer_overrides.items():
            if not isinstance(pattern, str) or not pattern or not isinstance(values, dict):
                raise ConfigError(
                    f"layer_overrides maps a layer name or glob to a dict of parameters, got {pattern!r}: {values!r}"
                )
            unknown = sorted(set(values) - allowed)
            if unknown:
                raise ConfigError(
                    f"layer_overrides[{pattern!r}] has unknown parameter(s) {', '.join(unknown)}; allowed: "
                    f"{', '.join(sorted(allowed))}"
                )
            override = dataclasses.replace(self, **values, layer_overrides={}, layers=None, exclude_layers=())
            try:
                override.validate()
            except ConfigError as exc:
                raise ConfigError(f"layer_overrides[{pattern!r}]: {exc}") from None

    def applies_to(self, layer: str | None) -> bool:
        """Whether the method changes attention module ``layer`` (else it runs dense)."""
        if self.layers is not None and not any(layer_matches(layer, p) for p in self.layers):
            return False
        return not any(layer_matches(layer, p) for p in self.exclude_layers)

    def for_layer(self, layer: str | None) -> LocalityConfig:
        """The configuration of ``layer``: this one with every matching override applied in order."""
        values: dict[str, Any] = {}
        for pattern, override in self.layer_overrides.items():
            if layer_matches(layer, pattern):
                values.update(override)
        if not values:
            return self
        resolved = dataclasses.replace(self, **values, layer_overrides={})
        resolved.validate()
        return resolved


def as_int_tuple(name: str, value: Any, *, allow_none: bool = True) -> tuple[int, ...] | int | None:
    """Normalize an int or a list of ints (JSON from the CLI) to an int or a tuple; None passes through."""
    if value is None:
        if allow_none:
            return None
        raise ConfigError(f"{name} must be an integer or a list of integers, got None")
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise ConfigError(f"{name} must be an integer or a list of integers (one per grid dimension), got {value!r}")
        return tuple(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{name} must be an integer or a list of integers (one per grid dimension), got {value!r}")


PaddingGroups = list[tuple[int, torch.Tensor]]
"""``(valid text length, batch rows)`` pairs of a text key-padding mask."""


class LocalityMethod(MethodBase):
    """Base of the locality methods: layer selection, dense steps, masks, then :meth:`local_attention`."""

    config_class: ClassVar[type[MethodConfig]] = LocalityConfig
    config: LocalityConfig

    def __init__(self, config: LocalityConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._layer_configs: dict[str | None, LocalityConfig | None] = {}
        self._last_padding: tuple[torch.Tensor, int, PaddingGroups | None] | None = None

    def config_for(self, layer: str | None) -> LocalityConfig | None:
        """The resolved configuration of ``layer``, or None where the method keeps the layer dense."""
        if layer not in self._layer_configs:
            cfg = self.config
            self._layer_configs[layer] = cfg.for_layer(layer) if cfg.applies_to(layer) else None
        return self._layer_configs[layer]

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        ctx: RunContext,
        *,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        cfg = self.config_for(ctx.layer)
        if cfg is None or in_dense_steps(ctx, cfg.dense_steps) or k.shape[2] != q.shape[2]:
            return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
        if attn_mask is not None:
            padded = self._padding_groups(attn_mask, layout)
            if padded is None:
                warn_once(
                    f"{self.name}-mask",
                    f"{self.name}: an attention call with a mask other than a text key-padding mask runs dense",
                )
                return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
            return self._with_key_padding(q, k, v, layout, ctx, cfg, padded, scale)
        return self.local_attention(q, k, v, layout, ctx, cfg, scale=scale)

    def _padding_groups(self, attn_mask: torch.Tensor, layout: TokenLayout) -> PaddingGroups | None:
        """Batch rows grouped by valid text length, or None when the mask is not a text key-padding mask.

        Memoized on the mask object: the denoiser passes one mask to every layer of a forward, so the device
        synchronisations of the check happen once per forward.
        """
        last = self._last_padding
        if last is not None and last[0] is attn_mask and last[1] == layout.num_visual:
            return last[2]
        lengths = key_padding_lengths(attn_mask, layout)
        groups = None
        if lengths is not None:
            groups = [(int(n), (lengths == n).nonzero().flatten()) for n in sorted(set(lengths.tolist()))]
        self._last_padding = (attn_mask, layout.num_visual, groups)
        return groups

    def local_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        ctx: RunContext,
        cfg: LocalityConfig,
        *,
        scale: float | None,
    ) -> torch.Tensor:
        """The method's attention on a self/joint call with a visual grid (no mask)."""
        raise NotImplementedError

    def _with_key_padding(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        ctx: RunContext,
        cfg: LocalityConfig,
        groups: PaddingGroups,
        scale: float | None,
    ) -> torch.Tensor:
        """Joint attention whose mask only hides padding text keys at the end of a text suffix (HunyuanVideo).

        Per batch group with the same number ``L`` of valid text tokens: the sequence cut to ``visual + L`` tokens
        is a plain joint call (queries and keys); the padding text queries, whose rows the stock processor
        computes over the valid keys, attend densely over them (as text queries do).
        """
        out = torch.empty_like(q)
        nv = layout.num_visual
        for length, rows in groups:
            n = nv + int(length)
            qb, kb, vb = (q, k, v) if len(groups) == 1 else (t.index_select(0, rows) for t in (q, k, v))
            sub = TokenLayout(num_tokens=n, grid=layout.grid, text=slice(nv, n) if length else None)
            part = self.local_attention(qb[:, :, :n], kb[:, :, :n], vb[:, :, :n], sub, ctx, cfg, scale=scale)
            if n < q.shape[2]:
                tail = sdpa(qb[:, :, n:], kb[:, :, :n], vb[:, :, :n], scale=scale)
                part = torch.cat([part, tail], dim=2)
            if len(groups) == 1:
                return part
            out.index_copy_(0, rows, part)
        return out


def key_padding_lengths(attn_mask: torch.Tensor, layout: TokenLayout) -> torch.Tensor | None:
    """Valid text tokens per batch row when ``attn_mask`` only hides trailing text keys of a text suffix.

    HunyuanVideo passes its prompt padding as a ``(batch, 1, 1, tokens)`` boolean key mask with text after the
    video. Returns ``(batch,)`` lengths, or None for any other mask (which the caller runs dense).
    """
    if layout.text is None or layout.text_first or layout.num_text == 0:
        return None
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1:
        return None
    n = layout.num_tokens
    if attn_mask.shape[-1] != n:
        return None
    if attn_mask.dtype == torch.bool:
        keep = attn_mask[:, 0, 0]
    elif attn_mask.is_floating_point():
        keep = attn_mask[:, 0, 0] == 0
        if not bool(((attn_mask == 0) | torch.isneginf(attn_mask)).all()):
            return None
    else:
        return None
    nv = layout.num_visual
    if not bool(keep[:, :nv].all()):
        return None
    text_keep = keep[:, nv:]
    lengths = text_keep.sum(dim=1)
    prefix = torch.arange(layout.num_text, device=keep.device).unsqueeze(0) < lengths.unsqueeze(1)
    if not torch.equal(prefix, text_keep):
        return None
    return lengths
