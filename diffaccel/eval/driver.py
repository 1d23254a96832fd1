"""``diffaccel eval`` end to end: check the options, load the pipeline, run the shards, gather, measure the
distributions and write the report (:mod:`diffaccel.eval.runner` generates, :mod:`diffaccel.eval.report` writes).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from diffaccel.errors import ConfigError
from diffaccel.eval import report
from diffaccel.eval.metrics import Skipped
from diffaccel.eval.prompts import load_prompts
from diffaccel.eval.runner import (
    BASELINE, EvalOptions, build_methods, build_models, run_shard, samples_of,
)


@dataclass
class EvalOutcome:
    """The written report: the result dict (``results.json``), its files, and whether Ctrl-C cut the run."""

    result: dict[str, Any]
    paths: dict[str, Path]
    interrupted: bool
    skipped: list[Skipped]


def _state(device: str) -> Any:
    """accelerate's ``PartialState`` (one process without ``accelerate launch``). On a CPU (``--device cpu``, or
    no CUDA) the processes talk over gloo (accelerate's ``MULTI_CPU``): launch them with ``accelerate launch
    --multi_gpu --num_processes N`` (torchrun underneath; accelerate's ``--cpu`` flag starts one process)."""
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))


def environment(device: torch.device, command: list[str], num_processes: int) -> dict[str, Any]:
    import diffusers

    import diffaccel

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()})"
    return {
        "device": name, "device_type": device.type, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "diffaccel": getattr(diffaccel, "__version__", "0.1.0"), "python": platform.python_version(),
        "cuda": torch.version.cuda, "num_processes": num_processes, "command": command or sys.argv,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _check(opts: EvalOptions) -> None:
    if not opts.seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in opts.seeds):
        raise ConfigError(f"seeds must be non-negative integers, got {opts.seeds!r}")
    if len(set(opts.seeds)) != len(opts.seeds):
        raise ConfigError(f"seeds must be distinct, got {opts.seeds!r}")
    if not isinstance(opts.warmup, int) or isinstance(opts.warmup, bool) or opts.warmup < 0:
        raise ConfigError(f"warmup must be a non-negative integer, got {opts.warmup!r}")
    if opts.reference_dir is not None and not Path(opts.reference_dir).is_dir():
        raise ConfigError(f"--reference-dir {str(opts.reference_dir)!r} is not a folder of images")


def evaluate(opts: EvalOptions, *, pipe: Any = None, feature_extractor: Any = None, console: Any = None) -> EvalOutcome:
    """Run the evaluation ``opts`` describes and write its report under ``opts.out`` (main process).

    ``pipe`` replaces loading ``opts.model`` (tests); ``feature_extractor`` replaces clean-fid's Inception
    (clean-fid's ``custom_feat_extractor`` contract). Non-main processes return an outcome with an empty result.
    """
    from diffaccel.pipelines.loading import load_pipeline, resolve_device, resolve_dtype
    from diffaccel.pipelines.tiny import is_tiny
    from diffaccel.run import (
        call_kwargs, check_method_reaches, check_output_folder, check_sizes, default_model, is_video_pipeline,
        resolved_steps, GenerateOptions,
    )

    _check(opts)
    specs = [s for s in opts.methods if s.label != BASELINE]
    if not specs:
        raise ConfigError("--methods needs at least one method besides dense (e.g. --methods dense,gna)")
    methods = build_methods(opts.methods)  # unknown methods and bad parameters fail before anything loads
    prompts = load_prompts(opts.prompts, opts.num)
    samples = samples_of(prompts, list(opts.seeds))
    model = opts.model or default_model()
    out = check_output_folder(opts.out)
    state = _state(opts.device)
    device = resolve_device(opts.device)
    if state.num_processes > 1 and device.type == "cuda":
        device = state.device  # one GPU per process
    dtype = resolve_dtype(opts.dtype, device)
    if pipe is None:
        pipe = load_pipeline(model, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    gen_opts = GenerateOptions(method="dense", model=model, steps=opts.steps, height=opts.height, width=opts.width,
                               frames=opts.frames)
    kwargs = call_kwargs(pipe, model, gen_opts)
    check_sizes(pipe, kwargs.get("height"), kwargs.get("width"), kwargs.get("num_frames"))
    steps = resolved_steps(pipe, kwargs)
    for method in methods.values():
        check_method_reaches(pipe, method, steps)
    video = is_video_pipeline(pipe)
    from diffaccel.calibrate.driver import ensure_plan
    from diffaccel.run import _slug

    for method in methods.values():  # PARO without a plan: calibrate on the first prompt, save the plan
        ensure_plan(method, pipe, model=model, model_slug=_slug(model), prompt=prompts[0], kwargs=kwargs,
                    steps=steps, seed=samples[0].seed, out=out)
    models = build_models(opts, video)
    skipped = models.skipped()
    if state.is_main_process and console is not None:
        for s in skipped:
            console.print(s.line(), markup=False)

    with state.split_between_processes(samples) as shard:
        shard = list(shard)
        shard_result = _run_with_progress(pipe, model, kwargs, methods, specs, shard, opts, models, video,
                                          device.type == "cuda", state.is_main_process and console is not None)
    records = shard_result.records
    interrupted = shard_result.interrupted
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        records = gather_object(records)
    if not state.is_main_process:
        state.wait_for_everyone()
        return EvalOutcome({}, {}, interrupted, skipped)
    records = sorted(records, key=lambda r: (r["index"], [BASELINE, *(s.label for s in specs)].index(r["label"])))
    labels = [BASELINE, *(s.label for s in specs)]
    dist, dist_skipped = _distribution(out, labels, records, video, opts, feature_extractor, device)
    skipped = skipped + dist_skipped
    if console is not None:
        for s in dist_skipped:
            console.print(s.line(), markup=False)
    have = {(r["sample"], r["label"]) for r in records}
    completed = sum(1 for s in {r["sample"] for r in records} if all((s, label) in have for label in labels))
    overheads = [w for w, c in (("CPU", device.type != "cuda"), ("tiny random model", is_tiny(model))) if c]
    result: dict[str, Any] = {
        "schema": 1,
        "partial": interrupted,
        "completed_samples": completed,
        "environment": environment(device, opts.command, state.num_processes),
        "run": {
            "model": model, "pipeline": type(pipe).__name__, "video": video, "size": _size_text(kwargs, video),
            "steps": steps, "prompts": opts.prompts, "num_prompts": len(prompts), "seeds": list(opts.seeds),
            "num_samples": len(samples), "num_processes": state.num_processes, "warmup": opts.warmup,
            "dtype": str(dtype).replace("torch.", ""),
            "overheads_note": (", ".join(overheads) + ": times measure overheads, not attention speed")
            if overheads else None,
        },
        "options": _options_dict(opts),
        "samples": records,
        "aggregates": report.aggregates(records, labels),
        "distribution": dist,
        "skipped": [asdict(s) for s in skipped],
    }
    paths = report.write(result, out)
    state.wait_for_everyone()
    return EvalOutcome(result, paths, interrupted, skipped)


def _size_text(kwargs: dict[str, Any], video: bool) -> str:
    size = f"{kwargs.get('width', '?')}x{kwargs.get('height', '?')}"
    if video:
        size += f"x{kwargs.get('num_frames', '?')} frames"
    return size


def _options_dict(opts: EvalOptions) -> dict[str, Any]:
    d = asdict(opts)
    for key, value in d.items():
        if isinstance(value, Path):
            d[key] = str(value)
    d["methods"] = [asdict(m) for m in opts.methods]
    return d


def _run_with_progress(pipe, model, kwargs, methods, specs, shard, opts, models, video, cuda, show):
    """:func:`run_shard` under a rich progress bar over methods x samples (the main process shows it)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = len(shard) * (len(specs) + 1)
    with Progress(TextColumn("eval {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not show, transient=False) as progress:
        task = progress.add_task("methods x samples", total=total)

        def advance(text: str) -> None:
            progress.update(task, advance=1, description=text)

        return run_shard(pipe, model, kwargs, methods, specs, shard, opts, models, video=video, cuda=cuda,
                         advance=advance)


def _distribution(out: Path, labels: list[str], records: list[dict[str, Any]], video: bool, opts: EvalOptions,
                  feature_extractor: Any, device: torch.device) -> tuple[dict[str, Any], list[Skipped]]:
    """FID/KID of each method's images to dense's (and of every set to ``--reference-dir``)."""
    from diffaccel.eval.distribution import build_extractor, distance, folder_features

    if video:
        return {}, [Skipped("FID/KID", "video model: FID/KID are computed on images (see the VBench-style columns)")]
    from diffaccel.eval.metrics import importable

    if feature_extractor is not None and not importable("cleanfid.fid"):
        return {}, [Skipped("FID/KID", "clean-fid does not import (pip install 'diffaccel[eval]'; it needs torchvision)")]
    extractor = feature_extractor if feature_extractor is not None else build_extractor(opts.fid_weights, device)
    if isinstance(extractor, Skipped):
        return {}, [extractor]
    done = {l: {r["sample"] for r in records if r["label"] == l} for l in labels}
    common = set.intersection(*done.values()) if done else set()
    if len(common) < 2:
        return {}, [Skipped("FID/KID", f"{len(common)} complete sample(s): at least 2 images per set are needed")]
    feats: dict[str, Any] = {}
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # clean-fid prints progress and 'singular product' notes
        for label in labels:
            files = sorted(out / r["file"] for r in records if r["label"] == label and r["sample"] in common)
            feats[label] = _files_features(files, extractor, device)
        ref = None
        if opts.reference_dir is not None:
            ref = folder_features(opts.reference_dir, extractor, device)
        dist: dict[str, Any] = {}
        for label in labels:
            entry = {}
            if label != BASELINE:
                entry["dense"] = distance(feats[label], feats[BASELINE]).to_dict()
            if ref is not None:
                entry["reference"] = distance(feats[label], ref).to_dict()
            if entry:
                dist[label] = entry
    return dist, []


def _files_features(files: list[Path], extractor: Any, device: torch.device) -> Any:
    from cleanfid.fid import get_files_features

    return get_files_features([str(f) for f in files], extractor, num_workers=0, batch_size=32, device=device,
                              mode="clean", verbose=False)
