"""Efficient-vDiT attention tiles: each latent frame attends to itself and to a few global frames.

Ding et al., "Efficient Video Diffusion Transformers with Attention Tile" (arXiv 2502.06155). In 3-D full
attention the frame-by-frame blocks of the attention map are repetitive and dominated by the diagonal; the
``g : (T - g)`` masks keep, for a query in frame ``f``, the keys of frame ``f`` and of ``g`` global reference frames
(queries of a global frame keep every frame), so the cost grows linearly with the number of frames
(research/locality.md §2.2). Text tokens of joint attention stay dense.

Scope: the paper pairs the mask with multi-step consistency distillation and knowledge distillation of the sparse
student, and searches ``g`` per layer on a tolerance ``r``. diffaccel implements the mask only (training-free, per
layer and per head configurable through ``layer_overrides`` and per-head frame lists); the distillation stages
are out of scope. Video grids only: image models raise a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffaccel.context import HeadShard, RunContext
from diffaccel.errors import ConfigError
from diffaccel.kernels.masks import TileMask
from diffaccel.layout import TokenLayout
from diffaccel.methods._locality import LocalityConfig, LocalityMethod
from diffaccel.methods.base import check_choice, config_help, register_method
from diffaccel.sparse.checks import check_global_frames
from diffaccel.sparse.plans import AttentionPlan, plan_for
from diffaccel.sparse.text import layout_text_spec

PLACEMENTS = ("first", "uniform")


@dataclass
class TileConfig(LocalityConfig):
    """Global reference frames of the attention-tile mask.

    Default ``global_frames=None`` keeps ``round(T / 4)`` global frames (at least one) for ``T`` latent frames:
    the paper's 2:6 mask at 29 frames (8 latent frames, 45.5% sparsity, 1.86x kernel speedup, Table 1) and 6:18 at
    93 frames (24 latent frames, 51.9%, 2.14x). Which frames the paper takes as global is not stated
    (research/locality.md §2.2); ``placement="first"`` takes the first ones (the first latent frame of a causal
    video VAE encodes the first image alone), ``"uniform"`` spreads them over the clip.
    """

    global_frames: int | tuple[int, ...] | tuple[tuple[int, ...], ...] | None = field(default=None, metadata=config_help(
        "number of global frames g, or explicit frame indices, or one list per head; None: round(T/4), >= 1"))
    placement: str = field(default="first", metadata=config_help(
        "where an integer number of global frames sits: 'first' frames or 'uniform'ly spread"))

    def validate(self) -> None:
        super().validate()
        check_choice("placement", self.placement, PLACEMENTS)
        g = self.global_frames
        if g is None:
            return
        if isinstance(g, bool):
            raise ConfigError(f"global_frames must be an integer, a list of frame indices or one list per head, got {g!r}")
        if isinstance(g, int):
            if g < 0:
                raise ConfigError(f"global_frames as a count must be >= 0, got {g}")
            return
        self.global_frames = check_global_frames(g)

    def frames_for(self, num_frames: int, heads: int) -> tuple[int, ...] | tuple[tuple[int, ...], ...]:
        """The global frames on a clip of ``num_frames`` latent frames (one tuple, or one per head)."""
        g = self.global_frames
        if g is None or isinstance(g, int):
            count = max(1, round(num_frames / 4)) if g is None else g
            if count > num_frames:
                raise ConfigError(f"tile: {count} global frames requested but the clip has {num_frames} latent frames")
            return _place(count, num_frames, self.placement)
        return check_global_frames(g, num_frames, heads, who="tile: ")


def _place(count: int, num_frames: int, placement: str) -> tuple[int, ...]:
    if count == 0:
        return ()
    if placement == "first" or count == 1:
        return tuple(range(count))
    return tuple(sorted({round(i * (num_frames - 1) / (count - 1)) for i in range(count)}))


@register_method
class TileMethod(LocalityMethod):
    """Efficient-vDiT attention tiles (frame-level sparsity, linear in frames) on video grids; text dense."""

    name = "tile"
    context_parallel = frozenset({"ulysses"})  # tested: tests/test_context_parallel.py
    config_class = TileConfig
    config: TileConfig

    def spec_for(
        self, layout: TokenLayout, cfg: TileConfig, heads: int, layer: str | None = None,
        shard: HeadShard | None = None,
    ) -> TileMask:
        """The tile mask of a call with ``heads`` heads; under context parallelism (``shard``) per-head frame lists
        are given for the model's ``shard.total`` heads and this call takes rows ``shard.offset ...``."""
        grid = layout.grid
        assert grid is not None
        if len(grid) != 3:
            raise ConfigError(
                f"tile: attention tiles need a video grid (frames, height, width), but layer {layer} has grid "
                f"{grid}; use tile on video models (Wan, HunyuanVideo, CogVideoX, LTX-Video), not on image models"
            )
        if shard is None:
            frames = cfg.frames_for(grid[0], heads)
        else:
            frames = cfg.frames_for(grid[0], shard.total)
            if frames and isinstance(frames[0], tuple):  # one list per head: this call's heads, by global id
                frames = frames[shard.offset: shard.offset + heads]
        return TileMask(grid, frames, text=layout_text_spec(layout))

    def build_plan(  # type: ignore[override]
        self, layout: TokenLayout, ctx: RunContext, cfg: TileConfig, *, heads: int, device: torch.device
    ) -> AttentionPlan:
        return plan_for(self.spec_for(layout, cfg, heads, ctx.layer, ctx.heads), cfg.block_size, device)

    def plan_parameters(self, layout: TokenLayout, ctx: RunContext, *, heads: int = 1) -> dict:  # type: ignore[override]
        cfg = self.config_for(ctx.layer) or self.config
        spec = self.spec_for(layout, cfg, heads, ctx.layer, ctx.heads)  # type: ignore[arg-type]
        return {"global_frames": spec.global_frames, "placement": cfg.placement}  # type: ignore[attr-defined]

