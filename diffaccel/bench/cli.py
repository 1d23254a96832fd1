"""`diffaccel bench ...` commands (kernel and end-to-end benchmarks)."""

import typer

bench_app = typer.Typer(help="Benchmarks: kernels against SDPA, FlexAttention and other baselines.", no_args_is_help=True)
