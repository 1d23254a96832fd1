"""Measurement shared by the kernel and locality benchmarks: inputs, the float32 reference, timing, one row.

Inputs are random normal, rotated over several sets when one set would sit in L2 (what a real layer sees: cold
inputs). The error of every output is its relative L2 distance to float32 attention (TF32 off) on a fixed random
subset of query rows of every head. Times are medians: ``triton.testing.do_bench`` on CUDA, ``time.perf_counter``
on the CPU (tiny shapes only, a smoke test). :func:`measure` wraps one runner: every failure becomes the row's
status and reason, never a crash.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from diffaccel.bench.random_masks import BenchMask, MaskStats
from diffaccel.bench.runners import Runner, Skipped, Unavailable, first_line
from diffaccel.bench.shapes import AttentionShape

__all__ = [
    "Inputs",
    "MeasureSettings",
    "make_inputs",
    "measure",
    "no_tf32",
    "progress_bar",
    "reference_rows",
    "relative_l2",
    "time_ms",
]

CPU_L2_BYTES = 4 << 20
"""Nominal L2 of a CPU; only decides input rotation in CPU smoke runs."""


class MeasureSettings(Protocol):
    """What inputs and measurements read from a resolved benchmark configuration."""

    device: str
    seed: int
    quick: bool
    error_rows: int




def reference_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    scale: float,
    mask: BenchMask | None = None,
    *,
    keep: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """float32 attention output of the query ``rows`` of every (batch, head): (B, H, len(rows), d).

    One (batch, head) at a time so the (rows x N_k) float32 scores are the largest buffer; with ``mask`` the
    key blocks that are not kept get -inf logits (what the block-sparse kernels compute); with ``keep`` (an
    element mask: ``keep(b, h, rows)`` is a (len(rows), N_k) bool tensor) the keys it drops get -inf.
    """
    batch, heads = q.shape[:2]
    out = torch.empty((batch, heads, rows.numel(), q.shape[-1]), dtype=torch.float32, device=q.device)
    if mask is not None:
        col_block = torch.arange(k.shape[-2], device=q.device) // mask.block_size
        row_block = rows // mask.block_size
    with no_tf32():
        for b, h in itertools.product(range(batch), range(heads)):
            s = torch.matmul(q[b, h, rows].float(), k[b, h].float().t()) * scale
            if mask is not None:
                allowed = mask.blocks[b, h][row_block][:, col_block]
                s.masked_fill_(~allowed, float("-inf"))
            if keep is not None:
                s.masked_fill_(~keep(b, h, rows), float("-inf"))
            out[b, h] = torch.matmul(torch.softmax(s, dim=-1), v[b, h].float())
    return out


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """The float32 reference must be float32 (TF32 would put its own 1e-3 error into every comparison)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    if previous:
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        if previous:
            torch.backends.cuda.matmul.allow_tf32 = previous


def relative_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float32."""
    return float((out.float() - ref).norm() / ref.norm())



@dataclass
class Inputs:
    """The input sets of one shape, the query rows the error is measured on and the dense reference there."""

    sets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    rows: torch.Tensor  # query rows on which the error is measured
    dense_ref: torch.Tensor  # float32 dense attention at those rows (input set 0)
    set_bytes: int


def make_inputs(shape: AttentionShape, config: MeasureSettings, dtype: torch.dtype, scale: float) -> Inputs:
    """Random normal (q, k, v) sets for ``shape`` (seeded by ``config.seed``), the error rows and their reference."""
    device = torch.device(config.device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    dims = (shape.batch, shape.heads, shape.tokens, shape.head_dim)
    set_bytes = 3 * math.prod(dims) * (torch.finfo(dtype).bits // 8)
    l2 = CPU_L2_BYTES
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    # Rotate enough sets that one pass over them overflows L2 twice (what a real layer sees: cold inputs).
    n_sets = 1 if set_bytes >= l2 else min(8, math.ceil(2 * l2 / set_bytes))
    if config.quick:
        n_sets = min(n_sets, 2)
    sets = [
        tuple(torch.randn(dims, generator=generator, device=device, dtype=dtype) for _ in range(3))
        for _ in range(n_sets)
    ]
    n_rows = min(shape.tokens, config.error_rows)
    row_gen = torch.Generator(device="cpu").manual_seed(config.seed + 1)
    rows = torch.randperm(shape.tokens, generator=row_gen)[:n_rows].sort().values.to(device)
    q, k, v = sets[0]
    return Inputs(sets=sets, rows=rows, dense_ref=reference_rows(q, k, v, rows, scale), set_bytes=set_bytes)


def time_ms(call: Callable, prepared: list[tuple], cuda: bool, quick: bool) -> float:
    """Median milliseconds per call, cycling through the prepared input sets."""
    cycle = itertools.cycle(prepared)
    if cuda:
        import triton.testing

        return float(
            triton.testing.do_bench(
                lambda: call(*next(cycle)),
                warmup=10 if quick else 25,
                rep=30 if quick else 100,
                return_mode="median",
            )
        )
    # On CPU (a smoke run) the caller's first call, whose output is checked, was the warm-up.
    times = []
    for _ in range(2 if quick else 5):
        args = next(cycle)
        start = time.perf_counter()
        call(*args)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(
    make_runner: Callable[[], Runner],
    method: str,
    shape: AttentionShape,
    inputs: Inputs,
    config: MeasureSettings,
    *,
    density_target: float,
    mask: MaskStats | None,
    masked_ref: torch.Tensor | None,
) -> dict:
    """Run one method on one shape (and mask); every failure becomes the row's status and reason."""
    cuda = config.device.startswith("cuda")
    total_pairs = float(shape.batch * shape.heads * shape.tokens * shape.tokens)
    kept_pairs = mask.kept_pairs if mask is not None else total_pairs
    row: dict[str, Any] = {
        "shape": shape.name,
        "method": method,
        "density_target": density_target,
        "density_blocks": mask.density_blocks if mask is not None else 1.0,
        "density_kept": kept_pairs / total_pairs,
        "status": "ok",
        "reason": None,
        "detail": "",
        "ms": None,
        "tflops_dense_equiv": None,
        "tflops_kept": None,
        "rel_l2_vs_dense_fp32": None,
        "rel_l2_vs_masked_fp32": None,
    }
    try:
        runner = make_runner()
        row["detail"] = runner.detail
        prepared = [runner.prepare(s) for s in inputs.sets]
        with runner.context():
            out = runner.output(runner.call(*prepared[0]))  # also the warm-up: compilation, autotuning
            if cuda:
                torch.cuda.synchronize()
            out_rows = out[:, :, inputs.rows].float()
            del out
            if not bool(torch.isfinite(out_rows).all()):
                row["status"], row["reason"] = "error", "output has NaN or Inf"
            else:
                row["rel_l2_vs_dense_fp32"] = relative_l2(out_rows, inputs.dense_ref)
                if masked_ref is not None:
                    row["rel_l2_vs_masked_fp32"] = relative_l2(out_rows, masked_ref)
            del out_rows
            ms = time_ms(runner.call, prepared, cuda, config.quick)
        row["ms"] = ms
        flops_per_pair = 4.0 * shape.head_dim
        row["tflops_dense_equiv"] = flops_per_pair * total_pairs / (ms * 1e-3) / 1e12
        row["tflops_kept"] = flops_per_pair * kept_pairs / (ms * 1e-3) / 1e12
    except Unavailable as err:
        row["status"], row["reason"] = "unavailable", str(err)
    except Skipped as err:
        row["status"], row["reason"] = "skipped", str(err)
    except Exception as err:  # a failing baseline must not end the run: record why
        unsupported = any(s in str(err) for s in ("No available kernel", "No viable backend"))
        row["status"] = "unavailable" if unsupported else "error"
        row["reason"] = f"{type(err).__name__}: {first_line(err)}"
    finally:
        if cuda:
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
    return row




class _NoProgress:
    """The progress bar's interface, doing nothing (``--no-progress``)."""

    def set_description(self, _: str) -> None: ...
    def update(self, _: int) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr over ``total`` runs, or a silent stand-in."""
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
