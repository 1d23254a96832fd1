"""`diffaccel bench ...` commands (kernel, locality and end-to-end benchmarks).

``diffaccel bench kernels`` takes the options of :func:`diffaccel.bench.kernels.build_arg_parser` (the same
parser as ``python benchmarks/bench_kernels.py``), so both accept ``--shape flux-1024 wan13-480 --density 1 0.5``.
"""

import typer

bench_app = typer.Typer(
    help="Benchmarks: kernels against SDPA, FlexAttention and other baselines.", no_args_is_help=True
)


@bench_app.command(
    "kernels",
    # The options belong to one argparse parser shared with benchmarks/bench_kernels.py (it takes several values
    # per option, which click does not); typer passes every argument through, --help included.
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def kernels(ctx: typer.Context) -> None:
    """Time the block-sparse kernel (bf16, INT8) against SDPA, FlexAttention, xformers, SageAttention.

    Options: --shape NAME... --density D... --method M... --out DIR --tiny --quick --merge --block-size N
    --dtype --seed --error-rows N --device --no-flex-compile --no-plot --no-progress (run with --help for details).
    Writes <out>/<date>-<device>-kernels.json (<out> default: outputs/bench), a markdown table and a
    speedup-vs-density plot.
    """
    from diffaccel.bench.kernels import main

    main(list(ctx.args), prog="diffaccel bench kernels")


@bench_app.command(
    "locality",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def locality(ctx: typer.Context) -> None:
    """Time GNA, tile, CLEAR and MSW-MSA attention (as the processor runs it) against SDPA and FlexAttention.

    Options: --shape NAME... --method M... --out DIR --tiny --quick --dtype --seed --error-rows N --device
    --no-flex-compile --no-progress (run with --help for details).
    Writes <out>/<date>-<device>-locality[-quick|-tiny].json (<out> default: outputs/bench) and a markdown table.
    """
    from diffaccel.bench.locality import main

    main(list(ctx.args), prog="diffaccel bench locality")


def _parse_method_sets(values: list[str]) -> dict[str, dict]:
    """``METHOD.KEY=VALUE`` items (values parse as JSON, else as strings) as ``{method: {key: value}}``."""
    import json

    from diffaccel.errors import ConfigError

    params: dict[str, dict] = {}
    for item in values:
        target, sep, raw = item.partition("=")
        method, dot, key = target.partition(".")
        if not sep or not dot or not method or not key:
            raise ConfigError(f"--set {item!r}: use METHOD.KEY=VALUE, e.g. --set gna.kernel_size=16")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        params.setdefault(method, {})[key] = value
    return params


@bench_app.command("e2e")
def e2e(
    model_config: str = typer.Option(
        "flux-dev", "--model-config", help="real denoiser configuration(s), comma-separated (see --list)"
    ),
    scale: str = typer.Option("full", "--scale", help="full (real sizes) or tiny (same code, CPU-sized)"),
    height: int = typer.Option(None, "--height", help="pixels (default: the pipeline's)"),
    width: int = typer.Option(None, "--width", help="pixels (default: the pipeline's)"),
    frames: int = typer.Option(None, "--frames", help="video frames (default: the pipeline's)"),
    methods: str = typer.Option("", "--methods", help="comma-separated methods (default: every registered one)"),
    set_: list[str] = typer.Option([], "--set", help="METHOD.KEY=VALUE method parameter (repeatable)"),
    backend: str = typer.Option(None, "--backend", help="kernel backend of every method that has one: auto, triton, reference"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N"),
    steps_timed: int = typer.Option(3, "--steps-timed", help="timed rounds (each runs every method once)"),
    warmup: int = typer.Option(1, "--warmup", help="untimed steps per method first"),
    step: int = typer.Option(None, "--step", help="denoising step the methods see (default: the middle one)"),
    num_steps: int = typer.Option(None, "--num-steps", help="steps of the schedule (default: the pipeline's)"),
    seed: int = typer.Option(0, "--seed"),
    out: str = typer.Option("outputs/bench/e2e", "--out", help="output folder"),
    no_plot: bool = typer.Option(False, "--no-plot"),
    no_progress: bool = typer.Option(False, "--no-progress"),
    list_configs: bool = typer.Option(False, "--list", help="list the model configurations and exit"),
) -> None:
    """One denoising step of a full-size denoiser (real config, random weights) per method, against stock SDPA.

    Reports per method: step latency (median, min-max over alternated rounds), speedup versus the stock diffusers
    processors, attention / method-call / rest split, peak memory, density kept. Writes
    <out>/<date>-<device>-e2e-<model>[-tiny].json, .md and .png. Methods that cannot run on the model get a
    'refused' row with the reason.
    """
    from diffaccel.bench.model_configs import MODEL_CONFIGS, check_scale

    if list_configs:
        for name, mc in MODEL_CONFIGS.items():
            h, w, f = mc.size
            size = f"{h}x{w}" + (f"x{f}f" if mc.is_video else "")
            typer.echo(f"{name:14s} {mc.model_class:32s} {size:14s} {mc.source}")
        return
    check_scale(scale)
    from diffaccel.bench.model_configs import model_config as mc_lookup

    names = [m.strip() for m in model_config.split(",") if m.strip()]
    for name in names:  # every name checked before anything runs
        mc_lookup(name)
    for name in names:
        _run_e2e_one(name, scale, height, width, frames, methods, set_, backend, dtype, device, steps_timed, warmup,
                     step, num_steps, seed, out, no_plot, no_progress)  # fmt: skip


def _run_e2e_one(model_config: str, scale: str, height, width, frames, methods: str, set_: list[str], backend, dtype,
                 device, steps_timed, warmup, step, num_steps, seed, out, no_plot, no_progress) -> None:  # fmt: skip
    """One model configuration of ``diffaccel bench e2e``: run, write the outputs, print the table."""
    import shlex
    import sys

    from diffaccel.bench.e2e import E2EConfig, run_e2e
    from diffaccel.bench.e2e_report import render_markdown, write_outputs

    cfg = E2EConfig(
        model_config=model_config, scale=scale, height=height, width=width, frames=frames,
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()) or None,
        method_params=_parse_method_sets(set_), backend=backend, dtype=dtype, device=device, rounds=steps_timed,
        warmup=warmup, step=step, num_steps=num_steps, seed=seed, progress=not no_progress,
        command="diffaccel bench e2e " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("e2e") + 1:])
        if "e2e" in sys.argv else "diffaccel bench e2e (API)",
    )  # fmt: skip
    doc = run_e2e(cfg)
    paths = write_outputs(doc, out, plot=not no_plot)
    typer.echo(render_markdown(doc))
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))
