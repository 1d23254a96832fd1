"""The command-line options the kernel and locality benchmarks share (one builder, two parsers).

``diffaccel bench kernels`` / ``bench locality`` and ``benchmarks/bench_*.py`` parse with the parsers built here,
so the same options mean the same thing everywhere. Results go under ``--out`` (default :data:`DEFAULT_OUT`,
relative to the current folder), never into the source tree.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from diffaccel.bench.shapes import SHAPES, TINY_SHAPES

__all__ = ["DEFAULT_OUT", "common_parser"]

DEFAULT_OUT = Path("outputs/bench")
"""Where results go without ``--out``."""


def common_parser(prog: str, description: str, *, methods: Sequence[str], quick_help: str) -> argparse.ArgumentParser:
    """A parser with the options both benchmarks take: shapes, methods (from ``methods``), output folder, tiny and
    quick runs, dtype, seed, error rows, device, eager FlexAttention, progress bar. Callers add their own."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    all_shapes = [*SHAPES, *TINY_SHAPES]
    parser.add_argument("--shape", nargs="+", default=[], metavar="NAME", help=f"shapes to run, from {all_shapes}")
    parser.add_argument(
        "--method", nargs="+", default=list(methods), choices=methods, metavar="M", help=f"methods, from {list(methods)}"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT}/)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes only (implied without CUDA)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--error-rows", type=int, default=None, help="query rows per head for the error")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--no-flex-compile", action="store_true", help="run FlexAttention eagerly")
    parser.add_argument("--no-progress", action="store_true")
    return parser
