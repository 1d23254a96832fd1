"""The demo's engine: one prompt and seed through two attention sides, timed, compared, with the kept masks.

A side is ``dense`` (the pipeline's stock diffusers processors, PyTorch SDPA, as ``diffaccel generate``'s
baseline) or any registered method with its parameters. :class:`Comparer` keeps

* a bounded LRU of loaded pipelines (:class:`PipelineCache`): a model is loaded once; sides switch with
  :func:`diffaccel.apply` / :func:`diffaccel.remove` on the same pipeline, never by reloading;
* a bounded LRU of side results keyed by everything that determines them (model, device, dtype, prompt, seed,
  call keywords, method, parameters, warm-up and repeats): when only the method side (B) changed, side A (the
  dense side by default) is reused and only B runs.

Timings follow :mod:`diffaccel.eval.timing`: untimed warm-up calls, then timed calls alternating A, B, A, B, ...;
the speedup is the ratio of the medians, with the min-max of the per-round ratios when both sides ran together.
Nothing here imports gradio; :mod:`diffaccel.demo.ui` wraps it.
"""

from __future__ import annotations

import collections
import json
import math
import statistics
import tempfile
import threading
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from diffaccel.errors import ConfigError
from diffaccel.eval.fidelity import Fidelity, compare
from diffaccel.eval.media import WrittenVideo, to_uint8
from diffaccel.eval.timing import Side, Spread, Timing, interleaved, paired_ratio
from diffaccel.methods.base import get_method
from diffaccel.pipelines.hooks import apply, attention_modules, denoisers_of, remove
from diffaccel.pipelines.loading import load_pipeline, resolve_device, resolve_dtype
from diffaccel.pipelines.tiny import is_tiny, tiny_spec
from diffaccel.run import VIDEO_FPS, check_sizes, is_video_pipeline, resolved_steps, run_pipeline
from diffaccel.demo.visuals import difference_map, frame_psnr, side_by_side_clip

DENSE = "dense"
"""The side name that runs the stock processors (no diffaccel processor installed)."""

DEFAULT_MAX_PIPELINES = 1
"""Pipelines kept loaded at once: one, as a real model fills a GPU; tiny models reload in seconds."""
DEFAULT_MAX_SIDES = 16
"""Side results kept for reuse (outputs, timings, masks: small next to a pipeline)."""

Progress = Callable[[float, str], None]


# ----------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class SideRequest:
    """One side: a registered method name (``dense`` = stock processors) and its parameters (method keywords)."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.params:
            return self.method
        inner = ", ".join(f"{k}={v!r}" for k, v in sorted(self.params.items()))
        return f"{self.method} ({inner})"


@dataclass(frozen=True)
class CompareRequest:
    """What a user asked for: the model, the prompt, the sizes (``None``: the model's defaults), two sides."""

    model: str
    prompt: str
    a: SideRequest = SideRequest(DENSE)
    b: SideRequest = SideRequest("gna")
    seed: int = 0
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    warmup: int = 1
    """Untimed calls of each side before the timed ones (first calls pay plan building and kernel compiles)."""
    repeats: int = 1
    """Timed calls of each side, alternating."""


def _check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_request(req: CompareRequest) -> None:
    """Raise :class:`ConfigError` for input that needs no model to be rejected (before anything loads)."""
    if not isinstance(req.model, str) or not req.model.strip():
        raise ConfigError("model must be a tiny pipeline name, a Hub id or a folder, got an empty value")
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise ConfigError("prompt must not be empty: type what the image should show")
    _check_int("seed", req.seed, 0)
    _check_int("steps", req.steps, 1, optional=True)
    _check_int("height", req.height, 1, optional=True)
    _check_int("width", req.width, 1, optional=True)
    _check_int("frames", req.frames, 1, optional=True)
    _check_int("warmup", req.warmup, 0)
    _check_int("repeats", req.repeats, 1)


# ----------------------------------------------------------------------------------------------- results


@dataclass
class SideResult:
    """One side's output (float ``(C, H, W)`` or ``(F, C, H, W)`` on the CPU), its timed calls, and the kept
    key blocks of every layer whose most recent call ran on a block mask (``{layer: (heads, qb, kb) bool}``)."""

    request: SideRequest
    output: torch.Tensor
    samples: tuple[Timing, ...]
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    overhead: dict[str, float] | None = None
    reused: bool = False

    @property
    def total_s(self) -> float:
        return statistics.median(t.total_s for t in self.samples)

    @property
    def denoise_s(self) -> float:
        return statistics.median(t.denoise_s for t in self.samples)

    def spread(self, attr: str = "total_s") -> Spread:
        values = [getattr(t, attr) for t in self.samples]
        return Spread(statistics.median(values), min(values), max(values), len(values))


@dataclass
class CompareResult:
    """Everything the page shows for one request."""

    request: CompareRequest
    pipeline: str
    device: str
    dtype: str
    is_video: bool
    steps: int | None
    a: SideResult
    b: SideResult
    speedup: Spread | None
    denoise_speedup: Spread | None
    fidelity: Fidelity
    heat_map: np.ndarray
    """``(H, W)`` mean absolute difference (channels, and frames for videos)."""
    heat_peak: float
    frame_psnr: list[float] | None = None
    clip: WrittenVideo | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def overheads_only(self) -> bool:
        """On a CPU or a tiny random model the times measure overheads, not attention speed."""
        return not self.device.startswith("cuda") or is_tiny(self.request.model)

    def image(self, side: str) -> np.ndarray:
        """Side ``"a"``/``"b"``'s output as uint8 ``(H, W, 3)`` (a video: its first frame)."""
        out = (self.a if side == "a" else self.b).output
        arr = to_uint8(out[0] if out.ndim == 4 else out)
        return np.repeat(arr, 3, -1) if arr.shape[-1] == 1 else arr


# ----------------------------------------------------------------------------------------------- caches


class LRU:
    """A small thread-safe least-recently-used map with a fixed capacity."""

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ConfigError(f"cache capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self._items: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def pop_oldest(self) -> Any | None:
        """Remove and return the least recently used value (None when empty)."""
        with self._lock:
            return self._items.popitem(last=False)[1] if self._items else None

    def keys(self) -> list[Any]:
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        return len(self._items)


class PipelineCache:
    """Loaded pipelines by (model, device, dtype), at most ``capacity`` at once (the oldest is dropped)."""

    def __init__(self, capacity: int = DEFAULT_MAX_PIPELINES, loader: Callable[..., Any] = load_pipeline) -> None:
        self._lru = LRU(capacity)
        self._loader = loader
        self.loads = 0
        """How many times a pipeline was loaded (tests check that switching methods does not reload)."""

    def get(self, model: str, device: torch.device, dtype: torch.dtype) -> Any:
        key = (model.strip(), str(device), str(dtype))
        pipe = self._lru.get(key)
        if pipe is None:
            if len(self._lru) >= self._lru.capacity:  # free the old one's memory before loading the next
                self._lru.pop_oldest()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            pipe = self._loader(key[0], dtype=dtype, device=device)
            # Bars on: gr.Progress(track_tqdm=True) follows the denoising loop's tqdm bar.
            config = dict(getattr(pipe, "_progress_bar_config", None) or {})
            pipe.set_progress_bar_config(**{**config, "disable": False})
            self.loads += 1
            self._lru.put(key, pipe)
        return pipe

    def models(self) -> list[str]:
        return [k[0] for k in self._lru.keys()]


# ----------------------------------------------------------------------------------------------- running


def call_kwargs(model: str, req: CompareRequest) -> dict[str, Any]:
    """Pipeline keywords: the tiny model's defaults (if tiny), then the request's sizes and steps."""
    kwargs: dict[str, Any] = tiny_spec(model).call_kwargs() if is_tiny(model) else {}
    for key, value in (("height", req.height), ("width", req.width), ("num_inference_steps", req.steps),
                       ("num_frames", req.frames)):
        if value is not None:
            kwargs[key] = value
    return kwargs


def layer_names(pipe: Any) -> list[str]:
    """Qualified names of every attention module of the pipeline's denoisers (the ``ctx.layer`` names)."""
    names: list[str] = []
    for model in denoisers_of(pipe):
        names.extend(n for n in attention_modules(model) if n not in names)
    return names


def kept_masks(method: Any, layers: list[str]) -> dict[str, np.ndarray]:
    """``{layer: (heads, q_blocks, kv_blocks) bool}`` from ``method.kept_blocks`` (layers with a mask only)."""
    getter = getattr(method, "kept_blocks", None)
    if method is None or not callable(getter):
        return {}
    masks = {}
    for layer in layers:
        keep = getter(layer)
        if keep is None:
            continue
        keep = torch.as_tensor(keep).detach().to("cpu", torch.bool)
        if keep.ndim == 2:
            keep = keep[None]
        if keep.ndim != 3:
            raise ValueError(f"{type(method).__name__}.kept_blocks({layer!r}) must be (heads, q_blocks, kv_blocks), "
                             f"got shape {tuple(keep.shape)}")
        masks[layer] = keep.numpy()
    return masks


def _ratio(a: SideResult, b: SideResult, attr: str, paired: bool) -> Spread | None:
    """How many times faster B is than A: paired per-round ratios when they ran together, else the medians'."""
    ref = [getattr(t, attr) for t in a.samples]
    val = [getattr(t, attr) for t in b.samples]
    if paired and len(ref) == len(val):
        return paired_ratio(ref, val)
    return paired_ratio([statistics.median(ref)], [statistics.median(val)])


class Comparer:
    """Runs :class:`CompareRequest` s on cached pipelines (one at a time: a lock guards the device)."""

    def __init__(
        self,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_pipelines: int = DEFAULT_MAX_PIPELINES,
        max_sides: int = DEFAULT_MAX_SIDES,
        out_dir: str | Path | None = None,
        loader: Callable[..., Any] = load_pipeline,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.pipelines = PipelineCache(max_pipelines, loader)
        self.sides = LRU(max_sides)
        self.out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="diffaccel-demo-"))
        self._lock = threading.Lock()
        self.runs = 0
        """Pipeline calls made (warm-up and timed), for tests of side reuse."""

    def _key(self, req: CompareRequest, kwargs: dict[str, Any], side: SideRequest) -> str:
        return json.dumps(
            [req.model.strip(), str(self.device), str(self.dtype), req.prompt, req.seed, kwargs, side.method,
             side.params, req.warmup, req.repeats],
            sort_keys=True, default=repr,
        )

    def run(self, req: CompareRequest, progress: Progress | None = None) -> CompareResult:
        """Run (or reuse) both sides of ``req`` and compare them; :class:`~diffaccel.errors.DiffAccelError` for
        bad input (the pipelines are left with their stock processors either way)."""
        check_request(req)
        methods = {}
        for name, side in (("A", req.a), ("B", req.b)):
            if not isinstance(side.method, str) or not side.method:
                raise ConfigError(f"side {name}: choose a method")
            # Bad names and parameter values fail here, before a model loads.
            method = get_method(side.method, **side.params)
            methods[name] = None if side.method == DENSE else method  # dense: the stock processors
        with self._lock:
            return self._run(req, methods, progress or (lambda frac, desc: None))

    def _run(self, req: CompareRequest, methods: dict[str, Any], progress: Progress) -> CompareResult:
        model = req.model.strip()
        progress(0.0, f"loading {model}")
        pipe = self.pipelines.get(model, self.device, self.dtype)
        kwargs = call_kwargs(model, req)
        check_sizes(pipe, kwargs.get("height"), kwargs.get("width"), kwargs.get("num_frames"))
        video = is_video_pipeline(pipe)
        key_a, key_b = self._key(req, kwargs, req.a), self._key(req, kwargs, req.b)
        cached_a: SideResult | None = self.sides.get(key_a)
        notes: list[str] = []

        todo = [("B", req.b)] if cached_a is not None else [("A", req.a), ("B", req.b)]
        total_calls = len(todo) * (req.warmup + req.repeats)
        done = [0]

        def make_call(label: str) -> Callable[[str], tuple[torch.Tensor, Timing]]:
            def call(desc: str) -> tuple[torch.Tensor, Timing]:
                progress(done[0] / total_calls, f"{desc}")
                out = run_pipeline(pipe, req.prompt, kwargs, req.seed, desc)
                done[0] += 1
                self.runs += 1
                return out
            return call

        def activate(name: str) -> Callable[[], None]:
            method = methods[name]
            return (lambda: remove(pipe)) if method is None else (lambda: apply(pipe, method))

        sides = [Side(f"{name}: {side.label}", activate(name), make_call(name)) for name, side in todo]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                timed = interleaved(sides, req.warmup, req.repeats)
            finally:
                remove(pipe)
        for w in caught:
            text = " ".join(str(w.message).split())
            if text not in notes and not text.startswith("`"):
                notes.append(text)

        layers = layer_names(pipe)
        results: dict[str, SideResult] = {}
        for (name, side), runs in zip(todo, timed):
            method = methods[name]
            overhead = getattr(method, "overhead", None)
            results[name] = SideResult(
                side, runs[-1][0], tuple(t for _, t in runs), kept_masks(method, layers),
                overhead() if callable(overhead) else None,
            )
        if cached_a is not None:
            results["A"] = SideResult(cached_a.request, cached_a.output, cached_a.samples, cached_a.masks,
                                      cached_a.overhead, reused=True)
            notes.insert(0, "side A reused from an earlier run with the same model, prompt, seed and settings "
                            "(only side B ran; the speedup is the ratio of the medians, not interleaved)")
        else:
            self.sides.put(key_a, results["A"])
        self.sides.put(key_b, results["B"])
        a, b = results["A"], results["B"]
        paired = cached_a is None
        fid = _fidelity(b.output, a.output)
        heat, peak = difference_map(a.output, b.output)
        clip = psnrs = None
        if video:
            psnrs = frame_psnr(a.output, b.output)
            fps = next((v for k, v in VIDEO_FPS.items() if type(pipe).__name__.startswith(k)), 16)
            clip = side_by_side_clip(a.output, b.output, (f"A: {req.a.method}", f"B: {req.b.method}"),
                                     self.out_dir / f"clip-{uuid.uuid4().hex[:10]}", fps=fps)
            if clip.note:
                notes.append(f"clip written as GIF: {clip.note}")
        progress(1.0, "done")
        return CompareResult(
            request=req, pipeline=type(pipe).__name__, device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""), is_video=video, steps=resolved_steps(pipe, kwargs),
            a=a, b=b, speedup=_ratio(a, b, "total_s", paired), denoise_speedup=_ratio(a, b, "denoise_s", paired),
            fidelity=fid, heat_map=heat, heat_peak=peak, frame_psnr=psnrs, clip=clip, notes=notes,
        )


def _fidelity(output: torch.Tensor, reference: torch.Tensor) -> Fidelity:
    """PSNR and SSIM of B against A (SSIM ``nan`` for outputs smaller than its 11-pixel window)."""
    try:
        return compare(output, reference)
    except ValueError:
        from diffaccel.eval.fidelity import psnr

        return Fidelity(psnr(output, reference), math.nan)


__all__ = [
    "DENSE",
    "CompareRequest",
    "CompareResult",
    "Comparer",
    "LRU",
    "PipelineCache",
    "SideRequest",
    "SideResult",
    "call_kwargs",
    "check_request",
    "kept_masks",
    "layer_names",
]
