"""Run state that methods read: the latent grid, the denoising step, the layer being run.

A forward pre-hook that :func:`diffaccel.apply` installs on the denoiser fills it once per denoiser call; the
processor sets ``layer`` before each attention call. Without the hook (a bare ``set_attn_processor``), ``grid``
stays ``None`` and adapters infer a square grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class RunContext:
    """Per-run state shared by every attention layer of one or more denoisers.

    Attributes:
        grid: visual token grid of the denoiser input after patchifying, ``(H, W)`` or ``(F, H, W)``.
        text_len: number of text tokens in joint attention, read from the encoder hidden states.
        step: index of the denoising step, counted over distinct timesteps since the run began (two denoiser
            calls with one timestep, as unbatched CFG does, share a step).
        timestep: the timestep value the denoiser was called with.
        num_steps: number of steps of the run, when the pipeline's scheduler tells it; else ``None``.
        layer: qualified name of the attention module being run (``transformer_blocks.3.attn``).
        denoiser_calls: number of denoiser forwards seen so far (0 means no hook has run).
    """

    grid: tuple[int, ...] | None = None
    text_len: int | None = None
    step: int = 0
    timestep: float | None = None
    num_steps: int | None = None
    layer: str | None = None
    denoiser_calls: int = 0
    joint_text_len: int | None = None
    """Text length of the last dual-stream joint call (FLUX), for single-stream calls when no hook set text_len."""
    perturbed_rows: slice | None = None  # batch rows of the perturbed guidance branch (SoftPAG); set by pipelines/guidance.py
    num_steps_fn: Callable[[], int | None] | None = field(default=None, repr=False, compare=False)

    def begin_denoiser_call(
        self, grid: tuple[int, ...] | None, text_len: int | None, timestep: float | None
    ) -> None:
        """Record one denoiser forward: new grid and text length, and advance the step on a new timestep.

        Timesteps fall within a run, so a timestep above the previous one starts a new run at step 0.
        """
        self.grid = grid
        self.text_len = text_len
        if timestep is not None:
            if self.timestep is None or self.denoiser_calls == 0:
                self.step = 0
            elif timestep > self.timestep:
                self.step = 0
            elif timestep < self.timestep:
                self.step += 1
            self.timestep = timestep
        else:
            self.step = self.denoiser_calls
        self.denoiser_calls += 1
        if self.num_steps_fn is not None:
            self.num_steps = self.num_steps_fn()

    def reset(self) -> None:
        """Forget the run: the next denoiser call is step 0."""
        self.step, self.timestep, self.denoiser_calls = 0, None, 0
