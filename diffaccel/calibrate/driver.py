"""The PARO calibration driver: dense generations with the recording method applied, then the plan.

:func:`calibrate_pipeline` applies a :class:`~diffaccel.methods.paro_calibration.ParoCalibrator` with
:func:`diffaccel.apply`, runs the pipeline on each prompt (a rich progress bar over prompts x steps), builds the
plan and times itself; with ``compare_dense`` it also times the dense generations of the same prompts (stock
processors, alternating prompt by prompt after one untimed warm-up call), so the report says what calibration costs
against plain generation (the issue's budget: at most twice).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffaccel.errors import ConfigError, UnsupportedModelError
from diffaccel.methods.paro import ParoConfig
from diffaccel.methods.paro_calibration import ParoCalibrator
from diffaccel.methods.paro_plan import ParoPlan
from diffaccel.pipelines.adapters.base import family_of
from diffaccel.pipelines.hooks import apply, denoisers_of, remove
from diffaccel.pipelines.model_setup import model_config_hash


@dataclass
class CalibrationResult:
    """The plan and what it cost: calibration wall time, and the dense generations' (when measured)."""

    plan: ParoPlan
    calibration_s: float
    dense_s: float | None
    prompts: int
    steps: int

    @property
    def ratio(self) -> float | None:
        return None if not self.dense_s else self.calibration_s / self.dense_s


def read_prompts(prompts: str, num_prompts: int) -> list[str]:
    """``prompts``: a text file (one prompt a line, blank lines and ``#`` comments skipped) or one prompt text."""
    if not isinstance(num_prompts, int) or isinstance(num_prompts, bool) or num_prompts < 1:
        raise ConfigError(f"num_prompts must be an integer >= 1, got {num_prompts!r}")
    path = Path(prompts)
    if len(prompts) < 4096 and path.is_file():
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        found = [ln for ln in lines if ln and not ln.startswith("#")]
        if not found:
            raise ConfigError(f"prompts file {prompts!r} holds no prompt")
        return found[:num_prompts]
    if not prompts.strip():
        raise ConfigError("prompts must be a text file or a non-empty prompt")
    return [prompts]


def check_family(pipe: Any) -> None:
    """PARO runs on DiTs; a UNet pipeline is refused before any generation."""
    for model in denoisers_of(pipe):
        if family_of(model).hierarchical:
            raise UnsupportedModelError(
                f"paro: {type(model).__name__} is a UNet (several token grids per denoiser); PARO's axis orders and "
                "static masks are defined on a DiT's single grid: use FLUX, SD3, Wan, HunyuanVideo, CogVideoX or LTX"
            )


def _call(pipe: Any, prompt: str, kwargs: dict[str, Any], seed: int, on_step: Any = None) -> None:
    generator = torch.Generator("cpu").manual_seed(seed)
    extra = {}
    if on_step is not None and "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        def callback(p: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            on_step()
            return callback_kwargs
        extra["callback_on_step_end"] = callback
    pipe(prompt=prompt, generator=generator, output_type="pt", **kwargs, **extra)


def calibrate_pipeline(
    pipe: Any,
    *,
    model: str,
    prompts: list[str],
    kwargs: dict[str, Any],
    steps: int,
    config: ParoConfig,
    seed: int = 0,
    compare_dense: bool = True,
    progress: bool = True,
    package_version: str = "",
) -> CalibrationResult:
    """Calibrate a PARO plan on ``pipe`` from dense generations of ``prompts`` (see the module docstring)."""
    check_family(pipe)
    if not prompts:
        raise ConfigError("paro calibration needs at least one prompt")
    bar = dict(getattr(pipe, "_progress_bar_config", None) or {})
    pipe.set_progress_bar_config(**{**bar, "disable": True})
    device_sync = _synchronizer(pipe)
    calibrator = ParoCalibrator(config, num_steps=steps)
    dense_s = 0.0 if compare_dense else None
    calib_s = 0.0
    try:
        if compare_dense:  # one untimed dense call: one-time costs (allocations, lazy imports) off both clocks
            remove(pipe)
            _call(pipe, prompts[0], {**kwargs, "num_inference_steps": 1}, seed)
        with _progress(progress, len(prompts) * steps) as advance:
            for i, prompt in enumerate(prompts):
                if compare_dense:
                    remove(pipe)
                    device_sync()
                    t0 = time.perf_counter()
                    _call(pipe, prompt, kwargs, seed + i)
                    device_sync()
                    dense_s += time.perf_counter() - t0  # type: ignore[operator]
                calibrator.prompt_index = i
                apply(pipe, calibrator)
                device_sync()
                t0 = time.perf_counter()
                _call(pipe, prompt, kwargs, seed + i, on_step=advance)
                device_sync()
                calib_s += time.perf_counter() - t0
                remove(pipe)
        t0 = time.perf_counter()
        main = denoisers_of(pipe)[0]
        plan = calibrator.build_plan(model=model, config_hash=model_config_hash(main),
                                     package_version=package_version, prompts=len(prompts))
        calib_s += time.perf_counter() - t0
    finally:
        remove(pipe)
        pipe.set_progress_bar_config(**bar)
    return CalibrationResult(plan=plan, calibration_s=calib_s, dense_s=dense_s, prompts=len(prompts), steps=steps)


def _synchronizer(pipe: Any):
    device = getattr(pipe, "_execution_device", None)
    if device is not None and torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(torch.device(device))
    return lambda: None


class _progress:
    """A rich progress bar over prompts x steps (a no-op when disabled); ``advance()`` moves it one step."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("paro calibration"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), transient=False)
        self._progress.__enter__()
        task = self._progress.add_task("calibrate", total=self.total)
        return lambda: self._progress.advance(task)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def plan_path_for(out: Path, model_slug: str, kwargs: dict[str, Any], steps: int, config: ParoConfig) -> Path:
    """Where ``diffaccel generate`` keeps an on-the-fly plan: one file per model, size, steps and density."""
    size = "x".join(str(kwargs[k]) for k in ("width", "height", "num_frames") if kwargs.get(k) is not None) or "default"
    density = 0.5 if config.density is None else config.density
    block = 64 if config.block_size is None else config.block_size
    return Path(out) / f"{model_slug}_paro_{size}_{steps}steps_d{density:g}_b{block}.safetensors"


def ensure_plan(method: Any, pipe: Any, *, model: str, model_slug: str, prompt: str, kwargs: dict[str, Any],
                steps: int | None, seed: int, out: Path) -> Path | None:
    """``diffaccel generate --method paro`` without a plan: reuse the plan saved next to the outputs by an earlier
    run of this model, size and step count, else calibrate on the prompt (one warning line) and save it there.

    Returns the plan's path, or ``None`` when ``method`` is not PARO or already has a plan.
    """
    from diffaccel.methods.paro import ParoMethod
    from diffaccel.methods.paro_plan import load_plan
    from diffaccel.warn import warn_once

    if not isinstance(method, ParoMethod) or method.plan is not None:
        return None
    check_family(pipe)
    if steps is None:
        raise ConfigError("paro: pass --steps: calibration needs the number of denoising steps")
    path = plan_path_for(out, model_slug, kwargs, steps, method.config)
    main = denoisers_of(pipe)[0]
    if path.is_file():
        try:
            plan = load_plan(path)
            plan.check_model(model, model_config_hash(main))
            if plan.steps != steps:
                raise ConfigError(f"plan {path} has {plan.steps} steps, the run {steps}")
            method.set_plan(plan)
            return path
        except ConfigError as exc:
            warn_once(f"paro-stale-plan:{path}", f"diffaccel: paro: not reusing {path} ({exc}); recalibrating")
    warn_once(
        f"paro-on-the-fly:{path}",
        f"diffaccel: paro has no plan: calibrating on this prompt ({steps} dense steps), saving it to {path} "
        "(later runs reuse it; `diffaccel calibrate --method paro` calibrates on more prompts)",
    )
    from diffaccel import __version__

    result = calibrate_pipeline(pipe, model=model, prompts=[prompt], kwargs={**kwargs, "num_inference_steps": steps},
                                steps=steps, config=method.config, seed=seed, compare_dense=False, progress=False,
                                package_version=__version__)
    result.plan.save(path)
    method.set_plan(result.plan)
    return path
