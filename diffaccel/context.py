"""Run state that methods read: the latent grid, the denoising step, the layer being run.

A forward pre-hook that :func:`diffaccel.apply` installs on the denoiser fills it once per denoiser call; the
processor sets ``layer`` before each attention call. Without the hook (a bare ``set_attn_processor``), ``grid``
stays ``None`` and adapters infer a square grid.

The context holds run state only: bookkeeping of one model family (FLUX's single-stream text length) stays in
its adapter, bookkeeping of one method (SoftPAG's perturbed rows) in that method and its guidance hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class HeadShard:
    """The heads one rank holds during a context-parallel (Ulysses) attention call.

    Attributes:
        offset: global id of the call's first head: local head ``h`` is model head ``offset + h``.
        total: number of heads of the model's attention module (all ranks together).
        gather: collective that turns a per-head tensor ``(..., local_heads)`` of this rank into ``(..., total)``
            in global head order (every rank of the group calls it at the same point, or the run deadlocks).
            Methods whose per-head decisions depend on other heads (AdaSpa's head tiers) use it.
    """

    offset: int
    total: int
    gather: Callable[[torch.Tensor], torch.Tensor] = field(repr=False, compare=False)


@dataclass(eq=False)  # identity semantics: adapters key per-run state on the context object (weak references)
class RunContext:
    """Per-run state shared by every attention layer of one or more denoisers.

    Attributes:
        grid: visual token grid of the denoiser input after patchifying, ``(H, W)`` or ``(F, H, W)``.
        text_len: number of text tokens in joint attention, read from the encoder hidden states.
        step: index of the denoising step. Read from the pipeline's scheduler when it counts its steps
            (``step_index``: no host read, second-order schedulers' two evaluations share a step), else counted
            over distinct timesteps since the run began (two denoiser calls with one timestep, as unbatched CFG
            does, share a step).
        timestep: the timestep the denoiser was called with: as passed (often a device tensor, reading it syncs)
            when the step came from the scheduler, else its value as a float (the largest one for per-token
            timesteps).
        num_steps: number of steps of the run, when the pipeline's scheduler tells it; else ``None``.
        layer: qualified name of the attention module being run (``transformer_blocks.3.attn``).
        denoiser_calls: number of denoiser forwards seen so far (0 means no hook has run).
        num_steps_fn: callable giving ``num_steps`` at each denoiser call (set by :func:`diffaccel.apply`).
        step_fn: callable giving the step at each denoiser call without reading a tensor, or ``None`` when it
            cannot tell (then the step is counted from timestep values, one host read per denoiser call).
        heads: which heads of the model the current attention call holds, under context parallelism (Ulysses gives
            each rank a slice of the heads); ``None`` when the call holds every head. Methods with per-head state
            index it by global head id ``heads.offset + h``.
    """

    grid: tuple[int, ...] | None = None
    text_len: int | None = None
    step: int = 0
    timestep: float | torch.Tensor | None = None
    num_steps: int | None = None
    layer: str | None = None
    denoiser_calls: int = 0
    num_steps_fn: Callable[[], int | None] | None = field(default=None, repr=False)
    step_fn: Callable[[], int | None] | None = field(default=None, repr=False)
    heads: HeadShard | None = field(default=None, repr=False)

    def begin_denoiser_call(self, grid: tuple[int, ...] | None, text_len: int | None, timestep: Any) -> None:
        """Record one denoiser forward: new grid and text length, and the step.

        The step comes from ``step_fn`` when it answers (the timestep is then stored as passed, never read);
        otherwise from the timestep value: timesteps fall within a run, so a lower one is the next step, an equal
        one the same step, and a higher one starts a new run at step 0.
        """
        self.grid = grid
        self.text_len = text_len
        step = self.step_fn() if self.step_fn is not None else None
        if step is not None:
            self.step = step
            self.timestep = timestep
        else:
            value = timestep_value(timestep)
            if value is not None:
                previous = self.timestep if isinstance(self.timestep, float) else None
                if previous is None or self.denoiser_calls == 0 or value > previous:
                    self.step = 0
                elif value < previous:
                    self.step += 1
                self.timestep = value
            else:
                self.step = self.denoiser_calls
        self.denoiser_calls += 1
        if self.num_steps_fn is not None:
            self.num_steps = self.num_steps_fn()

    def reset(self) -> None:
        """Forget the run: the next denoiser call is step 0."""
        self.step, self.timestep, self.denoiser_calls = 0, None, 0


def timestep_value(timestep: Any) -> float | None:
    """The noise level of a denoiser call's ``timestep`` argument as a float (a host read for tensors).

    Per-token timesteps (Wan 2.2 TI2V, LTX conditioning) are 0 on clean frames: the noise level is the max.
    """
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.max()) if timestep.numel() else None
    return float(timestep)
