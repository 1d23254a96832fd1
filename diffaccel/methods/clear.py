"""CLEAR: a circular local window around each image query, text tokens dense.

Liu, Tan, Wang, "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up" (NeurIPS 2025, arXiv
2412.16112), repo ``Huage001/CLEAR`` (``attention_processor.py``; research/locality.md §4). An image query attends
to the image keys at Euclidean latent-grid distance ``< radius`` (not moved inward at the borders: border queries
see fewer keys) and to every text key; text queries attend to every token.

CLEAR is a *distilled* method: the authors fine-tune FLUX.1-dev's attention projections for each radius and state
that the window on the original weights gives poor, repetitive images (Huage001/CLEAR#14). Pass ``weights=`` (a
folder, a file or the Hub repo ``Huage001/CLEAR``): the pipeline layer installs the distilled projections when the
method is applied (a model-setup hook on the pipeline side, which then calls :meth:`ClearMethod.note_distilled`);
without them the method runs training-free and warns once. The method itself holds no model code.

Video grids ``(frames, height, width)``: ``video="per_frame"`` (default) applies the 2-D circle inside each frame
(CLEAR's definition, frame by frame; one kernel launch when frames are block-aligned, :mod:`diffaccel.sparse.per_frame`); ``video="ball"`` measures the distance over (frame, row, column), the 3-D
extension STA benchmarked as its CLEAR baseline on HunyuanVideo (research/locality.md §3.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.kernels.masks import CircleMask
from diffaccel.layout import TokenLayout
from diffaccel.methods._locality import LocalityConfig, LocalityMethod
from diffaccel.methods.base import check_choice, check_positive_int, config_help, register_method
from diffaccel.sparse.checks import check_radius
from diffaccel.sparse.per_frame import per_frame_plan
from diffaccel.sparse.plans import AttentionPlan, plan_for
from diffaccel.sparse.run import run_plan
from diffaccel.sparse.text import layout_text_spec
from diffaccel.warn import warn_once

VIDEO_MODES = ("per_frame", "ball")
DEFAULT_TRAIN_TOKENS = 64 * 64 + 512
"""Tokens of CLEAR's training resolution (1024 px FLUX: 64x64 image tokens + 512 text), the base of its
proportional attention scale (the ``train_tokens`` default)."""


@dataclass
class ClearConfig(LocalityConfig):
    """CLEAR settings. ``radius=16`` is ``distill.py``'s default window (released radii: 8, 16, 32 at 1024 px).

    At 1024 px the paper measures no speedup (4.45 s vs 4.56 s per image at r=16 on H100, Table 7): the window is
    large relative to the 64x64 grid; gains appear at 2K and above.
    """

    radius: float = field(default=16.0, metadata=config_help(
        "window radius in latent tokens (keys at distance < radius); CLEAR releases 8, 16, 32"))
    video: str = field(default="per_frame", metadata=config_help(
        "3-D grids: 'per_frame' (2-D circle inside each frame) or 'ball' (distance over frame, row, column)"))
    weights: str | None = field(default=None, metadata=config_help(
        "distilled projections to install when applied: a .safetensors file, a folder, or a Hub repo id "
        "(Huage001/CLEAR); None runs training-free (poor quality per the authors)"))
    weights_file: str | None = field(default=None, metadata=config_help(
        "file inside the weights folder or repo; default clear_local_{radius}.safetensors"))
    proportional_attention: bool = field(default=False, metadata=config_help(
        "CLEAR's high-resolution scale: softmax scale times sqrt(log(N) / log(train_tokens)), N = tokens of the call"))
    train_tokens: int = field(default=DEFAULT_TRAIN_TOKENS, metadata=config_help(
        "tokens of the training resolution, the base of proportional_attention (CLEAR: FLUX 1024 px, 64*64 + 512)"))

    def validate(self) -> None:
        super().validate()
        self.radius = check_radius(self.radius)
        check_positive_int("train_tokens", self.train_tokens, minimum=2)
        check_choice("video", self.video, VIDEO_MODES)
        for name in ("weights", "weights_file"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{name} must be a path or Hub repo id, or None, got {value!r}")
        if not isinstance(self.proportional_attention, bool):
            raise ConfigError(f"proportional_attention must be true or false, got {self.proportional_attention!r}")


@register_method
class ClearMethod(LocalityMethod):
    """CLEAR circular local attention (image and video grids); distilled FLUX weights optional but advised."""

    name = "clear"
    config_class = ClearConfig
    config: ClearConfig

    def __init__(self, config: ClearConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._distilled = False

    # -- distilled weights ----------------------------------------------------------------------------------------
    # Installing ``weights`` is model code: the pipeline layer does it when the method is applied, then calls
    # note_distilled(radius) (also for distilled weights found already installed on the model).
    def note_distilled(self, radius: float | None) -> None:
        """Record that the model's projections are CLEAR-distilled for ``radius`` (checked against the config)."""
        if radius is not None and float(radius) != self.config.radius:
            raise ConfigError(
                f"clear: the installed CLEAR weights were distilled for radius {radius:g} but the method uses radius "
                f"{self.config.radius:g}; set radius={radius:g}"
            )
        self._distilled = True

    # -- attention ------------------------------------------------------------------------------------------------
    def build_plan(  # type: ignore[override]
        self, layout: TokenLayout, ctx: RunContext, cfg: ClearConfig, *, heads: int, device: torch.device
    ) -> AttentionPlan:
        grid = layout.grid
        assert grid is not None
        text = layout_text_spec(layout)
        if len(grid) == 3 and cfg.video == "per_frame":
            return per_frame_plan(grid, cfg.radius, text, cfg.block_size, device)  # type: ignore[arg-type]
        return plan_for(CircleMask(grid, cfg.radius, text=text), cfg.block_size, device)

    def plan_parameters(self, layout: TokenLayout, ctx: RunContext, *, heads: int = 1) -> dict:  # type: ignore[override]
        cfg = self.config_for(ctx.layer) or self.config
        assert layout.grid is not None
        return {"radius": cfg.radius, "video": cfg.video if len(layout.grid) == 3 else None}

    def local_attention(self, q, k, v, layout: TokenLayout, ctx: RunContext, cfg: Any, *, scale):  # type: ignore[override]
        if not self._distilled:
            if cfg.weights is not None:
                raise ConfigError(
                    "clear: weights= was given but never installed: apply the method with diffaccel.apply(pipe, "
                    "'clear', weights=...), or call diffaccel.pipelines.clear_weights.load_clear_weights(transformer, "
                    "...) and method.note_distilled(radius) before installing the processor"
                )
            warn_once(
                "clear-training-free",
                "clear: running training-free (no distilled CLEAR weights installed). The CLEAR authors report that "
                "the local window on the original weights gives poor, repetitive images and that distillation is "
                "necessary (Huage001/CLEAR#14); pass weights='Huage001/CLEAR' (FLUX.1-dev, radius 8/16/32).",
            )
        if cfg.proportional_attention:
            base = q.shape[-1] ** -0.5 if scale is None else float(scale)
            scale = base * math.sqrt(math.log(q.shape[2]) / math.log(cfg.train_tokens))
        plan = self.plan(layout, ctx, heads=q.shape[1], device=q.device)
        assert plan is not None
        return run_plan(q, k, v, plan, scale=scale, backend=cfg.backend)
