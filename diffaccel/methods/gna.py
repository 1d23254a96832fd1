"""Generalized Neighborhood Attention (GNA): NATTEN's sliding, strided and blocked local attention.

Hassani et al., "Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light"
(arXiv 2504.16922); semantics of NATTEN's masks (``natten/backends/flex.py``, ``research/locality.md`` §1.2). Each
visual query attends to a ``kernel_size`` window per grid dimension around its stride-group leader, clamped inside
the grid; text tokens of joint attention are dense (text queries see everything, visual queries see all text).

Fast path: when the stride makes the mask fully block-sparse on a multi-dimensional tile (the GNA paper's point),
tokens are permuted tile-major with one cached gather per call and the kernel visits only dense blocks; otherwise
the kernel runs in the model's order and masks partial blocks from token coordinates.

:func:`analyze` gives the kept-block fraction and the ideal speedup bound of a configuration: the tile-counting
idea of the GNA paper's simulator (NATTENSim, not released; ``research/locality.md`` §1.10), exact for both the
tile-major and the row-major layouts (:mod:`diffaccel.sparse.analysis`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.kernels.masks import NeighborhoodMask
from diffaccel.layout import TokenLayout
from diffaccel.methods._locality import LocalityConfig, LocalityMethod, as_int_tuple
from diffaccel.methods.base import check_choice, config_help, register_method
from diffaccel.sparse.analysis import GNAAnalysis, LayoutCost, analyze
from diffaccel.sparse.checks import check_neighborhood_values, neighborhood_parameters
from diffaccel.sparse.plans import AttentionPlan, plan_for
from diffaccel.sparse.text import layout_text_spec

__all__ = ["GNAAnalysis", "GNAConfig", "GNAMethod", "GNAPreset", "LayoutCost", "PRESETS", "analyze", "scale_preset"]

# ----------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class GNAPreset:
    """A published configuration on its base grid, scaled to other grids with Cosmos-Predict2's rule."""

    base_grid: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    source: str


PRESETS: dict[str, GNAPreset] = {
    # GNA paper, FLUX.1-dev at 4K (256x256 tokens): window 80x80, stride 16x16 ("the same configuration as in the
    # GNA paper", NATTEN docs/profiler.md; research/locality.md §1.8-1.9). Fully block-sparse on 16x8 tiles.
    "image": GNAPreset((256, 256), (80, 80), (16, 16), (1, 1), "GNA paper, FLUX.1-dev 4K (NATTEN profiler docs)"),
    # GNA paper, HunyuanVideo 720p (30x48x80 tokens): window 18x24x24, stride 16x8x8 (same source).
    "video": GNAPreset(
        (30, 48, 80), (18, 24, 24), (16, 8, 8), (1, 1, 1), "GNA paper, HunyuanVideo 720p (NATTEN profiler docs)"
    ),
}
PRESET_NAMES = ("auto", "image", "video")


def scale_preset(preset: GNAPreset, grid: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Kernel, stride and dilation of ``preset`` on ``grid``.

    Cosmos-Predict2's resolution rule (``neighborhood_attn.py::get_adaptive_parameters``, research/locality.md
    §1.9): per dimension ``scale = size / base``, ``window = clamp(round(w * scale), 2, size)``, ``stride =
    clamp(round(s * scale), 1, window)``, ``dilation = clamp(round(d * scale), 1, size // window)``. A dimension of
    size 1 keeps a window of 1.
    """
    ks, st, dl = [], [], []
    for n, b, w, s, d in zip(grid, preset.base_grid, preset.kernel_size, preset.stride, preset.dilation):
        scale = n / b
        k = min(max(round(w * scale), min(2, n)), n)
        ks.append(k)
        st.append(min(max(round(s * scale), 1), k))
        dl.append(min(max(round(d * scale), 1), max(n // k, 1)))
    return tuple(ks), tuple(st), tuple(dl)


# ----------------------------------------------------------------------------------------------- config


@dataclass
class GNAConfig(LocalityConfig):
    """GNA parameters. Leave ``kernel_size`` unset to take the GNA paper's configuration for the grid's rank.

    Defaults (``preset="auto"``): 2-D grids take ``"image"`` (FLUX.1-dev 4K: window 80x80, stride 16x16 on
    256x256 tokens), 3-D grids ``"video"`` (HunyuanVideo 720p: window 18x24x24, stride 16x8x8 on 30x48x80), both
    from the GNA paper as reproduced in NATTEN's profiler docs (research/locality.md §1.8), scaled to the actual
    grid with Cosmos-Predict2's rule (§1.9). A given ``kernel_size`` is used as is, with ``stride`` and
    ``dilation`` defaulting to 1. ``dense_steps`` defaults to 0: the GNA paper's count of dense warm-up steps is not
    verified (STA keeps 15 of 50 on HunyuanVideo, 12 of 50 on Wan, §3.2).
    """

    kernel_size: int | tuple[int, ...] | None = field(default=None, metadata=config_help(
        "window per grid dimension (one int or one per dimension); None: the preset scaled to the grid"))
    stride: int | tuple[int, ...] | None = field(default=None, metadata=config_help(
        "query groups sharing one window (1 = sliding window, kernel_size = blocked); None: preset or 1"))
    dilation: int | tuple[int, ...] | None = field(default=None, metadata=config_help(
        "dilation per dimension; None: preset or 1"))
    is_causal: bool | tuple[bool, ...] = field(default=False, metadata=config_help(
        "causal per dimension, e.g. [true, false, false] for causal time"))
    preset: str = field(default="auto", metadata=config_help(
        "'auto' (by grid rank), 'image' (GNA FLUX 4K: 80x80/16x16 on 256x256) or 'video' (GNA HunyuanVideo: "
        "18x24x24/16x8x8 on 30x48x80), used when kernel_size is None"))

    def validate(self) -> None:
        super().validate()
        for name in ("kernel_size", "stride", "dilation"):
            setattr(self, name, as_int_tuple(name, getattr(self, name)))
        check_neighborhood_values(self.kernel_size, self.stride, self.dilation)
        c = self.is_causal
        if isinstance(c, list):
            c = tuple(c)
        if not (isinstance(c, bool) or (isinstance(c, tuple) and c and all(isinstance(x, bool) for x in c))):
            raise ConfigError(f"is_causal must be a bool or a list of bools (one per dimension), got {self.is_causal!r}")
        self.is_causal = c
        check_choice("preset", self.preset, PRESET_NAMES)

    def parameters_for(self, grid: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
        """Kernel, stride, dilation and causality on ``grid``, checked with NATTEN's rules (ConfigError)."""
        nd = len(grid)
        if self.kernel_size is None:
            name = self.preset if self.preset != "auto" else {2: "image", 3: "video"}.get(nd)
            if name is None:
                raise ConfigError(f"gna has no default window for a {nd}-D grid {grid}: set kernel_size")
            preset = PRESETS[name]
            if len(preset.base_grid) != nd:
                raise ConfigError(f"gna preset {name!r} is {len(preset.base_grid)}-D but the grid {grid} is {nd}-D")
            ks, st, dl = scale_preset(preset, grid)
            if self.stride is not None:
                st = _broadcast("stride", self.stride, grid)
            if self.dilation is not None:
                dl = _broadcast("dilation", self.dilation, grid)
        else:
            ks = _broadcast("kernel_size", self.kernel_size, grid)
            st = _broadcast("stride", 1 if self.stride is None else self.stride, grid)
            dl = _broadcast("dilation", 1 if self.dilation is None else self.dilation, grid)
        causal = self.is_causal
        ca = (causal,) * nd if isinstance(causal, bool) else tuple(causal)
        if len(ca) != nd:
            raise ConfigError(f"is_causal has {len(ca)} entries but the grid {grid} has {nd} dimensions")
        return neighborhood_parameters(grid, ks, st, dl, ca, who="gna: ")


def _broadcast(name: str, value: int | tuple[int, ...], grid: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * len(grid)
    if len(value) != len(grid):
        raise ConfigError(f"gna: {name} {value} has {len(value)} entries but the grid {grid} has {len(grid)} dimensions")
    return tuple(value)


# ----------------------------------------------------------------------------------------------- method


@register_method
class GNAMethod(LocalityMethod):
    """Generalized Neighborhood Attention (NATTEN semantics) on image and video grids; text tokens dense."""

    name = "gna"
    context_parallel = frozenset({"ulysses"})  # tested: tests/test_context_parallel.py
    config_class = GNAConfig
    config: GNAConfig

    def spec_for(self, layout: TokenLayout, cfg: GNAConfig) -> NeighborhoodMask:
        assert layout.grid is not None
        ks, st, dl, ca = cfg.parameters_for(layout.grid)
        return NeighborhoodMask(layout.grid, ks, st, dl, ca, text=layout_text_spec(layout))

    def build_plan(  # type: ignore[override]
        self, layout: TokenLayout, ctx: RunContext, cfg: GNAConfig, *, heads: int, device: torch.device
    ) -> AttentionPlan:
        return plan_for(self.spec_for(layout, cfg), cfg.block_size, device)

    def plan_parameters(self, layout: TokenLayout, ctx: RunContext, *, heads: int = 1) -> dict:  # type: ignore[override]
        cfg = self.config_for(ctx.layer) or self.config
        assert layout.grid is not None
        ks, st, dl, ca = cfg.parameters_for(layout.grid)
        preset = None if cfg.kernel_size is not None else (
            cfg.preset if cfg.preset != "auto" else {2: "image", 3: "video"}.get(len(layout.grid)))
        return {"preset": preset, "kernel_size": ks, "stride": st, "dilation": dl, "is_causal": ca}


# ----------------------------------------------------------------------------------------------- analysis
# analyze() and its result types live in diffaccel.sparse.analysis (model- and method-agnostic); re-exported here
# because "gna.analyze" is where the docs point. The CLI is ``diffaccel methods gna --analyze`` (diffaccel/cli.py).
