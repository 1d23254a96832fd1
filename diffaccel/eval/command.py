"""``diffaccel eval``: every method against dense on the same prompts and seeds, one report (see docs/eval.md).

This module is imported to show ``diffaccel eval --help``: it imports no torch at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

DEFAULTS: dict[str, Any] = {
    "methods": [("dense", "dense", {}), ("gna", "gna", {})],
    "prompts": "coco", "num": 4, "seeds": [0], "out": "eval", "warmup": 1, "grids": 2, "dtype": "auto",
    "device": "auto",
}
"""Values used when neither the recipe nor a flag sets them."""


def parse_methods(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``dense,gna,agent`` -> ``[(label, method, params), ...]`` (labels are the names)."""
    from diffaccel.errors import ConfigError

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--methods must list methods separated by commas, e.g. dense,gna; got {text!r}")
    return [(n, n, {}) for n in names]


def parse_seeds(text: str) -> list[int]:
    from diffaccel.errors import ConfigError

    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated non-negative integers, e.g. 0,1,2; got {text!r}") from None
    if not seeds:
        raise ConfigError(f"--seeds must list at least one seed, got {text!r}")
    return seeds


def apply_sets(methods: list[tuple[str, str, dict[str, Any]]], items: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """``--set gna.kernel_size=5`` (label.key=value, values as JSON) added to the method labelled ``gna``."""
    from diffaccel.errors import ConfigError
    from diffaccel.run import parse_method_params

    out = [(label, name, dict(params)) for label, name, params in methods]
    for item in items:
        target, dot, rest = item.partition(".")
        if not dot or "=" not in rest or "=" in target:
            raise ConfigError(f"--set expects method.key=value (e.g. gna.kernel_size=5), got {item!r}")
        matches = [m for m in out if m[0] == target]
        if not matches:
            raise ConfigError(f"--set {item!r}: no method labelled {target!r} (methods: {', '.join(m[0] for m in out)})")
        matches[0][2].update(parse_method_params([rest]))
    return out


def build_options(cli: dict[str, Any], command: list[str]):
    """Recipe values, then the flags that were given (not ``None``), then :data:`DEFAULTS`."""
    from diffaccel.eval.recipes import load_recipe
    from diffaccel.eval.runner import EvalOptions, MethodSpec

    values: dict[str, Any] = dict(DEFAULTS)
    if cli.get("config") is not None:
        values.update(load_recipe(cli["config"]))
    sets = cli.pop("set_", None) or []
    for key, value in cli.items():
        if value is None:
            continue
        if key == "methods":
            value = parse_methods(value)
        elif key == "seeds":
            value = parse_seeds(value)
        values[key] = value
    values["methods"] = apply_sets(values["methods"], sets)
    if all(label != "dense" for label, _, _ in values["methods"]):
        values["methods"].insert(0, ("dense", "dense", {}))
    for key in ("out", "reference_dir", "fid_weights", "lpips_weights"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    if values.get("config") is not None:
        values["config"] = str(values["config"])
    values["methods"] = [MethodSpec(label, name, params) for label, name, params in values["methods"]]
    return EvalOptions(**values, command=command)


def eval_command(
    model: Annotated[Optional[str], typer.Option(help="Tiny pipeline name, Hub id or local folder (default: as "
                                                  "`diffaccel generate`: tiny-flux-trained without CUDA, FLUX.1-dev with CUDA).")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods; dense (stock processors) is "
                                                   "always the reference. Default dense,gna.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Method parameter method.key=value "
                                                       "(repeatable; values parse as JSON), e.g. gna.kernel_size=5.")] = None,
    prompts: Annotated[Optional[str], typer.Option(help="Built-in prompt set (coco, vbench) or a text file, one "
                                                   "prompt a line. Default coco.")] = None,
    num: Annotated[Optional[int], typer.Option(min=1, help="Number of prompts (default 4).")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Comma-separated seeds, each with every prompt (default 0).")] = None,
    height: Annotated[Optional[int], typer.Option(min=1, help="Height in pixels (default: the model's).")] = None,
    width: Annotated[Optional[int], typer.Option(min=1, help="Width in pixels (default: the model's).")] = None,
    frames: Annotated[Optional[int], typer.Option(min=1, help="Video frames (video models).")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Denoising steps (default: the model's).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Report folder (default ./eval).")] = None,
    reference_dir: Annotated[Optional[Path], typer.Option(help="Folder of reference images: FID/KID of every "
                                                          "set against it.")] = None,
    fid_weights: Annotated[Optional[Path], typer.Option(help="clean-fid's inception-2015-12-05.pt (else its "
                                                        "cache in /tmp or its download).")] = None,
    clip_model: Annotated[Optional[str], typer.Option(help="Saved CLIP folder for the CLIP score and background "
                                                      "consistency (else the Hub cache or download).")] = None,
    lpips_weights: Annotated[Optional[Path], typer.Option(help="torchvision AlexNet weights for LPIPS (else "
                                                          "torch.hub's cache or download).")] = None,
    dino_model: Annotated[Optional[str], typer.Option(help="Saved DINO folder for subject consistency (video).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML recipe (configs/eval/*.yaml); flags override it.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto, float32, float16, bfloat16.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N (under accelerate: one GPU "
                                                  "per process).")] = None,
    warmup: Annotated[Optional[int], typer.Option(min=0, help="Untimed calls of each method first (default 1).")] = None,
    grids: Annotated[Optional[int], typer.Option(min=0, help="Samples per method drawn beside dense (default 2).")] = None,
) -> None:
    """Evaluate methods against dense on the same prompts and seeds: speed, fidelity, FID/KID, CLIP, video
    dimensions; writes results.json, report.md and plots under --out."""
    import sys

    from rich.console import Console

    cli = dict(model=model, methods=methods, set_=set_, prompts=prompts, num=num, seeds=seeds, height=height,
               width=width, frames=frames, steps=steps, out=out, reference_dir=reference_dir,
               fid_weights=fid_weights, clip_model=clip_model, lpips_weights=lpips_weights, dino_model=dino_model,
               config=config, dtype=dtype, device=device, warmup=warmup, grids=grids)
    opts = build_options(cli, ["diffaccel", *sys.argv[1:]])
    from diffaccel.eval.driver import evaluate
    from diffaccel.eval.report import summary_table

    console = Console()
    outcome = evaluate(opts, console=console)
    if not outcome.result:  # not the main process
        return
    console.print(summary_table(outcome.result))
    for name, path in outcome.paths.items():
        console.print(f"{name}: {path}", markup=False)
    if outcome.interrupted:
        console.print(f"interrupted: partial report of {outcome.result['completed_samples']} complete sample(s)",
                      markup=False)
        raise typer.Exit(130)
