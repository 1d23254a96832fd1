"""The quality guard's sampling cost vs one dense attention call and vs the guarded method (host time, medians).

    TRITON_INTERPRET=1 python benchmarks/guard_cost.py   # CPU: reference kernels
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from diffaccel.context import RunContext  # noqa: E402
from diffaccel.layout import TokenLayout  # noqa: E402
from diffaccel.methods.base import get_method, sdpa  # noqa: E402
from diffaccel.methods.guard import QualityGuard  # noqa: E402


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    for grid, heads in (((32, 32), 8), ((64, 64), 4)):
        n = grid[0] * grid[1]
        q, k, v = (torch.randn(1, heads, n, 64) for _ in range(3))
        method = get_method("gna", kernel_size=9, block_size=64, backend="reference")
        layout, ctx = TokenLayout(n, grid), RunContext(grid=grid, layer="l")
        out = method(q, k, v, layout, ctx)
        guard = QualityGuard(method, 0.05)
        dense = median_ms(lambda: sdpa(q, k, v))
        sample = median_ms(lambda: guard.sampled_error(q, k, v, out))
        sparse = median_ms(lambda: method(q, k, v, layout, ctx))
        print(f"N={n} heads={heads} d=64: dense SDPA {dense:.1f} ms, guard sample (64 rows) {sample:.2f} ms "
              f"({100 * sample / dense:.1f}% of dense), gna reference {sparse:.1f} ms; device {torch.get_num_threads()}"
              f"-thread CPU, torch {torch.__version__}")


if __name__ == "__main__":
    main()
