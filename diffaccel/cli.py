"""The ``diffaccel`` command line: ``generate``, ``methods``, ``models``, ``bench``.

User errors (unknown method or model, a bad size or parameter) print one line ``error: ...`` on stderr and
exit with code 2. Library warnings from diffusers/transformers are reduced to errors unless
``DIFFACCEL_VERBOSE=1`` is set.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from diffaccel.bench.cli import bench_app
from diffaccel.calibrate.command import calibrate_command
from diffaccel.demo.command import demo_command
from diffaccel.errors import DiffAccelError

# This module is imported by the console script before any command runs: it must not import torch, diffusers or
# diffaccel's heavy modules at module level (``diffaccel --help`` stays fast). Commands import them when they run.


class LazyGroup(TyperGroup):
    """A typer group whose commands in :data:`LAZY_COMMANDS` are imported only when they run (or show --help).

    ``diffaccel --help`` lists them from their one-line help without importing their modules.
    """

    def list_commands(self, ctx: Any) -> list[str]:
        return [*super().list_commands(ctx), *(n for n in LAZY_COMMANDS if n not in self.commands)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None or cmd_name not in LAZY_COMMANDS:
            return command
        module, attribute, short_help = LAZY_COMMANDS[cmd_name]
        if not getattr(self, "_resolving", False):  # listing the commands: a stand-in with the help line
            return TyperCommand(name=cmd_name, help=short_help, short_help=short_help)
        sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        sub.command(cmd_name)(getattr(importlib.import_module(module), attribute))
        real = typer.main.get_command(sub)
        real.name = cmd_name
        self.commands[cmd_name] = real
        return real

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        self._resolving = True
        try:
            return super().resolve_command(ctx, args)
        finally:
            self._resolving = False


LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "eval": ("diffaccel.eval.command", "eval_command", "Evaluate methods against dense: speed, fidelity, FID/KID, CLIP, video; one report."),
    "headhunt": ("diffaccel.pipelines.headhunt", "headhunt_command",
                 "Search the attention heads whose SoftPAG perturbation maximises OBJECTIVE and write them as JSON."),
    "train-tiny": ("diffaccel.pipelines.trained.train", "train_tiny_command",
                   "Train tiny-flux-trained / tiny-wan-trained on procedural shapes from a seed; write fp16 safetensors."),
}
"""Commands whose module imports torch at module level: name -> (module, function, one-line help)."""

app = typer.Typer(
    name="diffaccel",
    help="Accelerated attention for diffusers pipelines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=LazyGroup,
)

# Command registrations, one line each (modules imported here must not import torch at module level).
app.add_typer(bench_app, name="bench")
app.command("calibrate")(calibrate_command)
app.command("demo")(demo_command)


GENERATE_EXAMPLES = (
    "diffaccel generate --method gna",
    "diffaccel generate --method gna --set kernel_size=5 --set dense_steps=1",
    "diffaccel generate --method tile --model tiny-wan",
    "diffaccel generate --method softpag --set strength=0.5",
)
"""Examples in ``generate --help`` (a test runs each of them)."""


@app.command(epilog="Examples (tiny offline models, a few seconds on a CPU):\n\n" + "\n\n".join(GENERATE_EXAMPLES))
def generate(
    method: Annotated[str, typer.Option("--method", "-m", help="Attention method (see `diffaccel methods`).")],
    model: Annotated[
        Optional[str],
        typer.Option(help="Tiny pipeline name, Hub id or local folder. Default: tiny-flux-trained without CUDA, "
                     "black-forest-labs/FLUX.1-dev with CUDA."),
    ] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Text prompt (default: the tiny model's caption, else a fox).")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Denoising steps (default: the model's).")] = None,
    height: Annotated[Optional[int], typer.Option(min=1, help="Height in pixels (default: the model's).")] = None,
    width: Annotated[Optional[int], typer.Option(min=1, help="Width in pixels (default: the model's).")] = None,
    frames: Annotated[Optional[int], typer.Option(min=1, help="Video frames (video models; Wan: 4k+1).")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the initial noise (the same for both runs).")] = 0,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("outputs"),
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="Method parameter key=value (repeatable; values parse as JSON), e.g. --set kernel_size=5 or --set 'layers=[\"transformer_blocks.0.attn\"]' (`diffaccel methods NAME` lists them)."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto (bfloat16 on CUDA, float32 on CPU), float32, float16, bfloat16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    cpu_offload: Annotated[bool, typer.Option("--cpu-offload", help="Keep models on the CPU until each runs (CUDA).")] = False,
    compare: Annotated[bool, typer.Option("--compare/--no-compare", help="Also run dense with the same seed.")] = True,
    warmup: Annotated[
        Optional[int], typer.Option(min=0, help="Untimed calls of each run before the timed ones (default 2).")
    ] = None,
    repeats: Annotated[
        Optional[int],
        typer.Option(min=1, help="Timed calls per run, method and dense alternating (default 5; medians, min-max)."),
    ] = None,
    cp: Annotated[
        int,
        typer.Option("--cp", min=1, help="Context parallelism: N processes (GPUs) share each denoiser call "
                     "(diffusers Ulysses, launched through torchrun; rank 0 writes the outputs)."),
    ] = 1,
    guard: Annotated[
        Optional[float],
        typer.Option(help="Quality guard: relative L1 error budget vs dense (e.g. 0.05); layers above it run dense."),
    ] = None,
) -> None:
    """Generate with a method (and with dense), print latency, speedup, PSNR and SSIM, write the outputs."""
    if cp > 1:
        from diffaccel import multigpu

        if not multigpu.under_torchrun():  # this process launches N ranks of the same command and waits
            raise SystemExit(multigpu.relaunch(cp, _ARGV if _ARGV is not None else sys.argv[1:]))
    from diffaccel.run import GenerateOptions, default_prompt, generate as run_generate, parse_method_params, results_table
    from diffaccel.run import overhead_line

    options = GenerateOptions(
        method=method,
        params=parse_method_params(set_),
        model=model,
        prompt=default_prompt(model) if prompt is None else prompt,
        steps=steps,
        height=height,
        width=width,
        frames=frames,
        seed=seed,
        out=out,
        dtype=dtype,
        device=device,
        cpu_offload=cpu_offload,
        compare=compare,
        warmup=warmup,
        repeats=repeats,
        cp=cp,
        guard=guard,
    )
    console = Console()
    result = run_generate(options)
    if cp > 1 and not multigpu.is_main():
        return  # rank 0 prints and writes
    console.print(results_table(result))
    if result.guard is not None:
        console.print(result.guard)
    if (line := overhead_line(result)) is not None:
        console.print(line)
    if result.video is not None:
        how = "mp4" if result.video.format == "mp4" else f"GIF ({result.video.note})"
        console.print(f"video ({how}): {result.output_path}")
    else:
        console.print(f"image: {result.output_path}")
    if result.side_by_side_path is not None:
        console.print(f"side by side (dense | {result.method} | difference): {result.side_by_side_path}")


def _parse_sizes(name: str, text: str, *, kind: type = int) -> tuple:
    """``21x30x52`` (or ``21,30,52``, or one value) as a tuple; ``kind=bool`` reads 0/1/true/false."""
    from diffaccel.errors import ConfigError

    try:
        parts = [p.strip() for p in str(text).lower().replace(",", "x").split("x") if p.strip()]
        if kind is bool:
            if any(p not in ("0", "1", "true", "false") for p in parts):
                raise ValueError(text)
            out: tuple = tuple(p in ("1", "true") for p in parts)
        else:
            out = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--{name.replace('_', '-')} must look like 21x30x52 (or one value), got {text!r}") from None
    if not out:
        raise ConfigError(f"--{name.replace('_', '-')} must not be empty")
    return out


def _fit(name: str, values: tuple, ndim: int) -> object:
    from diffaccel.errors import ConfigError

    if len(values) == 1:
        return values[0]
    if len(values) != ndim:
        raise ConfigError(f"--{name.replace('_', '-')} has {len(values)} values but the grid has {ndim} dimensions")
    return values


def _print_gna_analysis(grid: str, kernel_size: str, stride: str, dilation: str, causal: str, block: int) -> None:
    """``methods gna --analyze``: kept-block fraction and ideal speedup bound (GNA simulator idea)."""
    from diffaccel.sparse.analysis import analyze

    g = _parse_sizes("grid", grid)
    nd = len(g)
    result = analyze(
        g, _fit("kernel_size", _parse_sizes("kernel_size", kernel_size), nd),  # type: ignore[arg-type]
        _fit("stride", _parse_sizes("stride", stride), nd), _fit("dilation", _parse_sizes("dilation", dilation), nd),  # type: ignore[arg-type]
        block, is_causal=_fit("causal", _parse_sizes("causal", causal, kind=bool), nd),  # type: ignore[arg-type]
    )
    table = Table(title=(
        f"GNA grid {'x'.join(map(str, result.grid))}, window {'x'.join(map(str, result.kernel_size))}, stride "
        f"{'x'.join(map(str, result.stride))}, dilation {'x'.join(map(str, result.dilation))}, block {result.block}"
    ))
    for column in ("layout", "visited blocks", "dense of visited", "speedup bound"):
        table.add_column(column)
    table.add_row("element mask (FLOPs)", f"{result.density:.2%}", "", f"{result.flop_bound:.2f}x")
    for cost in (result.tiled, result.row_major):
        if cost is not None:
            table.add_row(cost.layout, f"{cost.visited_fraction:.2%}", f"{cost.dense_fraction:.1%}",
                          f"{cost.speedup_bound:.2f}x")
    console = Console()
    console.print(table)
    if result.tiled is None:
        console.print(f"no tile of {result.block} tokens divides the grid (per dilation group)")
    console.print(f"diffaccel runs: {result.runs}")


@app.command()
def methods(
    name: Annotated[Optional[str], typer.Argument(help="Show one method only.")] = None,
    analyze: Annotated[bool, typer.Option("--analyze", help="gna: kept-block fraction and speedup bound.")] = False,
    grid: Annotated[Optional[str], typer.Option(help="--analyze: token grid, e.g. 21x30x52.")] = None,
    kernel_size: Annotated[Optional[str], typer.Option(help="--analyze: window per dimension, e.g. 9x15x15.")] = None,
    stride: Annotated[str, typer.Option(help="--analyze: stride per dimension.")] = "1",
    dilation: Annotated[str, typer.Option(help="--analyze: dilation per dimension.")] = "1",
    causal: Annotated[str, typer.Option(help="--analyze: causal per dimension as 0/1, e.g. 1x0x0.")] = "0",
    block: Annotated[int, typer.Option(help="--analyze: kernel block in tokens.")] = 128,
) -> None:
    """List the attention methods; `methods NAME` shows every parameter with its default (`methods gna --analyze ...`)."""
    from diffaccel.errors import ConfigError
    from diffaccel.methods.base import list_methods, method_class, method_parameters

    if analyze:
        if name != "gna":
            raise ConfigError(f"--analyze is available for method 'gna' only, got {name!r}")
        if grid is None or kernel_size is None:
            raise ConfigError("--analyze needs --grid and --kernel-size, e.g. --grid 21x30x52 --kernel-size 9x15x15")
        _print_gna_analysis(grid, kernel_size, stride, dilation, causal, block)
        return
    if name is None:
        _print_method_table(list_methods(), method_class)
    else:
        _print_method_parameters(method_class(name).name, method_class, method_parameters)


METHOD_SUMMARIES: dict[str, tuple[str, str, str]] = {
    "dense": ("baseline", "all", "PyTorch SDPA exactly as the stock diffusers processors call it"),
    "gna": ("static local sparsity", "images, video", "Generalized Neighborhood Attention (NATTEN semantics)"),
    "tile": ("static frame sparsity", "video", "Efficient-vDiT attention tiles: own frame + global frames"),
    "clear": ("static local window", "images (video per frame)", "CLEAR circular window of a radius"),
    "msw": ("windowed, shifting", "UNets, DiT visual tokens", "HiDiffusion MSW-MSA shifted 2x2 windows"),
    "agent": ("linear-time approx.", "all", "Agent Attention: two softmax stages through agent tokens"),
    "softpag": ("guidance (quality)", "SD/SDXL, SD3, FLUX", "SoftPAG: per-head soft perturbed-attention guidance"),
    "paro": ("calibrated block sparsity + INT8", "DiTs (not UNets)",
             "PAROAttention: per-head token reordering, calibrated block masks, optional INT8"),
    "adaspa": ("online block search", "images, video", "AdaSpa: LSE-cached block search with head-adaptive tiers"),
    "vmoba": ("per-query block routing", "video (images: bands/tiles)",
              "VMoBA: cyclic 1-D/2-D/3-D key partitions, top-k by query . mean key"),
}
"""(kind, applies to, summary) of the built-in methods; a method registered elsewhere may set the class
attributes ``kind``, ``applies_to`` and ``summary`` (else its docstring's first line is the summary)."""


def _method_summary(cls: type) -> tuple[str, str, str]:
    known = METHOD_SUMMARIES.get(cls.name, ("", "", ""))
    doc = (cls.__doc__ or "").strip().splitlines()
    summary = getattr(cls, "summary", None) or known[2] or (doc[0] if doc else "")
    return getattr(cls, "kind", None) or known[0], getattr(cls, "applies_to", None) or known[1], summary


def _print_method_table(names: list[str], method_class: Any) -> None:
    """``diffaccel methods``: one row per method (every text escaped: bracketed text is not rich markup)."""
    table = Table(title="diffaccel methods", caption="parameters: diffaccel methods NAME; set them with --set key=value")
    table.add_column("method", no_wrap=True)
    for column in ("kind", "applies to", "summary"):
        table.add_column(column)
    for name in names:
        kind, scope, summary = _method_summary(method_class(name))
        table.add_row(escape(name), escape(kind), escape(scope), escape(summary))
    Console().print(table)


def _print_method_parameters(name: str, method_class: Any, method_parameters: Any) -> None:
    """``diffaccel methods NAME``: every parameter with its type, default and description."""
    kind, scope, summary = _method_summary(method_class(name))
    console = Console()
    console.print(escape(f"{name}: {summary}" + (f" ({kind}; applies to {scope})" if kind else "")))
    rows = method_parameters(name)
    if not rows:
        console.print("no parameters")
        return
    table = Table(title=escape(f"{name} parameters (--set key=value; values parse as JSON)"))
    table.add_column("parameter", no_wrap=True)
    for column in ("type", "default", "description"):
        table.add_column(column)
    for field, type_name, default, help_text in rows:
        table.add_row(escape(field), escape(type_name), escape(repr(default)), escape(help_text))
    console.print(table)


@app.command()
def models() -> None:
    """List the tiny offline pipelines (any diffusers Hub id or saved folder is accepted too)."""
    from diffaccel.pipelines.tiny import TINY_PIPELINES

    table = Table(title="tiny offline pipelines (random weights, *-trained: trained on procedural shapes; --model NAME)")
    table.add_column("name", no_wrap=True)
    table.add_column("defaults")
    table.add_column("pipeline and model")
    for spec in TINY_PIPELINES.values():
        size = f"{spec.width}x{spec.height}" + (f"x{spec.frames}f" if spec.frames else "") + f", {spec.steps} steps"
        table.add_row(spec.name, size, f"{spec.pipeline_class}: {spec.description}")
    Console().print(table)


def _quiet_libraries() -> None:
    """Reduce diffusers/transformers logging to errors, so that warnings do not bury diffaccel's own output."""
    if os.environ.get("DIFFACCEL_VERBOSE", "") not in ("", "0"):
        return
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        module = sys.modules.get(name)
        if module is not None:
            module.set_verbosity_error()


def _fail(message: str, code: int = 2) -> None:
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    raise SystemExit(code)


def _click_errors() -> tuple[type[Exception], type[Exception] | None]:
    """``ClickException`` and ``NoArgsIsHelpError`` of the click that typer runs on (recent typer vendors one)."""
    base = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    return base, getattr(sys.modules[base.__module__], "NoArgsIsHelpError", None)


_ARGV: list[str] | None = None
"""The arguments :func:`main` was given (``None``: ``sys.argv``), for ``--cp N`` to relaunch the same command."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app; a user error becomes one ``error: ...`` line on stderr and exit code 2."""
    import warnings

    from diffaccel.warn import install_cli_warnings

    global _ARGV
    _ARGV = list(argv) if argv is not None else None
    _quiet_libraries()
    click_error, no_args_error = _click_errors()
    previous_hook = install_cli_warnings()  # every warning as one line, no source code
    try:
        code = app(args=argv, prog_name="diffaccel", standalone_mode=False)
    except DiffAccelError as exc:
        _fail(str(exc))
    except typer.Abort:
        _fail("aborted", 130)
    except click_error as exc:  # usage errors, bad parameter values; bare `diffaccel` asks for the help
        if no_args_error is not None and isinstance(exc, no_args_error) and getattr(exc, "ctx", None) is not None:
            print(exc.ctx.get_help())
            raise SystemExit(0) from None
        _fail(exc.format_message(), getattr(exc, "exit_code", 2))
    finally:
        warnings.showwarning = previous_hook
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
