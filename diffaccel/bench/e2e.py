"""End-to-end benchmark: one denoising step of a full-size denoiser (random weights) per attention method.

``diffaccel bench e2e --model-config wan21-1.3b`` builds the denoiser from its real configuration
(:mod:`diffaccel.bench.model_configs`) on the device in the target dtype, draws random inputs of the pipeline's
shapes, and times one denoising step (one or two denoiser calls, as the pipeline's guidance does) with the stock
diffusers processors (``stock``: PyTorch SDPA, the baseline of every speedup) and with each method installed by
:func:`diffaccel.apply`.

Protocol (BENCHMARKS.md, "End-to-end"): every method first runs ``warmup`` untimed steps (compilation,
autotuning, and the plans of static methods, which are built at a layer's first call and cached); then
``rounds`` timed rounds, each running every method once in an order rotated by one per round, so drift in machine
speed favours none; the speedup is the ratio of medians, with the min-max of the per-round ratios. Dynamic
methods search inside the timed step (their search is part of their call). The methods see step ``step`` of
``num_steps`` (default: the middle of the pipeline's default schedule), so dense warm-up steps are not what is
timed. After the timed rounds one instrumented step per method splits the step into attention (every attention
module call: projections, norms, RoPE, output projection included), the method call inside it (q, k, v to
output; diffaccel methods only) and the rest; the instrumentation is kept out of the timed rounds. On CUDA times
are CUDA events, peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (weights included);
on the CPU times are wall clock and say nothing about GPU speed.

A method that cannot run on the model (a :class:`~diffaccel.errors.DiffAccelError` while installing or warming
up: a family it does not support, a parameter it rejects) becomes a ``refused`` row with the reason; any other
failure an ``error`` row, out-of-memory an ``oom`` row: the run goes on. A SIGTERM (the campaign's per-stage
``timeout``) ends the measurement where it is: the rounds finished so far are reported, rows never timed are
``interrupted``, and ``meta.interrupted`` says so, so a stage cut short still leaves its results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import statistics
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from diffaccel.bench.e2e_timing import AttentionTimer, TimedMethod, time_call
from diffaccel.bench.model_configs import Geometry, ModelConfig, geometry, model_config
from diffaccel.errors import ConfigError, DiffAccelError

__all__ = ["BASELINE", "E2EConfig", "run_e2e", "resolve_methods"]

BASELINE = "stock"
"""The row of the stock diffusers processors (PyTorch SDPA): the baseline of every speedup."""

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class E2EConfig:
    """What ``diffaccel bench e2e`` runs (see the module docstring)."""

    model_config: str = "flux-dev"
    scale: str = "full"
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    methods: tuple[str, ...] | None = None
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    backend: str | None = None
    dtype: str = "auto"
    device: str | None = None
    rounds: int = 3
    warmup: int = 1
    step: int | None = None
    num_steps: int | None = None
    seed: int = 0
    progress: bool = True
    command: str = ""

    def validate(self) -> None:
        for label, value, low in (("--steps-timed", self.rounds, 1), ("--warmup", self.warmup, 0)):
            if value < low:
                raise ConfigError(f"{label} must be >= {low}, got {value}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.backend is not None and self.backend not in ("auto", "triton", "reference"):
            raise ConfigError(f"--backend must be auto, triton or reference, got {self.backend!r}")


def resolve_methods(methods: Sequence[str] | None) -> list[str]:
    """The method rows: the stock baseline first, then ``methods`` (default: every registered method)."""
    from diffaccel.methods import list_methods

    known = list_methods()
    chosen = list(known) if not methods else [m for m in methods if m != BASELINE]
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise ConfigError(
            f"--methods: unknown method(s) {', '.join(map(repr, unknown))}; registered: {', '.join(known)} "
            f"(and {BASELINE!r}, always run as the baseline)"
        )
    return [BASELINE, *dict.fromkeys(chosen)]


def _resolve_device(device: str | None) -> str:
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r}: no CUDA device is available; use cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


class Interrupted(BaseException):
    """A SIGTERM arrived during the measurement (a BaseException: no row's error handler swallows it)."""


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into :class:`Interrupted` while measuring (main thread only; the previous handler restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signum} (SIGTERM) during the measurement")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class _Entry:
    """One row being measured."""

    name: str
    processor: Any = None  # DiffAccelAttnProcessor, None for the stock baseline
    params: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    peak: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def fail(self, exc: BaseException) -> None:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            self.status, self.reason = "oom", first
        elif isinstance(exc, DiffAccelError):
            self.status, self.reason = "refused", first
        else:
            self.status, self.reason = "error", f"{type(exc).__name__}: {first}"


def _method_entry(name: str, cfg: E2EConfig) -> _Entry:
    """The processor of method ``name`` with its parameters, or a refused row (a guidance method, a bad value)."""
    from diffaccel.methods.base import method_class, method_parameters
    from diffaccel.pipelines.processor import DiffAccelAttnProcessor

    params = dict(cfg.method_params.get(name, {}))
    entry = _Entry(name, params=params)
    cls = method_class(name)
    if getattr(cls, "wraps_denoiser", False):
        entry.status = "refused"
        entry.reason = (
            "wraps the denoiser call (guidance: extra denoiser rows per step), so one denoiser call is not its step; "
            "time it with `diffaccel generate`"
        )
        return entry
    if cfg.backend is not None and "backend" not in params and any(p[0] == "backend" for p in method_parameters(name)):
        params["backend"] = cfg.backend
    try:
        entry.processor = DiffAccelAttnProcessor(name, **params)
    except (DiffAccelError, TypeError) as exc:
        entry.fail(exc if isinstance(exc, DiffAccelError) else ConfigError(str(exc)))
    return entry


class _Bench:
    """The model, its inputs and the install/step operations shared by every phase."""

    def __init__(self, cfg: E2EConfig, mc: ModelConfig, geo: Geometry, device: str, dtype: torch.dtype) -> None:
        from diffaccel.bench.e2e_inputs import build_denoiser, denoiser_inputs
        from diffaccel.pipelines.hooks import attention_modules

        self.cfg, self.mc, self.geo, self.device = cfg, mc, geo, device
        self.cuda = device.startswith("cuda")
        self.model = build_denoiser(mc, scale=cfg.scale, dtype=dtype, device=device, seed=cfg.seed)
        self.inputs = denoiser_inputs(mc, self.model, geo, batch=mc.batch(), dtype=dtype, device=device, seed=cfg.seed)
        self.modules = attention_modules(self.model)
        self.calls = mc.calls_per_step()
        self.num_steps = cfg.num_steps or mc.num_steps
        self.step_index = cfg.step if cfg.step is not None else self.num_steps // 2
        if not 0 <= self.step_index < self.num_steps:
            raise ConfigError(f"--step must be in [0, {self.num_steps}) (--num-steps {self.num_steps}), got {self.step_index}")

    def install(self, entry: _Entry) -> None:
        import diffaccel

        if entry.processor is None:
            diffaccel.remove(self.model)
            return
        diffaccel.apply(self.model, entry.processor)
        ctx = entry.processor.context
        step, total = self.step_index, self.num_steps
        ctx.step_fn = lambda: step  # the scheduler's step_index, as a pipeline run would report it
        ctx.num_steps_fn = lambda: total

    def step(self) -> None:
        for _ in range(self.calls):
            self.model(**self.inputs, return_dict=False)


def _guarded(entry: _Entry, run: Callable[[], Any]) -> Any:
    """``run()``, its diffaccel warnings recorded on ``entry``; a failure marks the row instead of raising."""
    from diffaccel.warn import DiffAccelWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DiffAccelWarning)
        try:
            return run()
        except Exception as exc:  # noqa: BLE001 - every failure becomes the row's status, never a crash
            entry.fail(exc)
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            return None
        finally:
            for w in caught:
                text = str(w.message).splitlines()[0]
                if issubclass(w.category, DiffAccelWarning) and text not in entry.warnings:
                    entry.warnings.append(text)


def _density(method: Any, layers: Sequence[str]) -> tuple[float | None, int]:
    """Mean fraction of key blocks kept over the layers whose mask the method reports (``kept_blocks``)."""
    kept_blocks = getattr(method, "kept_blocks", None)
    if kept_blocks is None:
        return None, 0
    values = []
    for layer in layers:
        mask = kept_blocks(layer)
        if mask is not None:
            values.append(float(mask.float().mean()))
    return (statistics.fmean(values) if values else None), len(values)


def _overhead(method: Any) -> dict[str, float] | None:
    report = getattr(method, "overhead", None)
    return report() if callable(report) else None


def _progress(total: int, enabled: bool) -> Any:
    from diffaccel.bench.measure import progress_bar

    return progress_bar(total, enabled)


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers' one-line warnings about casting while building are noise here."""
    try:
        from diffusers.utils import logging as dlogging
    except ImportError:  # pragma: no cover - diffusers is a dependency
        yield
        return
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def run_e2e(cfg: E2EConfig) -> dict:
    """Measure every method on ``cfg``'s model; the result document (``kind`` ``e2e``)."""
    from diffaccel.bench.report import environment, package_version

    cfg.validate()
    mc = model_config(cfg.model_config)
    geo = geometry(mc, scale=cfg.scale, height=cfg.height, width=cfg.width, frames=cfg.frames)
    names = resolve_methods(cfg.methods)
    unknown_params = sorted(set(cfg.method_params) - set(names))
    if unknown_params:
        raise ConfigError(f"--set names method(s) {', '.join(unknown_params)} that are not in --methods {','.join(names)}")
    device = _resolve_device(cfg.device)
    dtype_name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = DTYPES[dtype_name]

    print(f"e2e: building {mc.name} ({cfg.scale}) on {device} in {dtype_name}...", file=sys.stderr, flush=True)
    with _quiet_diffusers(), torch.inference_mode():
        bench = _Bench(cfg, mc, geo, device, dtype)
        entries = [_Entry(BASELINE)] + [_method_entry(n, cfg) for n in names[1:]]
        layers = list(bench.modules)
        bar = _progress(len(entries) * (cfg.warmup + cfg.rounds + 1), cfg.progress)

        def each(entry: _Entry, run: Callable[[], Any]) -> Any:
            bar.update(1)
            if not entry.ok:
                return None
            return _guarded(entry, lambda: (bench.install(entry), run())[1])

        measured: dict[str, dict[str, Any]] = {}
        interrupted = None
        timer: AttentionTimer | None = None
        try:
            with _sigterm_interrupts():
                for entry in entries:  # warm-up: compilation, autotuning, static plans (--warmup 0: in the timed steps)
                    for _ in range(cfg.warmup):
                        each(entry, bench.step)
                for r in range(cfg.rounds):
                    shift = r % len(entries)
                    for entry in entries[shift:] + entries[:shift]:

                        def timed(entry: _Entry = entry) -> None:
                            if bench.cuda:
                                torch.cuda.reset_peak_memory_stats(device)
                            entry.times.append(time_call(bench.step, bench.cuda))
                            if bench.cuda:
                                entry.peak = max(entry.peak or 0, torch.cuda.max_memory_allocated(device))

                        each(entry, timed)
                timer = AttentionTimer(bench.modules, bench.cuda)
                for entry in entries:
                    measured[entry.name] = _breakdown(bench, entry, timer, layers, each)
        except Interrupted as exc:
            interrupted = str(exc)
            print(f"e2e: {interrupted}; reporting what was measured", file=sys.stderr, flush=True)
        finally:
            if timer is not None:
                timer.remove()
        for entry in entries:
            if entry.ok and not entry.times:
                entry.status, entry.reason = "interrupted", interrupted or "not measured"
        rows = [_row(entry, measured.get(entry.name, {})) for entry in entries]
        bar.close()
        import diffaccel

        diffaccel.remove(bench.model)

    _speedups(rows)
    meta = environment(device, False, cfg.command)
    for key in ("flex", "error_reference"):
        meta.pop(key, None)
    meta.update(
        interrupted=interrupted,
        diffusers=package_version("diffusers"),
        transformers=package_version("transformers"),
        timer="CUDA events (ms)" if bench.cuda else "time.perf_counter wall clock (ms): CPU, overheads only",
    )
    params = sum(p.numel() for p in bench.model.parameters())
    config = dataclasses.asdict(cfg)
    config.update(methods=names, dtype=dtype_name, device=device, step=bench.step_index, num_steps=bench.num_steps)
    return {
        "kind": "e2e",
        "meta": meta,
        "config": config,
        "model": {
            "name": mc.name, "family": mc.family, "class": mc.model_class, "source": mc.source, "scale": cfg.scale,
            "constructor": mc.constructor_kwargs(cfg.scale), "parameters": params, "geometry": geo.to_dict(),
            "cfg": mc.cfg, "batch": mc.batch(), "calls_per_step": mc.calls_per_step(),
            "attention_modules": len(layers), "weights": "random normal, std 0.02",
        },  # fmt: skip
        "rows": rows,
    }


def _breakdown(bench: _Bench, entry: _Entry, timer: AttentionTimer, layers: list[str], each: Callable) -> dict:
    """One instrumented step of ``entry``: attention / method call time, density, overhead (empty on failure)."""
    measured: dict[str, Any] = {}

    def instrumented() -> None:
        processor = entry.processor
        method = None if processor is None else processor.method
        if processor is not None:
            processor.method = TimedMethod(method, timer.method)
        timer.reset()
        try:
            measured["step"] = time_call(bench.step, bench.cuda)
        finally:
            if processor is not None:
                processor.method = method
        measured["attention"] = timer.attention.total_ms()
        measured["calls"] = timer.attention.count
        measured["method"] = timer.method.total_ms() if processor is not None else None
        if method is not None:
            measured["density"], measured["density_layers"] = _density(method, layers)
            measured["overhead"] = _overhead(method)

    each(entry, instrumented)
    return measured if entry.ok else {}


def _row(entry: _Entry, measured: dict[str, Any]) -> dict:
    """The report row of ``entry`` from its timed rounds and (when it ran) its instrumented step."""
    times = entry.times
    row: dict[str, Any] = {
        "method": entry.name,
        "params": entry.params,
        "status": entry.status,
        "reason": entry.reason,
        "warnings": entry.warnings,
        "step_ms": statistics.median(times) if entry.ok and times else None,
        "step_ms_min": min(times) if entry.ok and times else None,
        "step_ms_max": max(times) if entry.ok and times else None,
        "step_ms_all": times if entry.ok else [],
        "peak_memory_gib": None if entry.peak is None else entry.peak / 2**30,
        "attention_ms": None,
        "method_ms": None,
        "rest_ms": None,
        "breakdown_step_ms": None,
        "attention_calls": None,
        "density_kept": None,
        "density_layers": 0,
        "overhead": None,
    }
    if entry.ok and measured:
        row.update(
            breakdown_step_ms=measured["step"],
            attention_ms=measured["attention"],
            method_ms=measured.get("method"),
            rest_ms=measured["step"] - measured["attention"],
            attention_calls=measured["calls"],
            density_kept=measured.get("density"),
            density_layers=measured.get("density_layers", 0),
            overhead=measured.get("overhead"),
        )
    return row


def _speedups(rows: list[dict]) -> None:
    """``speedup``: stock median / method median, with the min-max of the per-round ratios."""
    base = next(r for r in rows if r["method"] == BASELINE)
    for row in rows:
        row["speedup"] = row["speedup_min"] = row["speedup_max"] = None
        if row["step_ms"] is None or base["step_ms"] is None:
            continue
        row["speedup"] = base["step_ms"] / row["step_ms"]
        ratios = [b / t for b, t in zip(base["step_ms_all"], row["step_ms_all"], strict=False) if t > 0]
        if ratios:
            row["speedup_min"], row["speedup_max"] = min(ratios), max(ratios)
