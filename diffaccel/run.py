"""``diffaccel generate``: run a method on a pipeline, and dense with the same seed, then time and compare them.

The dense baseline is the pipeline with its stock diffusers processors (PyTorch SDPA), so the speedup and the
PSNR/SSIM are against exactly what users run today. Both runs draw their latents from a CPU generator seeded
with the same seed, so they start from the same noise on any device. The two runs alternate call by call
(method, dense, method, dense, ...) after untimed warm-up calls of each (:mod:`diffaccel.eval.timing`), and the
table shows medians with their min-max range; on a CPU or a tiny model it says that the times measure overheads.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from types import SimpleNamespace

from diffaccel import multigpu
from diffaccel.errors import ConfigError
from diffaccel.eval.fidelity import Fidelity, compare
from diffaccel.eval.media import WrittenVideo, save_image, save_side_by_side, save_video
from diffaccel.eval.timing import Side, Spread, Timing, interleaved, paired_ratio, spread
from diffaccel.methods.base import AttentionMethod, get_method
from diffaccel.pipelines.hooks import apply, attention_modules, denoisers_of, remove
from diffaccel.pipelines.parallel import check_method
from diffaccel.warn import warn_once
from diffaccel.pipelines.loading import load_pipeline, resolve_device, resolve_dtype
from diffaccel.pipelines.tiny import is_tiny, tiny_spec

DEFAULT_PROMPT = "a red fox in a snowy forest at golden hour, detailed fur"
DEFAULT_TINY_MODEL = "tiny-flux-trained"
"""The CPU default (issue 18): the tiny FLUX pipeline trained on procedural shapes, whose attention is learned and
local, so the side-by-side and the PSNR of a method mean something (a random model's attention is nearly uniform). Its
quality targets are checked by tests/test_trained.py; its default steps are few, so the first command stays short."""
RANDOM_TINY_MODEL = "tiny-flux"
"""The fallback when the trained weights are not installed (the random tiny FLUX: mechanics only)."""
DEFAULT_CUDA_MODEL = "black-forest-labs/FLUX.1-dev"
"""The default model: FLUX.1-dev on a CUDA machine (gated on the Hub: accept its license and log in first),
the tiny offline FLUX pipeline elsewhere."""

DEFAULT_WARMUP = 2
"""Untimed calls of each side before the timed ones (first calls pay one-time costs, on the CPU as well; with
one warm-up call the second call of a side was still slow on a CPU, so dense-against-dense read 0.20x)."""
DEFAULT_REPEATS = 5
"""Timed calls of each side, alternating with the other side's: enough for a median whose min-max is small
(with 1 warm-up and 1 timed call, dense against dense printed 0.20x-0.25x on a CPU)."""

VIDEO_FPS = {"Wan": 16, "CogVideoX": 8, "LTX": 24, "HunyuanVideo": 24}
"""Frame rates of the video families' checkpoints, by pipeline class-name prefix (16 otherwise)."""


def default_model() -> str:
    if torch.cuda.is_available():
        return DEFAULT_CUDA_MODEL
    return DEFAULT_TINY_MODEL if is_tiny(DEFAULT_TINY_MODEL) else RANDOM_TINY_MODEL


def default_prompt(model: str | None) -> str:
    """The prompt used when none is given: the model's own (trained tiny models know only their captions)."""
    name = model or default_model()
    prompt = tiny_spec(name).prompt if is_tiny(name) else None
    return prompt or DEFAULT_PROMPT


# ----------------------------------------------------------------------------------------------- options


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON (numbers, true/false/null, lists), Python's True/False/None, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_method_params(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` to a dict; dashes in keys become underscores (``dense-steps`` = ``dense_steps``)."""
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--set expects key=value with a parameter name as key, got {item!r}")
        params[key] = parse_value(value)
    return params


@dataclass
class GenerateOptions:
    """What ``diffaccel generate`` was asked for (``None`` sizes and steps take the model's defaults)."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    prompt: str = DEFAULT_PROMPT
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    seed: int = 0
    out: Path = Path("outputs")
    dtype: str = "auto"
    device: str = "auto"
    cpu_offload: bool = False
    compare: bool = True
    warmup: int | None = None
    """Untimed calls of each run before any timed call (default :data:`DEFAULT_WARMUP`)."""
    repeats: int | None = None
    """Timed calls per run, alternating method and dense (default :data:`DEFAULT_REPEATS`); the table shows their
    medians and min-max."""
    cp: int = 1
    """Context-parallel degree: the run is one of ``cp`` torchrun ranks sharing each denoiser call (Ulysses,
    :mod:`diffaccel.multigpu`); rank 0 writes the outputs."""
    guard: float | None = None
    """Quality guard budget (relative L1 error vs dense on sampled rows; :class:`~diffaccel.methods.guard.QualityGuard`)."""


# ----------------------------------------------------------------------------------------------- sizes


def is_video_pipeline(pipe: Any) -> bool:
    return "num_frames" in inspect.signature(pipe.__call__).parameters


def _main_denoiser(pipe: Any) -> torch.nn.Module:
    return denoisers_of(pipe)[0]


PIPELINE_SIZE_MULTIPLES = {
    "StableDiffusionPipeline": 8,
    "StableDiffusionXLPipeline": 8,
    "WanPipeline": 16,
    "HunyuanVideoPipeline": 16,
    "CogVideoXPipeline": 8,
    "LTXPipeline": 32,
    "LTX2Pipeline": 32,
}
"""Multiples that these pipelines' ``check_inputs`` require of height and width whatever the VAE (diffusers 0.42)."""


def size_multiple(pipe: Any) -> tuple[int, str]:
    """The multiple height and width must be of, and why: VAE downsampling x patch size (x 2 where latents are
    packed 2x2, as FLUX does), and any multiple the pipeline itself requires (:data:`PIPELINE_SIZE_MULTIPLES`)."""
    spatial = int(
        getattr(pipe, "vae_scale_factor_spatial", None)
        or getattr(pipe, "vae_spatial_compression_ratio", None)
        or getattr(pipe, "vae_scale_factor", None)
        or 1
    )
    patch = getattr(pipe, "transformer_spatial_patch_size", None)
    if patch is None:
        patch = getattr(_main_denoiser(pipe).config, "patch_size", None) or 1
        if isinstance(patch, (list, tuple)):
            patch = patch[-1]
    pack = 2 if hasattr(pipe, "_pack_latents") else 1
    multiple = spatial * int(patch) * pack
    why = f"VAE downsampling {spatial} x patch size {patch}" + (" x 2x2 latent packing" if pack == 2 else "")
    required = PIPELINE_SIZE_MULTIPLES.get(type(pipe).__name__)
    if required is not None and math.lcm(multiple, required) != multiple:
        multiple = math.lcm(multiple, required)
        why += f", and {type(pipe).__name__} requires multiples of {required}"
    return multiple, why


def temporal_factor(pipe: Any) -> int | None:
    """The VAE's temporal compression (frames must be ``factor * k + 1``), or ``None`` for image pipelines."""
    if not is_video_pipeline(pipe):
        return None
    factor = getattr(pipe, "vae_scale_factor_temporal", None) or getattr(pipe, "vae_temporal_compression_ratio", None)
    return int(factor) if factor else 1


def check_sizes(pipe: Any, height: int | None, width: int | None, frames: int | None) -> None:
    """Raise :class:`ConfigError` for a size the pipeline would silently round or reject, before running."""
    multiple, why = size_multiple(pipe)
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < multiple or value % multiple:
            raise ConfigError(
                f"{name} must be a positive multiple of {multiple} for {type(pipe).__name__} ({why}), got {value!r}"
            )
    factor = temporal_factor(pipe)
    if frames is None:
        return
    if factor is None:
        raise ConfigError(f"--frames applies to video pipelines only; {type(pipe).__name__} makes images")
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1 or (frames - 1) % factor:
        raise ConfigError(
            f"frames must be {factor}k+1 (1, {factor + 1}, {2 * factor + 1}, ...) for {type(pipe).__name__} "
            f"(the VAE compresses {factor} frames into one), got {frames!r}"
        )


def call_kwargs(pipe: Any, model: str, opts: GenerateOptions) -> dict[str, Any]:
    """Pipeline keywords: the tiny model's defaults (if tiny), then whatever the options set."""
    kwargs: dict[str, Any] = tiny_spec(model).call_kwargs() if is_tiny(model) else {}
    for key, value in (("height", opts.height), ("width", opts.width), ("num_inference_steps", opts.steps)):
        if value is not None:
            kwargs[key] = value
    if opts.frames is not None:
        kwargs["num_frames"] = opts.frames
    return kwargs


def resolved_steps(pipe: Any, kwargs: dict[str, Any]) -> int | None:
    if "num_inference_steps" in kwargs:
        return int(kwargs["num_inference_steps"])
    default = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
    return None if default is None or default.default is inspect.Parameter.empty else int(default.default)


# ----------------------------------------------------------------------------------------------- checks


def check_output_folder(out: Path) -> Path:
    """Create ``out`` (a folder) before any work, or raise :class:`ConfigError` when it cannot be one."""
    out = Path(out)
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"--out {str(out)!r} must be a folder, but {str(parent)!r} is a file; pass a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {str(out)!r}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"--out {str(out)!r} is not writable")
    return out


def _method_config(method: Any) -> Any:
    """The config whose layer selection and dense steps decide where ``method`` runs (SoftPAG: its inner method)."""
    return getattr(getattr(method, "inner", method), "config", None)


def check_method_reaches(pipe: Any, method: Any, steps: int | None) -> None:
    """Raise :class:`ConfigError` for settings under which the method would never run on this pipeline (a silent
    dense run reported as a result): ``dense_steps >= steps``, or a layer pattern that matches no attention module."""
    cfg = _method_config(method)
    if cfg is None:
        return
    name = getattr(getattr(method, "inner", method), "name", "method")
    dense_steps = getattr(cfg, "dense_steps", None)
    if isinstance(dense_steps, int) and steps is not None and dense_steps >= steps:
        raise ConfigError(
            f"dense_steps={dense_steps} with {steps} denoising steps: {name} would never run (every step dense); "
            f"use --set dense_steps=N with N < {steps}, or more --steps"
        )
    from diffaccel.methods._locality import layer_matches

    names = sorted(n for model in denoisers_of(pipe) for n in attention_modules(model))
    patterns = [("layers", p) for p in (getattr(cfg, "layers", None) or ())]
    patterns += [("exclude_layers", p) for p in (getattr(cfg, "exclude_layers", None) or ())]
    patterns += [("layer_overrides", p) for p in (getattr(cfg, "layer_overrides", None) or {})]
    for field_name, pattern in patterns:
        if not any(layer_matches(n, pattern) for n in names):
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
            raise ConfigError(
                f"{field_name} pattern {pattern!r} matches no attention module of {type(pipe).__name__} (exact "
                f"qualified names or globs such as 'transformer_blocks.*'); modules: {shown}"
            )


def fallback_note(method: Any, output: torch.Tensor, reference: torch.Tensor | None) -> str | None:
    """"fell back to dense" when no self/joint call ran the method (its :class:`CallCounts`), or when its output
    equals dense bit for bit (a method that is not dense itself); ``None`` when the method ran."""
    counted = getattr(getattr(method, "inner", method), "call_counts", None)
    name = getattr(getattr(method, "inner", method), "name", "")
    if counted is not None and counted.method == 0 and counted.dense > 0:
        return f"fell back to dense (0 of {counted.dense} attention calls ran {name})"
    if reference is not None and name != "dense" and getattr(method, "name", "") != "softpag":
        if output.shape == reference.shape and torch.equal(output, reference):
            return "fell back to dense (output identical to dense)"
    return None


# ----------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so the clock reads when it is done (CPU work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DenoiserTimer:
    """Forward hooks that add up the time spent inside the denoisers, synchronizing at each boundary."""

    def __init__(self, pipe: Any, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self._start = 0.0
        self._handles = []
        for model in denoisers_of(pipe):
            self._handles.append(model.register_forward_pre_hook(self._before))
            self._handles.append(model.register_forward_hook(self._after))

    def _before(self, module: torch.nn.Module, args: tuple) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def _after(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def execution_device(pipe: Any) -> torch.device:
    device = getattr(pipe, "_execution_device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def run_pipeline(pipe: Any, prompt: str, kwargs: dict[str, Any], seed: int, label: str) -> tuple[torch.Tensor, Timing]:
    """One pipeline call from a CPU generator seeded with ``seed``: the first output in [0, 1] and its timing.

    Returns an image ``(C, H, W)`` or a video ``(F, C, H, W)``.
    """
    device = execution_device(pipe)
    bar = dict(getattr(pipe, "_progress_bar_config", None) or {})  # keep the caller's settings (disable, ...)
    pipe.set_progress_bar_config(**{**bar, "desc": label, "leave": False})
    generator = torch.Generator("cpu").manual_seed(seed)
    timer = DenoiserTimer(pipe, device)
    try:
        synchronize(device)
        start = time.perf_counter()
        result = pipe(prompt=prompt, generator=generator, output_type="pt", **kwargs)
        synchronize(device)
        total = time.perf_counter() - start
    finally:
        timer.close()
    output = result.frames if hasattr(result, "frames") else result.images
    if getattr(result, "audio", None) is not None:  # LTX-2: video + audio
        warn_once(f"generate-audio-{type(pipe).__name__}", f"{type(pipe).__name__} also returns audio: generate saves "
                  "and compares the video only (the audio is neither written nor in PSNR/SSIM)")
    return output[0].float().cpu(), Timing(total, timer.seconds)


# ----------------------------------------------------------------------------------------------- generate


@dataclass
class RunRecord:
    """One timed run: its label, its median timing, its fidelity against dense (``None`` for dense itself or
    without it) and every timed call (``samples``, in call order; warm-up calls are not among them)."""

    label: str
    timing: Timing
    fidelity: Fidelity | None = None
    baseline: bool = False
    samples: tuple[Timing, ...] = ()
    note: str | None = None
    """What the table must say about the run, e.g. "fell back to dense" (the method never ran)."""

    @property
    def total(self) -> Spread:
        """Median and range of the whole call's seconds."""
        return spread([t.total_s for t in self.samples or (self.timing,)])

    @property
    def denoise(self) -> Spread:
        """Median and range of the seconds inside the denoiser forwards."""
        return spread([t.denoise_s for t in self.samples or (self.timing,)])


def median_timing(samples: list[Timing] | tuple[Timing, ...]) -> Timing:
    """The medians of the total and the denoiser seconds (each taken on its own)."""
    return Timing(statistics.median(t.total_s for t in samples), statistics.median(t.denoise_s for t in samples))


@dataclass
class GenerateResult:
    model: str
    method: str
    pipeline: str
    device: str
    dtype: str
    is_video: bool
    size: tuple[int, ...]
    steps: int | None
    warmup: int
    repeats: int
    runs: list[RunRecord]
    output_path: Path
    video: WrittenVideo | None = None
    side_by_side_path: Path | None = None
    overhead: dict[str, float] | None = None
    """The method's ``overhead()`` after its last run (online methods: search/scoring seconds vs attention saved)."""
    guard: str | None = None
    """The quality guard's summary (``--guard``): layers that fell back to dense, errors, density kept, its cost."""

    @property
    def dense(self) -> RunRecord | None:
        return next((r for r in self.runs if r.baseline), None)

    @property
    def overheads_only(self) -> bool:
        """On a CPU or with a tiny random model the times are dominated by overheads, not by attention."""
        return not self.device.startswith("cuda") or is_tiny(self.model)


def _slug(text: str) -> str:
    name = text.rstrip("/\\").replace("\\", "/").split("/")[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def generate(opts: GenerateOptions) -> GenerateResult:
    """Run ``opts.method`` (and dense unless ``opts.compare`` is False), write the outputs, return the records."""
    method: AttentionMethod = get_method(opts.method, **opts.params)  # bad names and values fail before loading
    from diffaccel.methods.guard import QualityGuard

    applied = method if opts.guard is None else QualityGuard(method, opts.guard)
    model = opts.model or default_model()
    if not isinstance(opts.seed, int) or opts.seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {opts.seed!r}")
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    warmup = DEFAULT_WARMUP if opts.warmup is None else opts.warmup
    repeats = DEFAULT_REPEATS if opts.repeats is None else opts.repeats
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ConfigError(f"warmup must be a non-negative integer, got {warmup!r}")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ConfigError(f"repeats must be a positive integer, got {repeats!r}")

    out = check_output_folder(opts.out)  # before any work: a bad --out must not cost a generation

    cp = multigpu.check_degree(opts.cp)
    if cp > 1:
        check_method(method, SimpleNamespace(ring_degree=1, ulysses_degree=cp))  # before loading: a clear error
        if not multigpu.under_torchrun():
            launch = " ".join(multigpu.torchrun_command(cp, ["generate", "..."]))
            raise ConfigError(f"cp={cp} runs as {cp} torchrun processes: use `diffaccel generate --cp {cp} ...`, "
                              f"which launches them, or `{launch}`")
        device = multigpu.init(cp, device)
    pipe = load_pipeline(model, dtype=dtype, device=device, cpu_offload=opts.cpu_offload)
    if cp > 1:
        multigpu.enable(pipe, cp)
    kwargs = call_kwargs(pipe, model, opts)
    if getattr(method, "name", None) == "softpag" and float(kwargs.get("true_cfg_scale", 1.0)) > 1.0:
        # the trained tiny FLUX runs true CFG (two denoiser calls per step), which SoftPAG's guidance wrapper
        # cannot take: its own (cond - perturbed) guidance replaces it, and the change is said once
        warn_once(f"softpag-true-cfg-{model}", f"softpag on {model}: true CFG (true_cfg_scale="
                  f"{kwargs['true_cfg_scale']}) is turned off; SoftPAG guides with its own scale instead")
        kwargs["true_cfg_scale"] = 1.0
    check_sizes(pipe, kwargs.get("height"), kwargs.get("width"), kwargs.get("num_frames"))
    check_method_reaches(pipe, method, resolved_steps(pipe, kwargs))
    video = is_video_pipeline(pipe)
    from diffaccel.calibrate.driver import ensure_plan  # PARO without a plan: calibrate on the prompt, save the plan

    ensure_plan(method, pipe, model=model, model_slug=_slug(model), prompt=opts.prompt, kwargs=kwargs,
                steps=resolved_steps(pipe, kwargs), seed=opts.seed, out=opts.out)

    def call(label: str) -> tuple[torch.Tensor, Timing]:
        return run_pipeline(pipe, opts.prompt, kwargs, opts.seed, label)

    # The method first, then dense, alternating call by call; the same method object is re-applied each time,
    # so whatever it caches (plans, masks) is built in its warm-up call, as in a long-running process.
    sides = [Side(opts.method, lambda: apply(pipe, applied), call)]
    if opts.compare:
        sides.append(Side("dense", lambda: remove(pipe), call))
    try:
        timed = interleaved(sides, warmup, repeats)
    finally:
        remove(pipe)
    output = timed[0][-1][0]
    overhead_fn = getattr(method, "overhead", None)
    overhead = overhead_fn() if callable(overhead_fn) else None
    method_samples = tuple(t for _, t in timed[0])
    reference = None
    runs: list[RunRecord] = []
    if opts.compare:
        reference = timed[1][-1][0]
        dense_samples = tuple(t for _, t in timed[1])
        runs.append(RunRecord("dense", median_timing(dense_samples), baseline=True, samples=dense_samples))
    fidelity = compare(output, reference) if reference is not None else None
    note = fallback_note(method, output, reference)
    if note is not None:
        warn_once(f"generate-fallback-{opts.method}-{model}", f"{opts.method} on {model}: {note}; the speedup and "
                  "PSNR/SSIM below describe dense attention, not the method")
    runs.append(RunRecord(opts.method, median_timing(method_samples), fidelity, samples=method_samples, note=note))

    stem = out / f"{_slug(model)}_{opts.method}"
    written = None
    if not multigpu.is_main():  # one of several context-parallel ranks: rank 0 writes the outputs
        output_path = stem.with_suffix(".png")
    elif video:
        fps = next((v for k, v in VIDEO_FPS.items() if type(pipe).__name__.startswith(k)), 16)
        written = save_video(output, stem, fps=fps)
        output_path = written.path
    else:
        output_path = save_image(output, stem.with_suffix(".png"))
    sbs = None
    if reference is not None and multigpu.is_main():
        caption = None if fidelity is None else (
            f"{opts.method} vs dense: PSNR {'inf' if math.isinf(fidelity.psnr) else f'{fidelity.psnr:.2f}'} dB, "
            f"SSIM {fidelity.ssim:.4f}" + (f"; {note}" if note else ""))
        sbs = save_side_by_side(reference, output, ("dense", opts.method), f"{stem}_vs_dense.png", caption=caption)
    return GenerateResult(
        model=model,
        method=opts.method,
        pipeline=type(pipe).__name__,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        is_video=video,
        size=tuple(output.shape),
        steps=resolved_steps(pipe, kwargs),
        warmup=warmup,
        repeats=repeats,
        runs=runs,
        output_path=output_path,
        video=written,
        side_by_side_path=sbs,
        overhead=overhead,
        guard=applied.report().summary() if isinstance(applied, QualityGuard) else None,
    )


# ----------------------------------------------------------------------------------------------- report


def overhead_note(result: GenerateResult) -> str | None:
    """Why the times are overheads (CPU, tiny model, or both), or ``None`` on CUDA with a real model."""
    if not result.overheads_only:
        return None
    where = [w for w, cond in (("CPU", not result.device.startswith("cuda")), ("tiny model", is_tiny(result.model))) if cond]
    return f"{', '.join(where)}: these times measure overheads, not attention speed."


def overhead_line(result: GenerateResult) -> str | None:
    """One line with the method's overhead accounting (the ``overhead()`` contract), or None without one."""
    info = result.overhead
    if not info:
        return None
    clock = "CUDA events" if result.device.startswith("cuda") else "wall clock on the CPU"
    if "search_s" in info and "saved_s" in info:
        saved = info["saved_s"]
        if info.get("sparse_calls") and info.get("unmatched_sparse_calls") == info["sparse_calls"]:
            share = "no dense call of the same layers in this run to compare with"
        elif saved > 0:
            share = f"{100 * info['search_s'] / saved:.1f} % of the saving"
        else:
            share = "nothing saved: the sparse calls were not faster than dense here"
        return (
            f"{result.method} overhead (last run, {clock}): search/scoring {info['search_s']:.4f} s vs attention "
            f"saved {saved:.4f} s against dense on the same layers ({share})"
        )
    return f"{result.method} overhead (last run, {clock}): " + ", ".join(f"{k} {v:.4g}" for k, v in info.items())


def results_table(result: GenerateResult):
    """A rich table with one column per run and one row per measure: median latency (min-max), speedup against
    dense (ratio of medians, min-max of the per-round ratios), PSNR and SSIM against dense, and whether the method
    ran ("fell back to dense" when it never did). On a CPU or a tiny model the time rows say "overheads".

    Runs are columns so that the ranges fit 80 columns of terminal with two runs."""
    from rich.markup import escape
    from rich.table import Table

    if result.is_video:
        f, _, h, w = result.size
        size, unit = f"{f} frames of {w}x{h}", "video"
    else:
        _, h, w = result.size
        size, unit = f"{w}x{h}", "image"
    title = f"{result.model} ({result.pipeline}) | {size} | {result.steps} steps | {result.device} {result.dtype}"
    note = overhead_note(result)
    tag = " (overheads)" if note else ""
    table = Table(title=escape(title))
    table.add_column("")
    for run in result.runs:
        table.add_column(escape(run.label), justify="right")
    dense = result.dense

    def row(label: str, cell) -> None:
        table.add_row(label, *(cell(run) for run in result.runs))

    row(f"s / {unit}{tag}", lambda run: run.total.format())
    row(f"denoiser s{tag}", lambda run: run.denoise.format())
    row(f"speedup{tag}", lambda run: "-" if dense is None else _speedup(dense, run, "total_s"))
    row(f"denoiser speedup{tag}", lambda run: "-" if dense is None else _speedup(dense, run, "denoise_s"))
    row("PSNR dB", lambda run: "-" if run.fidelity is None else (
        "inf" if math.isinf(run.fidelity.psnr) else f"{run.fidelity.psnr:.2f}"))
    row("SSIM", lambda run: "-" if run.fidelity is None else f"{run.fidelity.ssim:.4f}")
    if any(run.note for run in result.runs):
        row("attention", lambda run: "[bold red]" + escape(run.note) + "[/]" if run.note else (
            "stock" if run.baseline else "ran"))
    sync = "CUDA synchronized before each clock read" if result.device.startswith("cuda") else "on the CPU"
    if result.repeats == 1:
        calls = "one pipeline call per run"
    else:
        calls = f"median (min-max) of {result.repeats} pipeline calls per run"
        if dense is not None:
            calls += ", method and dense alternating call by call"
    speedups = "speedup: ratio of the medians (min-max of the per-round ratios); " if result.repeats > 1 else ""
    table.caption = escape(
        (f"{note} " if note else "")
        + f"Timed: {calls}, after {result.warmup} untimed warm-up call(s) of each, {sync}. "
        f"s / {unit}: the whole call (text encoding, denoising, VAE decode); denoiser s: time inside the "
        f"denoiser forwards. dense = stock diffusers processors (PyTorch SDPA), same seed; {speedups}speedups and "
        "PSNR/SSIM are against it."
    )
    return table


def _speedup(dense: RunRecord, run: RunRecord, field: str) -> str:
    """``dense / run`` as ``1.02x (0.98-1.05x)`` from the paired samples, or ``-`` without a positive time."""
    reference = [getattr(t, field) for t in dense.samples or (dense.timing,)]
    values = [getattr(t, field) for t in run.samples or (run.timing,)]
    if len(reference) != len(values):  # records built by hand: ratio of the medians only
        ratio = paired_ratio([statistics.median(reference)], [statistics.median(values)])
    else:
        ratio = paired_ratio(reference, values)
    return "-" if ratio is None else ratio.format(".2f", "x")
