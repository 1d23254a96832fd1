#!/usr/bin/env python
"""Kernel benchmark without the CLI: the same function and options as ``diffaccel bench kernels``.

    python benchmarks/bench_kernels.py --quick                                  # 2 shapes, densities 1 and 0.25
    python benchmarks/bench_kernels.py --shape flux-1024 sd35-1024 cogx-720 --merge
    python benchmarks/bench_kernels.py --shape wan13-480 wan14-720 hyv-720 --merge
    python benchmarks/bench_kernels.py --help

Results go to <out>/<date>-<device>-kernels.{json,md,png}, <out> = --out, default outputs/bench of the
current folder (--out benchmarks/results for the committed results; see benchmarks/README.md).
Needs torch and triton; diffusers is not needed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from diffaccel.bench.kernels import main  # noqa: E402
from diffaccel.errors import DiffAccelError  # noqa: E402

if __name__ == "__main__":
    try:
        main(sys.argv[1:], prog="python benchmarks/bench_kernels.py")
    except DiffAccelError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
