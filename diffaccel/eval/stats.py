"""Aggregates over samples: the mean with a 95 % confidence interval (Student's t), and the median.

The interval is ``mean +- t_{0.975, n-1} * sd / sqrt(n)`` over the per-sample values, the usual interval for a
mean of independent samples (prompts x seeds are independent draws; speedups are per-sample ratios dense/method
measured back to back, so machine drift cancels in each ratio). Non-finite values (PSNR ``inf`` of identical
outputs) are not averaged: the aggregate then says how many samples were infinite.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
"""Two-sided 95 % quantiles of Student's t by degrees of freedom (used when SciPy is not installed)."""


def t_quantile(df: int) -> float:
    """``t_{0.975}`` with ``df`` degrees of freedom (SciPy when present, else the table rounded down in df)."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        key = max(k for k in T_975 if k <= df) if df >= 1 else 1
        return T_975[key] if df <= 120 else 1.960


@dataclass(frozen=True)
class Aggregate:
    """Mean, 95 % interval (``low``, ``high``; equal to the mean for one sample), median, count of finite values
    and of infinite ones (``+inf``, e.g. the PSNR of identical outputs)."""

    mean: float | None
    low: float | None
    high: float | None
    median: float | None
    n: int
    n_inf: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self, spec: str = ".3f", suffix: str = "") -> str:
        """``12.3 [11.9, 12.7]``, ``inf`` when every sample was infinite, ``-`` without values."""
        if self.mean is None:
            return "inf" if self.n_inf else "-"
        text = f"{format(self.mean, spec)}{suffix}"
        if self.n > 1:
            text += f" [{format(self.low, spec)}, {format(self.high, spec)}]"
        if self.n_inf:
            text += f" (+{self.n_inf} inf)"
        return text


def aggregate(values: Sequence[float | None]) -> Aggregate:
    """The :class:`Aggregate` of ``values`` (``None`` entries are ignored, ``inf`` counted apart)."""
    present = [float(v) for v in values if v is not None]
    if any(math.isnan(v) for v in present):
        raise ValueError("a metric value is NaN: refusing to aggregate it")
    finite = [v for v in present if math.isfinite(v)]
    n_inf = sum(1 for v in present if math.isinf(v))
    if not finite:
        return Aggregate(None, None, None, None, 0, n_inf)
    mean = statistics.fmean(finite)
    if len(finite) == 1:
        return Aggregate(mean, mean, mean, mean, 1, n_inf)
    half = t_quantile(len(finite) - 1) * statistics.stdev(finite) / math.sqrt(len(finite))
    return Aggregate(mean, mean - half, mean + half, statistics.median(finite), len(finite), n_inf)
