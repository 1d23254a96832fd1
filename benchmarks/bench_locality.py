#!/usr/bin/env python
"""Locality benchmark without the CLI: the same function and options as ``diffaccel bench locality``.

    python benchmarks/bench_locality.py --quick                      # flux-1024 and wan13-480
    python benchmarks/bench_locality.py --shape cogx-720 wan14-720 hyv-720 --method gna tile
    python benchmarks/bench_locality.py --help

Results go to <out>/<date>-<device>-locality[-quick|-tiny].{json,md}, <out> = --out, default outputs/bench of the
current folder (--out benchmarks/results for the committed results; see benchmarks/README.md).
Needs torch and triton; diffusers is not needed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from diffaccel.bench.locality import main  # noqa: E402
from diffaccel.errors import DiffAccelError  # noqa: E402

if __name__ == "__main__":
    try:
        main(sys.argv[1:], prog="python benchmarks/bench_locality.py")
    except DiffAccelError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
