"""The generation loop of ``diffaccel eval``: every method on the same prompts and seeds as dense, per-sample
timings and per-sample metrics, split across processes with accelerate.

Order: on each process, ``warmup`` untimed calls of every side on its first sample (one-time costs: kernel
compilation, plan and mask caches, allocator), then sample by sample dense first (kept as the reference), then the
methods in an order rotated by the sample index, so that neither a drift of the machine's speed nor the position
after dense favours one method. The baseline "dense" is the pipeline with its stock diffusers processors, as in
``diffaccel generate``. Every call starts from a CPU generator seeded with the sample's seed, so a sample's dense
output is the same on any process and in any run.

Timings per call: the whole pipeline call, the denoiser forwards and the attention modules' forwards (forward
hooks; each attention module call includes its projections, norms and RoPE). On CUDA each interval is a pair of
CUDA events read after the call (:class:`diffaccel.bench.e2e_timing.Interval`); on the CPU wall clock.

Multi-process (``accelerate launch --num_processes N``): ``PartialState.split_between_processes`` gives each
process a contiguous share of the samples; each process writes its samples' files under ``--out`` (a folder all
processes see) and its per-sample records are gathered on the main process (``gather_object``), which writes the
report. The records depend on the sample only, so N processes give the report of one process (timings aside).
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffaccel.bench.e2e_timing import Interval
from diffaccel.errors import ConfigError
from diffaccel.eval.media import save_image, save_side_by_side, save_video
from diffaccel.eval.metrics import Skipped, build_clip_score, build_lpips, cosine, psnr_ssim, relative_l1
from diffaccel.eval.video_metrics import build_features, consistency, motion_smoothness_proxy, temporal_flickering
from diffaccel.methods.base import get_method
from diffaccel.pipelines.hooks import apply, attention_modules, denoisers_of, remove

BASELINE = "dense"
"""Label of the reference: the stock diffusers processors (PyTorch SDPA)."""


@dataclass(frozen=True)
class MethodSpec:
    """One column of the evaluation: a label, a registered method and its parameters."""

    label: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    """One prompt and seed; ``index`` orders the samples (prompt-major, then seed)."""

    index: int
    prompt: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.index:04d}_seed{self.seed}"


@dataclass
class EvalOptions:
    """What ``diffaccel eval`` was asked for (``None`` sizes and steps take the model's defaults)."""

    model: str | None = None
    methods: list[MethodSpec] = field(default_factory=list)
    prompts: str = "coco"
    num: int | None = 4
    seeds: list[int] = field(default_factory=lambda: [0])
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    steps: int | None = None
    out: Path = Path("eval")
    reference_dir: Path | None = None
    fid_weights: Path | None = None
    clip_model: str | None = None
    lpips_weights: Path | None = None
    dino_model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    warmup: int = 1
    grids: int = 2
    """Samples per method drawn beside dense (with the difference heat map) under ``grids/``."""
    config: str | None = None
    command: list[str] = field(default_factory=list)


def samples_of(prompts: list[str], seeds: list[int]) -> list[Sample]:
    """Every prompt with every seed, prompt-major."""
    return [Sample(i * len(seeds) + j, p, s) for i, p in enumerate(prompts) for j, s in enumerate(seeds)]


def side_order(labels: list[str], index: int) -> list[str]:
    """Dense first, then the other labels rotated by ``index`` (each method takes each position in turn)."""
    others = [label for label in labels if label != BASELINE]
    if not others:
        return [BASELINE]
    k = index % len(others)
    return [BASELINE, *others[k:], *others[:k]]


# ----------------------------------------------------------------------------------------------- one call


class CallTimer:
    """Forward hooks timing the denoiser forwards and the attention modules' forwards of one pipeline call."""

    def __init__(self, pipe: Any, cuda: bool) -> None:
        self.cuda = cuda
        self.denoiser = Interval(cuda)
        self.attention = Interval(cuda)
        self._handles: list[Any] = []
        for model in denoisers_of(pipe):
            self._hook(model, self.denoiser)
            for module in attention_modules(model).values():
                self._hook(module, self.attention)

    def _hook(self, module: torch.nn.Module, interval: Interval) -> None:
        self._handles.append(module.register_forward_pre_hook(lambda *_: interval.start()))
        self._handles.append(module.register_forward_hook(lambda *_: interval.stop()))

    def reset(self) -> None:
        self.denoiser.reset()
        self.attention.reset()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass
class CallResult:
    output: torch.Tensor
    latents: torch.Tensor | None
    total_s: float
    denoise_s: float
    attention_s: float


def call_pipeline(pipe: Any, kwargs: dict[str, Any], sample: Sample, timer: CallTimer) -> CallResult:
    """One call of ``pipe`` for ``sample``: the first output in [0, 1] (image ``(C, H, W)`` or video
    ``(F, C, H, W)``), the latents after the last step (``None`` where the pipeline has no step callback), times."""
    params = inspect.signature(pipe.__call__).parameters
    extra: dict[str, Any] = {}
    last: dict[str, torch.Tensor] = {}
    if "callback_on_step_end" in params:
        def keep(_pipe: Any, _i: int, _t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            last["latents"] = callback_kwargs["latents"]
            return callback_kwargs

        extra = {"callback_on_step_end": keep, "callback_on_step_end_tensor_inputs": ["latents"]}
    generator = torch.Generator("cpu").manual_seed(sample.seed)
    timer.reset()
    if timer.cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = pipe(sample.prompt, generator=generator, output_type="pt", **kwargs, **extra)
    if timer.cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    output = result.frames if hasattr(result, "frames") else result.images
    latents = last.get("latents")
    return CallResult(
        output=output[0].detach().float().cpu(),
        latents=None if latents is None else latents.detach().float().cpu(),
        total_s=total,
        denoise_s=timer.denoiser.total_ms() / 1e3,
        attention_s=timer.attention.total_ms() / 1e3,
    )


def output_hash(x: torch.Tensor) -> str:
    """SHA-256 of the output as 8-bit pixels (what is saved): equal outputs give equal hashes across runs."""
    from diffaccel.eval.media import to_uint8

    return hashlib.sha256(to_uint8(x).tobytes()).hexdigest()[:16]


def density_kept(method: Any, pipe: Any) -> float | None:
    """Mean over layers of the kept fraction of key blocks at each layer's last call (``None``: no block mask)."""
    from diffaccel.demo.compare import kept_masks, layer_names

    masks = kept_masks(method, layer_names(pipe))
    if not masks:
        return None
    return float(sum(m.mean() for m in masks.values()) / len(masks))


# ----------------------------------------------------------------------------------------------- the loop


@dataclass
class Models:
    """The model-based metrics built once per process (a function, or the :class:`Skipped` reason)."""

    lpips: Any
    clip: Any
    dino: Any
    clip_features: Any

    def skipped(self) -> list[Skipped]:
        return [m for m in (self.lpips, self.clip, self.dino, self.clip_features) if isinstance(m, Skipped)]


def build_models(opts: EvalOptions, video: bool) -> Models:
    lpips = build_lpips(opts.lpips_weights)
    clip = build_clip_score(opts.clip_model)
    if video:
        dino = build_features("dino", opts.dino_model)
        clip_features = build_features("clip", opts.clip_model)
    else:
        why = "images: a video dimension"
        dino, clip_features = Skipped("subject consistency", why), Skipped("background consistency", why)
    return Models(lpips, clip, dino, clip_features)


def sample_metrics(res: CallResult, ref: CallResult | None, prompt: str, models: Models, video: bool) -> dict[str, Any]:
    """Every per-sample metric of one output (fidelity ones only against a reference)."""
    m: dict[str, Any] = {}
    if ref is not None:
        m["psnr"], m["ssim"], _ = psnr_ssim(res.output, ref.output)
        m["latent_cosine"] = cosine(res.latents, ref.latents)
        m["rel_l1"] = relative_l1(res.output, ref.output)
        if callable(models.lpips):
            m["lpips"] = models.lpips(res.output, ref.output)
    if callable(models.clip):
        m["clip_score"] = models.clip(res.output, prompt)
    if video:
        m["temporal_flickering"] = temporal_flickering(res.output)
        m["motion_smoothness"] = motion_smoothness_proxy(res.output)
        if callable(models.dino):
            m["subject_consistency"] = consistency(models.dino(res.output))
        if callable(models.clip_features):
            m["background_consistency"] = consistency(models.clip_features(res.output))
    return m


ProgressFn = Callable[[str], None]


@dataclass
class ShardResult:
    """What one process produced: per-(sample, label) records, and whether a Ctrl-C cut it short."""

    records: list[dict[str, Any]]
    interrupted: bool = False


def run_shard(
    pipe: Any,
    model: str,
    kwargs: dict[str, Any],
    methods: dict[str, Any],
    specs: list[MethodSpec],
    shard: list[Sample],
    opts: EvalOptions,
    models: Models,
    *,
    video: bool,
    cuda: bool,
    advance: ProgressFn | None = None,
) -> ShardResult:
    """Generate ``shard`` with dense and every method, write the samples and grids, return the records.

    A ``KeyboardInterrupt`` stops the loop: the records so far come back with ``interrupted=True``.
    """
    from diffaccel.run import fallback_note

    out = Path(opts.out)
    labels = [BASELINE, *(s.label for s in specs if s.label != BASELINE)]
    spec_of = {s.label: s for s in specs}
    timer = CallTimer(pipe, cuda)
    records: list[dict[str, Any]] = []
    active: list[str] = []

    def activate(label: str) -> None:
        if active == [label]:
            return
        remove(pipe)  # back to the stock processors first: a method is never applied over another
        if label != BASELINE:
            apply(pipe, methods[label])
        active[:] = [label]

    try:
        if shard:
            for _ in range(opts.warmup):
                for label in labels:
                    activate(label)
                    call_pipeline(pipe, kwargs, shard[0], timer)
        for position, sample in enumerate(shard):
            ref: CallResult | None = None
            for label in side_order(labels, sample.index):
                activate(label)
                counts = getattr(getattr(methods.get(label), "inner", methods.get(label)), "call_counts", None)
                if counts is not None:
                    counts.reset()
                res = call_pipeline(pipe, kwargs, sample, timer)
                if label == BASELINE:
                    ref = res
                spec = spec_of.get(label)
                method = methods.get(label)
                record: dict[str, Any] = {
                    "sample": sample.id, "index": sample.index, "prompt": sample.prompt, "seed": sample.seed,
                    "label": label, "method": spec.name if spec else BASELINE,
                    "params": dict(spec.params) if spec else {},
                    "total_s": res.total_s, "denoise_s": res.denoise_s, "attention_s": res.attention_s,
                    "density": 1.0 if label == BASELINE else density_kept(method, pipe),
                    "output_sha256": output_hash(res.output),
                    "note": None if label == BASELINE else fallback_note(method, res.output, ref.output),
                    "metrics": sample_metrics(res, None if label == BASELINE else ref, sample.prompt, models, video),
                }
                if record["note"]:
                    from diffaccel.warn import warn_once

                    warn_once(f"eval-fallback-{label}-{model}", f"{label} on {model}: {record['note']}; its row "
                              "describes dense attention, not the method")
                record["file"] = str(_save_sample(out, label, sample, res.output, video).relative_to(out))
                if label != BASELINE and sample.index < opts.grids:
                    record["grid"] = str(_save_grid(out, label, sample, res.output, ref.output, record).relative_to(out))
                records.append(record)
                if advance is not None:
                    advance(f"{label} {position + 1}/{len(shard)}")
    except KeyboardInterrupt:
        return ShardResult(records, interrupted=True)
    finally:
        timer.close()
        remove(pipe)
    return ShardResult(records)


def _save_sample(out: Path, label: str, sample: Sample, output: torch.Tensor, video: bool) -> Path:
    stem = out / "samples" / label / sample.id
    if video:
        return save_video(output, stem).path
    return save_image(output, stem.with_suffix(".png"))


def _save_grid(out: Path, label: str, sample: Sample, output: torch.Tensor, reference: torch.Tensor,
               record: dict[str, Any]) -> Path:
    m = record["metrics"]
    psnr = "inf" if m["psnr"] == float("inf") else f"{m['psnr']:.2f}"
    caption = f"{label} vs dense, seed {sample.seed}: PSNR {psnr} dB, SSIM {m['ssim']:.4f}"
    path = out / "grids" / f"{label}_{sample.id}.png"
    return save_side_by_side(reference, output, ("dense", label), path, caption=caption)


def build_methods(specs: list[MethodSpec]) -> dict[str, Any]:
    """Instantiate every non-baseline method (bad names and parameters fail here, before any model loads)."""
    seen: set[str] = set()
    methods: dict[str, Any] = {}
    for spec in specs:
        if spec.label in seen:
            raise ConfigError(f"method label {spec.label!r} appears twice; give each setting its own label")
        seen.add(spec.label)
        if spec.label == BASELINE:
            if spec.name != BASELINE or spec.params:
                raise ConfigError("the label 'dense' is the stock-processor baseline; give this setting another label")
            continue
        methods[spec.label] = get_method(spec.name, **spec.params)
    return methods
