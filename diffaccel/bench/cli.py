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
