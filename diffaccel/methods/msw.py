"""MSW-MSA (HiDiffusion): 2x2 window attention on a cyclically shifted grid, no wrap-around mask.

Zhang et al., "HiDiffusion: Unlocking Higher-Resolution Creativity and Efficiency in Pretrained Diffusion Models"
(ECCV 2024), repo ``megvii-research/HiDiffusion`` (``hidiffusion/hidiffusion.py``; research/agent_msw_pag.md §2.2).
Self-attention of the highest-resolution attention level runs inside windows of ``ceil(H/2) x ceil(W/2)`` tokens
(always a 2x2 grid of windows); before each call the map is rolled by ``-shift`` with ``shift = k * floor(window /
4)``, ``k`` in {0, 1, 2, 3}; tokens wrapped across the border share windows (no Swin mask). Cross-attention stays
global.

Levels: the adapter tells the UNet level of a call (``layout.downsample``: how many times smaller its grid is than
the latent grid; ``layout.hierarchical``). A level is windowed when ``downsample <= max_downsample``; the default
(None) is the highest-resolution level that has attention (``layout.finest_downsample``, from the adapter): SD
1.5/2.1's ``down_blocks.0`` and ``up_blocks.3`` (factor 1), SDXL's ``down_blocks.1`` and ``up_blocks.1`` (factor 2,
since SDXL has no attention at full resolution), as in HiDiffusion. On a DiT every layer has the latent grid
(downsample 1), so every self/joint attention is windowed, with text tokens global (an extension: HiDiffusion is
UNet-only). On a video grid the windows cover all frames and split height and
width.

Differences from upstream, on purpose: a window that does not divide the grid leaves a smaller last window (upstream
resizes the map bicubically, with a warning that quality drops); shifts are drawn per (seed, layer, step) so a run
is reproducible (upstream draws per call from the global RNG).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from dataclasses import dataclass, field

import torch

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.kernels.masks import ShiftedWindowMask
from diffaccel.layout import TokenLayout
from diffaccel.methods._locality import LocalityConfig, LocalityMethod, as_int_tuple
from diffaccel.methods.base import check_choice, check_positive_int, config_help, register_method
from diffaccel.sparse.plans import AttentionPlan, plan_for
from diffaccel.sparse.text import layout_text_spec

SHIFT_POLICIES = ("random", "no_repeat", "cyclic")
NUM_SHIFTS = 4  # shifts of 0, 1/4, 1/2, 3/4 of the window


@dataclass
class MSWConfig(LocalityConfig):
    """MSW-MSA settings; defaults are HiDiffusion's.

    ``shift_policy``: ``"random"`` draws the shift index uniformly (upstream), ``"no_repeat"`` never repeats the
    previous step's index in a layer (the ComfyUI port ``blepping/comfyui_jankhidiffusion``), ``"cyclic"`` takes
    ``step mod 4``. ``max_downsample``: window every level whose grid is at most that factor below the latent grid
    (``layout.downsample``); None means the highest-resolution attention level (``layout.finest_downsample``: 1 on SD 1.x, 2 on SDXL, as
    upstream).
    """

    window: int | tuple[int, ...] | None = field(default=None, metadata=config_help(
        "window (height, width) in tokens; None: ceil(H/2) x ceil(W/2), HiDiffusion's 2x2 windows"))
    shift_policy: str = field(default="random", metadata=config_help(
        "'random' (upstream, seeded), 'no_repeat' (never the previous step's shift) or 'cyclic' (step mod 4)"))
    seed: int = field(default=0, metadata=config_help("seed of the shift draws"))
    max_downsample: int | None = field(default=None, metadata=config_help(
        "deepest UNet level (latent/level size) to window; None: the highest-resolution level "
        "that has attention (1 on SD 1.x, 2 on SDXL, as upstream)"))

    def validate(self) -> None:
        super().validate()
        self.window = as_int_tuple("window", self.window)
        w = self.window
        if w is not None and any(x < 1 for x in (w if isinstance(w, tuple) else (w,))):
            raise ConfigError(f"window must be >= 1 in every dimension, got {w!r}")
        check_choice("shift_policy", self.shift_policy, SHIFT_POLICIES)
        check_positive_int("seed", self.seed, minimum=0)
        if self.max_downsample is not None:
            check_positive_int("max_downsample", self.max_downsample)

    def window_for(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        """Window per grid dimension: the spatial (last two) dimensions windowed, frames whole."""
        nd = len(grid)
        spatial = grid[-2:] if nd >= 2 else grid
        lead = grid[: nd - len(spatial)]
        w = self.window
        if w is None:
            win = tuple(math.ceil(n / 2) for n in spatial)
        elif isinstance(w, int):
            win = (w,) * len(spatial)
        elif len(w) == nd:
            return tuple(w)
        elif len(w) == len(spatial):
            win = tuple(w)
        else:
            raise ConfigError(f"msw: window {w} must have {len(spatial)} (spatial) or {nd} entries for grid {grid}")
        for n, x in zip(spatial, win):
            if x > n:
                raise ConfigError(f"msw: window {w} is larger than the grid {grid}")
        return tuple(lead) + win


@functools.lru_cache(maxsize=8192)
def shift_index(policy: str, seed: int, layer: str | None, step: int) -> int:
    """Shift index ``k`` in {0, 1, 2, 3} of ``layer`` at denoising ``step`` (deterministic per seed)."""
    if policy == "cyclic":
        return step % NUM_SHIFTS
    if policy == "random" or step == 0:
        return random.Random(f"{seed}:{layer}:{step}").randrange(NUM_SHIFTS)
    # no_repeat: one of the three indices other than the previous step's
    previous = shift_index(policy, seed, layer, step - 1)
    return (previous + 1 + random.Random(f"{seed}:{layer}:{step}:next").randrange(NUM_SHIFTS - 1)) % NUM_SHIFTS


def _shift(grid: tuple[int, ...], window: tuple[int, ...], k: int) -> tuple[int, ...]:
    """Shift index ``k`` as token offsets: ``k * floor(window / 4)`` on the (up to two) spatial axes, 0 on frames."""
    nd = len(grid)
    spatial = min(2, nd)
    return tuple(0 if a < nd - spatial else (k * (w // 4)) % n for a, (n, w) in enumerate(zip(grid, window)))


@register_method
class MSWMethod(LocalityMethod):
    """HiDiffusion's MSW-MSA window attention (UNet high-resolution level, or every DiT layer); text global."""

    name = "msw"
    config_class = MSWConfig
    config: MSWConfig

    def windowed_level(self, layout: TokenLayout, cfg: MSWConfig) -> bool:
        """Whether the call's UNet level is windowed: ``layout.downsample <= max_downsample``; by default the
        highest-resolution attention level (``layout.finest_downsample``)."""
        limit = layout.finest_downsample if cfg.max_downsample is None else cfg.max_downsample
        return layout.downsample <= limit

    def shift_for(self, layout: TokenLayout, ctx: RunContext, cfg: MSWConfig) -> tuple[int, ...]:
        """The shift of ``ctx.layer`` at ``ctx.step``: ``k * floor(window / 4)`` on the spatial dimensions."""
        grid = layout.grid
        assert grid is not None
        return _shift(grid, cfg.window_for(grid), shift_index(cfg.shift_policy, cfg.seed, ctx.layer, ctx.step))

    def spec_for(self, layout: TokenLayout, ctx: RunContext, cfg: MSWConfig) -> ShiftedWindowMask:
        grid = layout.grid
        assert grid is not None
        win = cfg.window_for(grid)
        return ShiftedWindowMask(grid, win, self.shift_for(layout, ctx, cfg), text=layout_text_spec(layout))

    def plan_key(self, layout: TokenLayout, ctx: RunContext, cfg: MSWConfig) -> int:  # type: ignore[override]
        """The plan changes with the shift index (one of four per layer), not with the step itself."""
        return shift_index(cfg.shift_policy, cfg.seed, ctx.layer, ctx.step)

    def build_plan(  # type: ignore[override]
        self, layout: TokenLayout, ctx: RunContext, cfg: MSWConfig, *, heads: int, device: torch.device
    ) -> AttentionPlan | None:
        if not self.windowed_level(layout, cfg):
            return None
        spec = self.spec_for(layout, ctx, cfg)
        # The four shifts of the rotation are planned together on the layer's first call: building a plan reads
        # block masks back to the host, so later steps then switch plans by a cache lookup, with no device sync.
        for k in range(NUM_SHIFTS):
            plan_for(dataclasses.replace(spec, shift=_shift(spec.grid, spec.window, k)), cfg.block_size, device)
        return plan_for(spec, cfg.block_size, device)

    def plan_parameters(self, layout: TokenLayout, ctx: RunContext, *, heads: int = 1) -> dict:  # type: ignore[override]
        spec = self.spec_for(layout, ctx, self.config_for(ctx.layer) or self.config)  # type: ignore[arg-type]
        return {"window": spec.window, "shift": spec.shift}
