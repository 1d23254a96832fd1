"""VMoBA: mixture-of-block attention for video DiTs, with layers cycling 1-D / 2-D / 3-D key partitions.

Wu et al., "VMoBA: Mixture-of-Block Attention for Video Diffusion Models" (arXiv 2506.23858), after MoBA (Lu et
al., arXiv 2502.13189); research/sparse_quant.md §3. Training-free defaults (the paper's Appendix A: local top-k;
the threshold rule "causes vibration effects" without training).

Partitions of the visual grid, by layer index ``l`` (the first integer of the layer's qualified name, so
``blocks.7.attn1`` is layer 7 in every run; names without one count in order of first sight): ``l % 3 == 0``
temporal (runs of ``temporal_size`` frames x the whole H x W), ``1`` spatial (``spatial_size`` tiles over all
frames), ``2`` spatio-temporal (``cube_size`` cubes). Edge partitions may be smaller (ragged; no divisibility
needed). Defaults: the paper's Table 4 for Wan2.1 at 480p (latent 21x30x52: 3 frames, 5x13 tiles, 7x5x13 cubes,
top-k 2/6/18) and 720p (21x45x80: 3, 9x10, 7x15x20, top-k 2/10/9); other grids keep the 480p block counts, i.e.
``ceil(F/7)`` frames, ``ceil(H/6) x ceil(W/4)`` tiles, ``ceil(F/3) x ceil(H/6) x ceil(W/4)`` cubes, and top-k
``2/7``, ``1/4``, ``1/4`` of the partition count (at least 1). Image grids ``(H, W)`` (FLUX, SD3): 1-D partitions
are bands of ``ceil(H/7)`` rows, 2-D ones ``ceil(H/6) x ceil(W/4)`` tiles, 3-D ones ``ceil(H/9) x ceil(W/8)``
tiles (72, as the 3-D count).

Routing (per head): a partition's representative is its mean key; a visual query's score is ``q . mean(K_p)``
(unscaled float32, as the released code). Selection: ``"topk"`` (own partition forced in) or ``"threshold"`` (the
released ``query_head`` rule: scores min-max normalized over partitions; the own partition's share is subtracted
from ``threshold``; other partitions in descending order up to and including the first that reaches the rest; the own
partition always kept). Text keys are always kept and text queries attend to everything (joint models; VMoBA itself
has no text rule). The first ``dense_fraction`` of the steps run dense (paper: 25 %).

Two paths:

* ``path="reference"``: every visual query keeps exactly its own selection (an element mask, O(N^2) memory: for
  tests and small inputs).
* ``path="fast"`` (default): tokens permuted partition-major (a token order of the block-sparse kernel), the
  scores of every query against every partition in one Triton pass (:func:`diffaccel.kernels.block_scores`), a
  selection per query block of ``block_size`` kernel positions (``block_select="mean"``, default: the rule applied to
  the block's mean score, own partitions forced, as research/sparse_quant.md §5.5 suggests; ``"union"``: the union of
  its queries' selections, closer to the reference but denser), and every key block
  that holds a selected partition's token is kept. Kept sets are supersets per query block (union) and partitions
  straddling a key block bring their neighbours' tokens along, so the output differs from the reference: the
  measured error is asserted in tests/test_vmoba.py and documented in the README. ``min_mass`` (not in the paper)
  is a quality floor: with the partition mass estimated as ``|p| exp(scale * mean score)`` (normalized over
  partitions), a query block whose selection holds less than ``min_mass`` of it adds partitions by decreasing mass
  until it does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.kernels import block_scores, block_sparse_attention_unchecked
from diffaccel.kernels.masks import SparseBlockMask
from diffaccel.layout import TokenLayout
from diffaccel.methods._online import (
    OverheadMeter,
    RunTracker,
    layer_index,
    padded_mask_supported,
    run_steps,
    with_text_lengths,
)
from diffaccel.methods.base import MethodBase, MethodConfig, check_backend, check_choice, config_help, register_method, sdpa
from diffaccel.sparse.checks import check_block_size

KINDS = ("temporal", "spatial", "spatiotemporal")
SELECTS = ("topk", "threshold")
PATHS = ("fast", "reference")
BLOCK_SELECTS = ("union", "mean")

PAPER_PRESETS: dict[tuple[int, int, int], tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    (21, 30, 52): ((3,), (5, 13), (7, 5, 13), (2, 6, 18)),  # Wan2.1 81x480x832, Table 4
    (21, 45, 80): ((3,), (9, 10), (7, 15, 20), (2, 10, 9)),  # Wan2.1 81x720x1280, Table 4
}
"""(temporal frames, spatial tile, cube, top-k per kind) for the latent grids of the paper's training-free runs."""
TOPK_FRACTIONS = (2 / 7, 1 / 4, 1 / 4)
"""Top-k of the 480p preset as fractions of its partition counts (2 of 7, 6 of 24, 18 of 72), for other grids."""


def _c(a: int, b: int) -> int:
    return -(-a // b)


def _sizes_arg(name: str, value: object, ndim: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    vals = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(vals, (tuple, list)) or len(vals) != ndim or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in vals):
        raise ConfigError(f"{name} must be None or {ndim} positive integer(s), got {value!r}")
    return tuple(vals)


@dataclass
class VMoBAConfig(MethodConfig):
    """VMoBA, training-free mode (paper Appendix A, Table 4)."""

    topk: tuple[int, int, int] | None = field(default=None, metadata=config_help(
        "partitions kept per query for temporal / spatial / spatio-temporal layers; None: the paper's Table 4 "
        "(Wan 480p 2/6/18, 720p 2/10/9) or 2/7, 1/4, 1/4 of the partition count on other grids"))
    temporal_size: int | None = field(default=None, metadata=config_help(
        "frames per temporal (1-D) partition; None: 3 on the paper's grids, else ceil(F/7)"))
    spatial_size: tuple[int, int] | None = field(default=None, metadata=config_help(
        "(h, w) tile of spatial (2-D) partitions over all frames; None: Table 4, else ceil(H/6) x ceil(W/4)"))
    cube_size: tuple[int, int, int] | None = field(default=None, metadata=config_help(
        "(t, h, w) cube of spatio-temporal (3-D) partitions; None: Table 4, else ceil(F/3), ceil(H/6), ceil(W/4)"))
    select: str = field(default="topk", metadata=config_help(
        "'topk' (training-free default) or 'threshold' (cumulative min-max normalized score share, released code)"))
    threshold: float = field(default=0.25, metadata=config_help(
        "tau of select='threshold', in (0, 1] (paper 0.25); even 1 drops the lowest-scoring partition (0 after min-max)"))
    dense_fraction: float = field(default=0.25, metadata=config_help(
        "fraction of the first denoising steps that run dense, in [0, 1] (paper 25 %)"))
    path: str = field(default="fast", metadata=config_help(
        "'fast' (Triton block scores + block-sparse kernel, per query block) or 'reference' (exact per query)"))
    block_select: str = field(default="mean", metadata=config_help(
        "fast path: a query block keeps the 'union' of its queries' selections or the rule on its 'mean' score"))
    block_size: int = field(default=64, metadata=config_help(
        "fast path: tokens per kernel block (query and key), a power of two in [16, 256]"))
    min_mass: float = field(default=0.0, metadata=config_help(
        "fast path quality floor in [0, 1]: a query block keeping less estimated mass adds partitions (0: off)"))
    backend: str = field(default="auto", metadata=config_help(
        "kernels: 'auto' (Triton on CUDA or TRITON_INTERPRET=1), 'triton' or 'reference'"))

    def validate(self) -> None:
        if self.topk is not None:
            t = self.topk
            if isinstance(t, int) and not isinstance(t, bool):
                t = (t, t, t)
            if not isinstance(t, (tuple, list)) or len(t) != 3 or not all(
                    isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in t):
                raise ConfigError(f"topk must be None, a positive integer or three of them, got {self.topk!r}")
            self.topk = tuple(t)  # type: ignore[assignment]
        self.temporal_size = (_sizes_arg("temporal_size", self.temporal_size, 1) or (None,))[0]
        self.spatial_size = _sizes_arg("spatial_size", self.spatial_size, 2)  # type: ignore[assignment]
        self.cube_size = _sizes_arg("cube_size", self.cube_size, 3)  # type: ignore[assignment]
        check_choice("select", self.select, SELECTS)
        ok = isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool)
        if not ok or not 0 < float(self.threshold) <= 1:
            raise ConfigError(f"threshold must be a number in (0, 1], got {self.threshold!r}")
        ok = isinstance(self.dense_fraction, (int, float)) and not isinstance(self.dense_fraction, bool)
        if not ok or not 0 <= float(self.dense_fraction) <= 1:
            raise ConfigError(f"dense_fraction must be a number in [0, 1], got {self.dense_fraction!r}")
        check_choice("path", self.path, PATHS)
        check_choice("block_select", self.block_select, BLOCK_SELECTS)
        check_block_size(self.block_size)
        if self.block_size > 256:
            raise ConfigError(f"block_size must be at most 256, got {self.block_size}")
        ok = isinstance(self.min_mass, (int, float)) and not isinstance(self.min_mass, bool)
        if not ok or not 0 <= float(self.min_mass) <= 1:
            raise ConfigError(f"min_mass must be a number in [0, 1], got {self.min_mass!r}")
        check_backend(self.backend)


# ----------------------------------------------------------------------------------------------- partitions


@dataclass(frozen=True)
class Partition:
    """One layer kind's key partition of a grid: ``ids`` (num_visual,) partition of each visual token (row-major),
    ``count`` partitions, ``topk``, and the cell ``size`` per grid axis."""

    kind: str
    size: tuple[int, ...]
    ids: torch.Tensor
    count: int
    topk: int


def partition_sizes(grid: tuple[int, ...], kind: int, cfg: VMoBAConfig) -> tuple[tuple[int, ...], int | None]:
    """Cell size per grid axis for layer kind ``kind`` (0, 1, 2) and the top-k (None: from the count)."""
    user_k = None if cfg.topk is None else cfg.topk[kind]
    if len(grid) == 3:
        F_, H, W = grid
        preset = PAPER_PRESETS.get(tuple(grid))  # type: ignore[arg-type]
        if kind == 0:
            t = cfg.temporal_size or (preset[0][0] if preset else _c(F_, 7))
            size = (t, H, W)
        elif kind == 1:
            hw = cfg.spatial_size or (preset[1] if preset else (_c(H, 6), _c(W, 4)))
            size = (F_, *hw)
        else:
            size = cfg.cube_size or (preset[2] if preset else (_c(F_, 3), _c(H, 6), _c(W, 4)))
        k = user_k if user_k is not None else (preset[3][kind] if preset and _default_sizes(cfg) else None)
        return tuple(size), k
    if len(grid) == 2:
        H, W = grid
        if kind == 0:
            size = (cfg.temporal_size or _c(H, 7), W)
        elif kind == 1:
            size = cfg.spatial_size or (_c(H, 6), _c(W, 4))
        else:
            size = cfg.cube_size[1:] if cfg.cube_size else (_c(H, 9), _c(W, 8))
        return tuple(size), user_k
    (N,) = grid
    size = {0: cfg.temporal_size or _c(N, 7), 1: _c(N, 24), 2: _c(N, 72)}[kind]
    return (size,), user_k


def _default_sizes(cfg: VMoBAConfig) -> bool:
    return cfg.temporal_size is None and cfg.spatial_size is None and cfg.cube_size is None


@functools.lru_cache(maxsize=64)
def _partition_ids(grid: tuple[int, ...], size: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    counts = [_c(g, s) for g, s in zip(grid, size)]
    axes = torch.meshgrid(*[torch.arange(g) // s for g, s in zip(grid, size)], indexing="ij")
    ids = torch.zeros(grid, dtype=torch.long)
    for ax, n in zip(axes, counts):
        ids = ids * n + ax
    return ids.reshape(-1), math.prod(counts)


def partition_for(grid: tuple[int, ...], kind: int, cfg: VMoBAConfig) -> Partition:
    """The partition layer kind ``kind`` uses on ``grid`` (validated against it)."""
    size, k = partition_sizes(grid, kind, cfg)
    if len(size) != len(grid):
        raise ConfigError(f"vmoba: partition {size} does not fit grid {grid}")
    size = tuple(min(s, g) for s, g in zip(size, grid))
    ids, count = _partition_ids(tuple(grid), size)
    if k is None:
        k = max(1, round(TOPK_FRACTIONS[kind] * count))
    return Partition(KINDS[kind], size, ids, count, int(min(k, count)))


# ----------------------------------------------------------------------------------------------- selection


def select_partitions(
    scores: torch.Tensor, own: torch.Tensor, *, select: str, topk: int, threshold: float
) -> torch.Tensor:
    """Selected partitions ``(..., P)`` bool from scores ``(..., P)`` and the own partitions ``own`` (bool, same
    shape, always selected). See the module docstring for the two rules."""
    P = scores.shape[-1]
    scores = scores.float()
    if select == "topk":
        k = min(P, topk)  # own partitions beyond k (a query block straddling several) are added below
        forced = scores.masked_fill(own, float("inf"))
        idx = forced.topk(k, dim=-1).indices
        return torch.zeros_like(own).scatter_(-1, idx, True) | own
    lo, hi = scores.amin(-1, keepdim=True), scores.amax(-1, keepdim=True)
    rng = hi - lo
    norm = torch.where(rng > 0, (scores - lo) / rng.clamp(min=1e-30), torch.ones_like(scores))
    total = norm.sum(-1, keepdim=True).clamp(min=1e-30)
    self_share = (norm * own).sum(-1, keepdim=True) / total
    need = (threshold - self_share).clamp(min=0.0)
    others = norm.masked_fill(own, float("-inf"))
    vals, order = torch.sort(others, dim=-1, descending=True, stable=True)
    share = vals.clamp(min=0.0) / total
    before = torch.cumsum(share, dim=-1) - share
    first = torch.zeros_like(before, dtype=torch.bool)
    first[..., 0] = True
    keep_sorted = ((before < need) | first) & torch.isfinite(vals)
    return torch.zeros_like(own).scatter_(-1, order, keep_sorted) | own


# ----------------------------------------------------------------------------------------------- the method


@dataclass(frozen=True)
class _FastPlan:
    order: torch.Tensor  # (N,) kernel position -> sequence row
    pid_k: torch.Tensor  # (N,) partition of each kernel position (-1 text)
    vis_rows: torch.Tensor  # (nv,) sequence rows of the visual tokens, row-major
    own_blocks: torch.Tensor  # (nqb, P) bool: partitions of a query block's visual queries
    overlap: torch.Tensor  # (P, nkb) float: partition p has a token in key block j
    text_q: torch.Tensor  # (nqb,) bool: block holds a text query
    text_k: torch.Tensor  # (nkb,) bool
    log_sizes: torch.Tensor  # (P,) log of the partition sizes
    counts: torch.Tensor  # (P,) float


@register_method
class VMoBAMethod(MethodBase):
    """VMoBA (cyclic 1-D/2-D/3-D key partitions, per-query top-k or threshold routing); text kept."""

    name = "vmoba"
    config_class = VMoBAConfig
    config: VMoBAConfig

    def __init__(self, config: VMoBAConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        self._run = RunTracker()
        self._seen: dict[str, int] = {}
        self._kept: dict[str, torch.Tensor] = {}
        self._plans: dict[tuple, _FastPlan] = {}
        self.meter = OverheadMeter()

    def reset(self) -> None:
        """Forget the run: last masks and timings."""
        self._kept.clear()
        self.meter.reset()

    def kept_blocks(self, layer: str) -> torch.Tensor | None:
        """Kept key blocks ``(heads, q_blocks, kv_blocks)`` of batch row 0 at the layer's last fast-path call (kernel
        order: partition-major); None on the reference path or before the layer ran sparse."""
        st = self._kept.get(layer)
        if st is None:
            st = next((t for key, t in self._kept.items() if key.startswith(layer + "#")), None)
        return st

    def overhead(self) -> dict[str, float] | None:
        """Seconds scoring vs attention saved in the last run (see :mod:`diffaccel.methods._online`)."""
        return self.meter.summary()

    def dense_steps(self, num_steps: int) -> int:
        return int(self.config.dense_fraction * num_steps + 1e-9)

    def partition(self, layout: TokenLayout, layer: str | None) -> Partition:
        """The key partition of this call's layer."""
        assert layout.grid is not None
        return partition_for(layout.grid, layer_index(layer, self._seen) % 3, self.config)

    # -- calls ----------------------------------------------------------------------------------------------------
    def attend(self, q, k, v, layout: TokenLayout, ctx: RunContext, *, attn_mask=None, scale=None):
        if self._run.new_run(ctx):
            self.reset()
        if k.shape[2] != q.shape[2] or not padded_mask_supported(self.name, attn_mask, layout, q.shape[0]):
            return self.dense_fallback(q, k, v, attn_mask=attn_mask, scale=scale)
        layer = ctx.layer or ""
        if ctx.step < self.dense_steps(run_steps(ctx, self.name)):
            with self.meter.time("dense", layer, q.device):
                return self.dense_fallback(q, k, v, attn_mask=attn_mask, scale=scale)
        part = self.partition(layout, ctx.layer)
        if attn_mask is not None:
            assert layout.text_lengths is not None
            return with_text_lengths(
                q, k, v, layout, layout.text_lengths, scale,
                lambda qb, kb, vb, sub, g: self._sparse(qb, kb, vb, sub, part, f"{layer}#{g}", scale),
            )
        return self._sparse(q, k, v, layout, part, layer, scale)

    def _sparse(self, q, k, v, layout, part: Partition, layer: str, scale):
        if self.config.path == "reference":
            return vmoba_reference(q, k, v, layout, part, select=self.config.select,
                                   threshold=self.config.threshold, scale=scale)
        with self.meter.time("search", layer, q.device):
            mask, plan = self._fast_mask(q, k, layout, part, scale, layer)
        with self.meter.time("sparse", layer, q.device):
            return block_sparse_attention_unchecked(
                q, k, v, mask, scale=scale, token_order=plan.order, backend=self.config.backend)

    def _plan(self, layout: TokenLayout, part: Partition, device: torch.device) -> _FastPlan:
        key = (layout.num_tokens, layout.grid, layout.num_text, layout.text_first, part.size, self.config.block_size,
               str(device))
        plan = self._plans.get(key)
        if plan is None:
            plan = _build_plan(layout, part, self.config.block_size, device)
            self._plans[key] = plan
        return plan

    def _fast_mask(self, q, k, layout, part: Partition, scale, layer: str) -> tuple[SparseBlockMask, _FastPlan]:
        cfg = self.config
        B, H, N, D = q.shape
        plan = self._plan(layout, part, q.device)
        pid = part.ids.to(q.device)
        kv = k.index_select(2, plan.vis_rows).float()
        cent = torch.zeros(B, H, part.count, D, device=q.device).index_add_(2, pid, kv) / plan.counts.view(1, 1, -1, 1)
        union = cfg.block_select == "union"
        mean, per = block_scores(q, cent, cfg.block_size, token_order=plan.order, per_query=union, backend=cfg.backend)
        if union:
            assert per is not None
            vis = plan.pid_k >= 0
            own_q = F.one_hot(plan.pid_k.clamp(min=0), part.count).bool() & vis[:, None]
            sel_q = select_partitions(per, own_q.expand(B, H, N, part.count), select=cfg.select, topk=part.topk,
                                      threshold=cfg.threshold) & vis[:, None]
            nqb = plan.own_blocks.shape[0]
            pad = nqb * cfg.block_size - N
            sel = F.pad(sel_q, (0, 0, 0, pad)).view(B, H, nqb, cfg.block_size, part.count).any(3)
        else:
            sel = select_partitions(mean, plan.own_blocks.expand(B, H, -1, -1), select=cfg.select, topk=part.topk,
                                    threshold=cfg.threshold)
        if cfg.min_mass > 0:
            s = 1.0 / math.sqrt(D) if scale is None else scale
            w = torch.softmax(mean * s + plan.log_sizes, dim=-1)
            kept = (w * sel).sum(-1, keepdim=True)
            vals, order = torch.sort(w, dim=-1, descending=True, stable=True)
            before = torch.cumsum(vals, -1) - vals
            cover = torch.zeros_like(sel).scatter_(-1, order, before < cfg.min_mass)
            sel = torch.where(kept < cfg.min_mass, sel | cover, sel)
        keep = (sel.float() @ plan.overlap) > 0
        keep = keep | plan.text_k | plan.text_q[:, None]
        mask = SparseBlockMask.from_block_keep(keep, q_len=N, kv_len=N, q_block_size=cfg.block_size,
                                               kv_block_size=cfg.block_size, validate=False)
        self._kept[layer] = keep[0]
        return mask, plan


def _build_plan(layout: TokenLayout, part: Partition, block: int, device: torch.device) -> _FastPlan:
    N, nt, nv = layout.num_tokens, layout.num_text, layout.num_visual
    vs = layout.visual
    vis_rows = torch.arange(vs.start, vs.start + nv)
    perm = torch.argsort(part.ids, stable=True)  # partition-major, row-major inside
    pid_sorted = part.ids[perm]
    text_rows = torch.arange(layout.text.start, layout.text.stop) if nt else torch.zeros(0, dtype=torch.long)
    # Text goes last in kernel order whatever its place in the sequence, so partitions start at position 0 and the
    # ones whose size is a multiple of the block fill whole blocks.
    order = torch.cat([vis_rows[perm], text_rows])
    pid_k = torch.cat([pid_sorted, torch.full((nt,), -1)])
    nb = _c(N, block)
    blk = torch.arange(N) // block
    P = part.count
    onehot = torch.zeros(nb, P, dtype=torch.bool)
    vis = pid_k >= 0
    onehot[blk[vis], pid_k[vis]] = True
    text_b = torch.zeros(nb, dtype=torch.bool)
    text_b[blk[~vis]] = True
    counts = torch.bincount(part.ids, minlength=P).float()
    return _FastPlan(
        order=order.to(torch.int32).to(device), pid_k=pid_k.to(device), vis_rows=vis_rows.to(device),
        own_blocks=onehot.to(device), overlap=onehot.t().float().contiguous().to(device), text_q=text_b.to(device),
        text_k=text_b.to(device), log_sizes=counts.log().to(device), counts=counts.to(device),
    )


def vmoba_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, part: Partition, *, select: str,
    threshold: float, scale: float | None = None,
) -> torch.Tensor:
    """Exact per-query VMoBA: each visual query attends to the tokens of its selected partitions and all text keys;
    text queries attend to everything. Builds the ``(B, H, N, N)`` element mask: small inputs only."""
    B, H, N, D = q.shape
    vs = layout.visual
    pid = part.ids.to(q.device)
    kv = k[:, :, vs].float()
    counts = torch.bincount(pid, minlength=part.count).float()
    cent = torch.zeros(B, H, part.count, D, device=q.device).index_add_(2, pid, kv) / counts.view(1, 1, -1, 1)
    scores = torch.einsum("bhnd,bhpd->bhnp", q[:, :, vs].float(), cent)
    own = F.one_hot(pid, part.count).bool().expand(B, H, -1, -1)
    sel = select_partitions(scores, own, select=select, topk=part.topk, threshold=threshold)
    mask = torch.ones(B, H, N, N, dtype=torch.bool, device=q.device)
    mask[:, :, vs, vs] = sel[..., pid]  # key j of a visual query: its partition selected
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
