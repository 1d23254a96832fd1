"""A quality guard around any method: layers whose output breaks an error budget fall back to dense.

On the first call of each layer where the wrapped method runs its own attention (not a dense step or a dense
fallback), the guard computes exact attention for a random sample of query rows against ALL keys (cost:
``sample_rows / num_queries`` of one dense attention) and the relative L1 error of the method's output on those
rows, ``sum|out - ref| / sum|ref|``. A layer above the budget runs dense for the rest of the run (until
:meth:`QualityGuard.reset`); the others keep the method. :meth:`QualityGuard.report` tells which layers fell back,
their measured errors, the density actually kept and the guard's own cost.

The estimate is unbiased for the L1 error over all rows (uniform row sampling); with ``sample_rows`` of 64 its
spread is small next to budgets of a few percent (the tests check diffuse vs local attention on both sides).
Method-agnostic: it needs only the method's output, so it wraps every method, existing and future.
Idea: per-layer error-budget fallbacks as in SpargeAttn's per-layer hyper-parameter search (Zhang et al., 2025,
"SpargeAttn: Accurate Sparse Attention Accelerating Any Model Inference"), here measured online, once per layer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import sdpa

DEFAULT_SAMPLE_ROWS = 64


def check_budget(budget: Any) -> float:
    """``guard`` must be a finite number > 0 (a relative L1 error, e.g. 0.05 for 5 %)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ConfigError(
            f"guard must be a relative L1 error budget > 0 (e.g. 0.05 for 5 %), got {budget!r}; omit it (None) to "
            "run without the quality guard"
        )
    return float(budget)


@dataclass
class LayerVerdict:
    """What the guard measured on one layer."""

    error: float
    fell_back: bool
    density: float | None
    """Fraction of key blocks the method kept on the measured call (``kept_blocks``), 1.0 once dense, ``None``
    for a method that keeps no block mask."""


@dataclass
class GuardReport:
    budget: float
    layers: dict[str, LayerVerdict] = field(default_factory=dict)
    sample_seconds: float = 0.0
    """Host time of the sampled dense rows (and the error), all layers together."""
    method_seconds: float = 0.0
    """Host time of the method's calls that the guard measured, for comparison."""

    @property
    def fell_back(self) -> list[str]:
        return [name for name, v in self.layers.items() if v.fell_back]

    @property
    def kept_density(self) -> float | None:
        """Mean density over the measured layers (fallen-back layers count as 1.0); ``None`` when unknown."""
        values = [1.0 if v.fell_back else v.density for v in self.layers.values()]
        if not values or any(d is None for d in values):
            return None
        return sum(values) / len(values)

    def summary(self) -> str:
        if not self.layers:
            return f"guard {self.budget:g}: no layer measured (the method never ran its own attention)"
        worst = max(self.layers.items(), key=lambda item: item[1].error)
        density = self.kept_density
        lines = [
            f"guard {self.budget:g}: {len(self.fell_back)} of {len(self.layers)} layers fell back to dense"
            + (f" ({', '.join(self.fell_back)})" if self.fell_back else "")
            + f"; worst error {worst[1].error:.3g} ({worst[0]})"
            + ("" if density is None else f"; density kept {density:.2f}")
            + f"; sampling cost {self.sample_seconds * 1e3:.1f} ms vs {self.method_seconds * 1e3:.1f} ms in the "
            "measured method calls",
        ]
        return "\n".join(lines)


class QualityGuard:
    """Wraps ``method``; see the module docstring.

    Args:
        method: the method to guard (any :class:`~diffaccel.methods.base.AttentionMethod`).
        budget: the largest relative L1 error a layer may have, e.g. ``0.05``.
        sample_rows: query rows sampled per measured layer (all rows when the call has fewer).
        seed: seed of the row sampler (a generator of its own: the run's random state is untouched).
    """

    def __init__(self, method: Any, budget: float, *, sample_rows: int = DEFAULT_SAMPLE_ROWS, seed: int = 0) -> None:
        self.budget = check_budget(budget)
        if isinstance(sample_rows, bool) or not isinstance(sample_rows, int) or sample_rows < 1:
            raise ConfigError(f"sample_rows must be an integer >= 1, got {sample_rows!r}")
        self.method = method
        self.sample_rows = sample_rows
        self.seed = seed
        self._report = GuardReport(budget=self.budget)
        self._dense: set[str] = set()

    # the processor and the run read these from the method it wraps
    @property
    def config(self) -> Any:
        return self.method.config

    @property
    def name(self) -> str:
        return getattr(self.method, "name", type(self.method).__name__)

    def __getattr__(self, item: str) -> Any:  # call_counts, kept_blocks, overhead, ... of the wrapped method
        if item == "method":
            raise AttributeError(item)
        return getattr(self.method, item)

    def reset(self) -> None:
        """Forget the verdicts: the next call of each layer is measured again."""
        self._report = GuardReport(budget=self.budget)
        self._dense.clear()

    def report(self) -> GuardReport:
        return self._report

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        ctx: RunContext,
        *,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        layer = ctx.layer or ""
        if layout.is_cross or not layout.has_grid:
            return self.method(q, k, v, layout, ctx, attn_mask=attn_mask, scale=scale)
        if layer in self._dense:
            counts = getattr(self.method, "call_counts", None)
            if counts is not None:
                counts.dense += 1
            return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
        if layer in self._report.layers:
            return self.method(q, k, v, layout, ctx, attn_mask=attn_mask, scale=scale)
        counts = getattr(self.method, "call_counts", None)
        ran_before = None if counts is None else counts.method
        start = time.perf_counter()
        out = self.method(q, k, v, layout, ctx, attn_mask=attn_mask, scale=scale)
        method_time = time.perf_counter() - start
        if counts is not None and counts.method == ran_before:
            return out  # this call ran dense (a warm-up step, a fallback): measure the first call that does not
        start = time.perf_counter()
        error = self.sampled_error(q, k, v, out, attn_mask=attn_mask, scale=scale)
        self._report.sample_seconds += time.perf_counter() - start
        self._report.method_seconds += method_time
        fell_back = not error <= self.budget  # a NaN error falls back too
        density = None
        kept = getattr(self.method, "kept_blocks", None)
        mask = kept(layer) if callable(kept) else None
        if mask is not None:
            density = float(mask.float().mean())
        self._report.layers[layer] = LayerVerdict(error=error, fell_back=fell_back, density=density)
        if fell_back:
            self._dense.add(layer)
            if counts is not None:  # this call's output is replaced by dense: count it so
                counts.method -= 1
                counts.dense += 1
            return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
        return out

    def sampled_error(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *,
        attn_mask: torch.Tensor | None = None, scale: float | None = None,
    ) -> float:
        """Relative L1 error of ``out`` against exact attention on ``sample_rows`` random query rows."""
        n = q.shape[2]
        if self.sample_rows >= n:
            rows = torch.arange(n, device=q.device)
        else:
            g = torch.Generator().manual_seed(self.seed)
            rows = torch.randperm(n, generator=g)[: self.sample_rows].sort().values.to(q.device)
        mask = attn_mask
        if mask is not None and mask.ndim >= 2 and mask.shape[-2] == n:
            mask = mask.index_select(-2, rows)
        ref = sdpa(q.index_select(2, rows), k, v, attn_mask=mask, scale=scale).float()
        got = out.index_select(2, rows).float()
        denom = ref.abs().sum()
        return float((got - ref).abs().sum() / denom) if float(denom) > 0 else float((got - ref).abs().sum())

    def __repr__(self) -> str:
        return f"QualityGuard({self.method!r}, budget={self.budget:g})"
