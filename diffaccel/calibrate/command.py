"""The ``diffaccel calibrate`` command (registered by one line in :mod:`diffaccel.cli`).

Module level imports typer only; torch, diffusers and the driver are imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

CALIBRATED_METHODS = ("paro",)


def calibrate_command(
    prompts: Annotated[str, typer.Option(help="Prompts: a text file (one per line) or one prompt text.")],
    method: Annotated[str, typer.Option("--method", "-m", help="Method to calibrate (paro).")] = "paro",
    model: Annotated[Optional[str], typer.Option(help="Tiny pipeline name, Hub id or local folder.")] = None,
    num_prompts: Annotated[int, typer.Option(min=1, help="How many prompts of the file to use.")] = 2,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Denoising steps (default: the model's).")] = None,
    density: Annotated[float, typer.Option(help="Fraction of key blocks kept, in (0, 1].")] = 0.5,
    block: Annotated[int, typer.Option(help="Mask block in tokens (power of two >= 16).")] = 64,
    alpha: Annotated[float, typer.Option(help="Order choice: alpha*(1-sparsity) + (1-alpha)*incoherence.")] = 0.5,
    num_buckets: Annotated[Optional[int], typer.Option(help="Mask buckets (default: steps//2 + 1).")] = None,
    search_steps: Annotated[int, typer.Option(min=1, help="Steps of the first prompt that choose the orders.")] = 2,
    sample_blocks: Annotated[int, typer.Option(min=1, help="Query blocks per head sampled for the order search.")] = 4,
    height: Annotated[Optional[int], typer.Option(min=1, help="Height in pixels (default: the model's).")] = None,
    width: Annotated[Optional[int], typer.Option(min=1, help="Width in pixels (default: the model's).")] = None,
    frames: Annotated[Optional[int], typer.Option(min=1, help="Video frames (video models).")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the first prompt's noise (+1 per prompt).")] = 0,
    out: Annotated[Path, typer.Option(help="Plan file to write (safetensors).")] = Path("plan.safetensors"),
    dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    backend: Annotated[str, typer.Option(help="Kernel backend of the statistics: auto, triton, reference.")] = "auto",
    compare_dense: Annotated[
        bool, typer.Option("--compare-dense/--no-compare-dense", help="Also time the dense generations.")
    ] = True,
) -> None:
    """Calibrate a static-plan method (PARO) from dense generations; write the plan, a summary and a heatmap."""
    from rich.console import Console

    from diffaccel.errors import ConfigError

    if method not in CALIBRATED_METHODS:
        raise ConfigError(f"--method must be one of {', '.join(CALIBRATED_METHODS)} (methods with a plan), got {method!r}")
    from diffaccel import __version__
    from diffaccel.calibrate.driver import calibrate_pipeline, read_prompts
    from diffaccel.calibrate.report import write_report
    from diffaccel.methods.paro import ParoConfig
    from diffaccel.methods.base import build_config
    from diffaccel.pipelines.loading import load_pipeline, resolve_device, resolve_dtype
    from diffaccel.run import GenerateOptions, call_kwargs, check_sizes, default_model, resolved_steps

    config = build_config(ParoConfig, dict(density=density, block_size=block, alpha=alpha, num_buckets=num_buckets,
                                           search_steps=search_steps, sample_blocks=sample_blocks, backend=backend),
                          method="paro")
    texts = read_prompts(prompts, num_prompts)
    model_name = model or default_model()
    dev = resolve_device(device)
    pipe = load_pipeline(model_name, dtype=resolve_dtype(dtype, dev), device=dev)
    opts = GenerateOptions(method="paro", model=model_name, steps=steps, height=height, width=width, frames=frames)
    kwargs = call_kwargs(pipe, model_name, opts)
    check_sizes(pipe, kwargs.get("height"), kwargs.get("width"), kwargs.get("num_frames"))
    n_steps = resolved_steps(pipe, kwargs)
    if n_steps is None:
        raise ConfigError("pass --steps: the pipeline has no default number of steps")
    kwargs["num_inference_steps"] = n_steps
    result = calibrate_pipeline(pipe, model=model_name, prompts=texts, kwargs=kwargs, steps=n_steps, config=config,
                                seed=seed, compare_dense=compare_dense, package_version=__version__)
    path = result.plan.save(out)
    md, png = write_report(result.plan, path, calibration_s=result.calibration_s, dense_s=result.dense_s,
                           title=f"PARO plan: {model_name}")
    console = Console()
    timing = f"calibration {result.calibration_s:.2f} s for {result.prompts} prompt(s) x {result.steps} steps"
    if result.dense_s:
        timing += f"; dense generation {result.dense_s:.2f} s; ratio {result.ratio:.2f}x"
    console.print(timing + f" ({dev}).")
    console.print(f"mean recall {float(result.plan.recall.mean()):.4f} at density {result.plan.density}")
    console.print(f"plan: {path}\nsummary: {md}\nheatmap: {png}")
