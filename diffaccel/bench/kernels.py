"""Kernel benchmark: our block-sparse attention (bf16 and INT8) against the attention kernels it must beat.

Protocol (benchmarks/README.md): per attention shape (diffaccel.bench.shapes) and key-block density, one random
block mask (diagonal kept, independent per head; :mod:`diffaccel.bench.random_masks`) is built once as a torch
``BlockMask`` and given to both FlexAttention and our kernel, so the two sparse kernels skip exactly the same
tiles. Dense baselines (``F.scaled_dot_product_attention`` on each backend, xformers, SageAttention) are timed once
per shape. Runners are in :mod:`diffaccel.bench.runners`, inputs, timing and the float32 reference in
:mod:`diffaccel.bench.measure`, the JSON / markdown / plot in :mod:`diffaccel.bench.report`; this module holds
the configuration, the plan of the run, the speedups and targets, and the command line.

Each measurement is wrapped: a baseline that is missing or fails becomes a row with the reason, never a crash.
Results: ``<out>/<date>-<device>-kernels.json`` (versions, device, command line, rows; ``--out`` defaults to
``outputs/bench``), a markdown table and a speedup-vs-density plot next to it.

    python benchmarks/bench_kernels.py --shape flux-1024 wan13-480 --density 1 0.5 0.25 0.1
    diffaccel bench kernels --quick
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffaccel.bench import report
from diffaccel.bench.measure import make_inputs, measure, progress_bar, reference_rows
from diffaccel.bench.options import DEFAULT_OUT, common_parser
from diffaccel.bench.random_masks import BenchMask, MaskModSlot, random_block_mask
from diffaccel.bench.report import BASELINES, merge_results, output_stem, render_plot
from diffaccel.bench.runners import (
    OURS_METHODS,
    SDPA_BACKENDS,
    Runner,
    first_line,
    flex_attention_fn,
    flex_runner,
    ours_runner,
    sage_runner,
    sdpa_runner,
    xformers_runner,
)
from diffaccel.bench.shapes import SHAPES, TINY_SHAPES, AttentionShape, get_shape
from diffaccel.errors import ConfigError

__all__ = [
    "BASELINES",
    "DEFAULT_DENSITIES",
    "METHODS",
    "SDPA_BACKENDS",
    "BenchMask",
    "KernelBenchConfig",
    "MaskModSlot",
    "Runner",
    "build_arg_parser",
    "flex_attention_fn",
    "main",
    "merge_results",
    "output_stem",
    "random_block_mask",
    "render_markdown",
    "render_plot",
    "run_kernel_bench",
    "write_outputs",
]

DEFAULT_DENSITIES = (1.0, 0.5, 0.25, 0.1)
QUICK_SHAPES = ("flux-1024", "wan13-480")
QUICK_DENSITIES = (1.0, 0.25)
METHODS = ("sdpa", "flex", "xformers", "sage", *OURS_METHODS)
SPARSE_METHODS = ("flex", *OURS_METHODS)
DENSE_METHODS = ("sdpa", "xformers", "sage")
_FULL_BLOCK, _TINY_BLOCK = 128, 16


# ---------------------------------------------------------------------------------------------- configuration


@dataclass
class KernelBenchConfig:
    """What to run. Empty/None fields take device-dependent defaults (see :meth:`resolved`)."""

    shapes: tuple[str, ...] = ()  # empty: every full-size shape on CUDA, every tiny shape otherwise
    densities: tuple[float, ...] = ()  # empty: DEFAULT_DENSITIES (QUICK_DENSITIES with quick)
    methods: tuple[str, ...] = METHODS
    out_dir: Path = DEFAULT_OUT
    tiny: bool = False  # tiny shapes only (implied without CUDA)
    quick: bool = False  # short run: fewer shapes, densities, repetitions and error rows
    block_size: int | None = None  # block mask granularity; None: 128 (16 for tiny shapes)
    dtype: str = "bfloat16"
    seed: int = 0
    error_rows: int | None = None  # query rows per head for the error; None: 2048 (512 with quick)
    flex_compile: bool | None = None  # None: torch.compile(flex_attention) on CUDA, eager on CPU
    device: str | None = None  # None: cuda when available, else cpu
    write: bool = True
    merge: bool = False  # keep the other shapes of an existing result file of the same name
    plot: bool = True
    progress: bool = True
    command: str | None = None  # recorded in the JSON; None: this process's argv

    def resolved(self) -> KernelBenchConfig:
        """A copy with defaults filled in and every value checked (ConfigError names the bad one)."""
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.split(":")[0] not in ("cuda", "cpu"):
            raise ConfigError(f"device must be 'cuda' or 'cpu', got {device!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} was requested but CUDA is not available")
        cuda = device.startswith("cuda")
        tiny = self.tiny or not cuda
        shapes = tuple(self.shapes)
        for name in shapes:
            try:
                shape = get_shape(name)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            if not shape.tiny and not cuda:
                raise ConfigError(
                    f"shape {name!r} is full-size and needs a CUDA device; without CUDA only the tiny shapes run: "
                    f"{sorted(TINY_SHAPES)}"
                )
        if not shapes:
            shapes = tuple(TINY_SHAPES) if tiny else (QUICK_SHAPES if self.quick else tuple(SHAPES))
        elif self.tiny:
            full = [s for s in shapes if not get_shape(s).tiny]
            if full:
                raise ConfigError(f"--tiny runs only tiny shapes {sorted(TINY_SHAPES)}, got full-size {full}")
        densities = tuple(float(d) for d in self.densities) or (QUICK_DENSITIES if self.quick else DEFAULT_DENSITIES)
        for d in densities:
            if not (0.0 < d <= 1.0):
                raise ConfigError(f"density must be in (0, 1], got {d!r}")
        densities = tuple(sorted(set(densities), reverse=True))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"methods must be a non-empty subset of {list(METHODS)}, got {list(self.methods)}")
        all_tiny = all(get_shape(s).tiny for s in shapes)
        block = self.block_size or (_TINY_BLOCK if all_tiny else _FULL_BLOCK)
        if block < 16 or block & (block - 1):
            raise ConfigError(f"block_size must be a power of two >= 16, got {block!r}")
        if self.dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"dtype must be 'bfloat16' or 'float16', got {self.dtype!r}")
        rows = self.error_rows if self.error_rows is not None else (512 if self.quick else 2048)
        if rows < 1:
            raise ConfigError(f"error_rows must be >= 1, got {rows!r}")
        return KernelBenchConfig(
            shapes=shapes,
            densities=densities,
            methods=tuple(dict.fromkeys(self.methods)),
            out_dir=Path(self.out_dir),
            tiny=tiny,
            quick=self.quick,
            block_size=block,
            dtype=self.dtype,
            seed=self.seed,
            error_rows=rows,
            flex_compile=cuda if self.flex_compile is None else self.flex_compile,
            device=device,
            write=self.write,
            merge=self.merge,
            plot=self.plot,
            progress=self.progress,
            command=self.command if self.command is not None else shlex.join([sys.executable, *sys.argv]),
        )


# ----------------------------------------------------------------------------------------------------- driver


def run_kernel_bench(config: KernelBenchConfig) -> dict:
    """Run the benchmark described by ``config``; return the result document (and write it unless told not to)."""
    config = config.resolved()
    cuda = config.device.startswith("cuda")
    dtype = getattr(torch, config.dtype)
    block = config.block_size
    plan = _plan(config)

    result: dict[str, Any] = {
        "kind": "kernels",
        "meta": report.environment(config.device, bool(config.flex_compile), config.command),
        "config": _config_dict(config),
        "shapes": {},
        "rows": [],
    }
    progress = progress_bar(total=len(plan), enabled=config.progress)
    try:
        for shape_name in config.shapes:
            shape = get_shape(shape_name)
            scale = 1.0 / math.sqrt(shape.head_dim)
            progress.set_description(f"{shape.name}: inputs")
            inputs = make_inputs(shape, config, dtype, scale)
            shape_rows: list[dict] = []
            result["shapes"][shape.name] = {
                **shape.as_dict(),
                "input_sets": len(inputs.sets),
                "input_set_bytes": inputs.set_bytes,
                "error_rows_per_head": int(inputs.rows.numel()),
                "block_size": block,
                "run": {"date": result["meta"]["date"], "command": config.command},
            }
            dense_methods = [m for m in DENSE_METHODS if m in config.methods]
            for method in dense_methods:
                factories = _dense_factories(method, scale, shape, dtype, cuda)
                for name, factory in factories:
                    progress.set_description(f"{shape.name}: {name}")
                    shape_rows.append(
                        measure(factory, name, shape, inputs, config, density_target=1.0, mask=None, masked_ref=None)
                    )
                progress.update(1)
            mask_gen = torch.Generator(device=config.device).manual_seed(config.seed + 2)
            n_blocks = -(-shape.tokens // block)
            slot = MaskModSlot((shape.batch, shape.heads, n_blocks, n_blocks), block, config.device)
            for density in config.densities:
                progress.set_description(f"{shape.name}: mask d={density:g}")
                mask_or_error = _try(
                    lambda: random_block_mask(
                        shape.batch, shape.heads, shape.tokens, shape.tokens, block, density,
                        generator=mask_gen, device=config.device, slot=slot,
                    )
                )  # fmt: skip
                masked_ref = None
                if isinstance(mask_or_error, BenchMask):
                    q, k, v = inputs.sets[0]
                    masked_ref = reference_rows(q, k, v, inputs.rows, scale, mask_or_error)
                for method in (m for m in SPARSE_METHODS if m in config.methods):
                    progress.set_description(f"{shape.name}: {method} d={density:g}")
                    if isinstance(mask_or_error, BenchMask):
                        mask = mask_or_error
                        factory = _sparse_factory(method, mask, scale, config.flex_compile)
                        shape_rows.append(
                            measure(
                                factory, method, shape, inputs, config,
                                density_target=density, mask=mask, masked_ref=masked_ref,
                            )
                        )  # fmt: skip
                    else:
                        shape_rows.append(_failed_row(shape, method, density, f"block mask: {mask_or_error}"))
                    progress.update(1)
            _add_speedups(shape_rows, result["shapes"][shape.name])
            if cuda and not shape.tiny:
                _add_targets(shape_rows, shape)
            result["rows"].extend(shape_rows)
            del inputs
    finally:
        progress.close()
    if config.write:
        paths = write_outputs(result, config.out_dir, plot=config.plot, merge=config.merge)
        result["files"] = {k: str(v) for k, v in paths.items()}
    return result


def _plan(config: KernelBenchConfig) -> list[tuple[str, str]]:
    dense = [m for m in DENSE_METHODS if m in config.methods]
    sparse = [m for m in SPARSE_METHODS if m in config.methods]
    return [(s, m) for s in config.shapes for m in dense + sparse * len(config.densities)]


def _dense_factories(
    method: str, scale: float, shape: AttentionShape, dtype: torch.dtype, cuda: bool
) -> list[tuple[str, Callable[[], Runner]]]:
    if method == "sdpa":
        return [
            (f"sdpa-{b}", (lambda b=b: sdpa_runner(b, scale, shape, dtype, cuda))) for b in SDPA_BACKENDS
        ]
    if method == "xformers":
        return [("xformers", lambda: xformers_runner(scale))]
    return [("sage", lambda: sage_runner(scale))]


def _sparse_factory(method: str, mask: BenchMask, scale: float, flex_compile: bool) -> Callable[[], Runner]:
    if method == "flex":
        return lambda: flex_runner(mask, scale, flex_compile)
    return lambda: ours_runner(method, mask, scale)


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as err:
        return f"{type(err).__name__}: {first_line(err)}"


def _failed_row(shape: AttentionShape, method: str, density: float, reason: str) -> dict:
    return {
        "shape": shape.name, "method": method, "density_target": density, "density_blocks": None,
        "density_kept": None, "status": "error", "reason": reason, "detail": "", "ms": None,
        "tflops_dense_equiv": None, "tflops_kept": None, "rel_l2_vs_dense_fp32": None,
        "rel_l2_vs_masked_fp32": None,
    }  # fmt: skip


def _add_speedups(rows: list[dict], shape_info: dict) -> None:
    """``row["speedup"][baseline] = baseline_ms / row_ms`` against baselines measured in this same run.

    "sdpa" is the fastest SDPA backend (named in the shape's ``sdpa_best``); "flex" and "ours-bf16" are taken at
    the same target density (same block mask) as the row; xformers and SageAttention are dense.
    """
    ok = [r for r in rows if r["status"] == "ok" and r["ms"]]
    sdpa = [r for r in ok if r["method"].startswith("sdpa-")]
    best_sdpa = min(sdpa, key=lambda r: r["ms"]) if sdpa else None
    shape_info["sdpa_best"] = best_sdpa["method"] if best_sdpa else None
    dense = {r["method"]: r for r in ok if r["method"] in ("xformers", "sage")}
    at_density = {(r["method"], r["density_target"]): r for r in ok if r["method"] in SPARSE_METHODS}
    ok_ids = {id(r) for r in ok}
    for row in rows:
        row["speedup"] = {}
        if id(row) not in ok_ids:
            continue
        if row["method"].startswith("sdpa-"):
            continue  # the baseline itself
        candidates = {"sdpa": best_sdpa}
        if row["method"].startswith("ours-"):
            candidates.update(
                xformers=dense.get("xformers"),
                sage=dense.get("sage"),
                flex=at_density.get(("flex", row["density_target"])),
            )
            if row["method"] != "ours-bf16":
                candidates["ours-bf16"] = at_density.get(("ours-bf16", row["density_target"]))
        for name, base in candidates.items():
            if base is not None:
                row["speedup"][name] = base["ms"] / row["ms"]


def _add_targets(rows: list[dict], shape: AttentionShape) -> None:
    """The H100 targets of the benchmark protocol, checked on our rows (full-size shapes on CUDA only)."""
    for row in rows:
        if row["status"] != "ok" or not row["method"].startswith("ours-"):
            continue
        checks = []
        speed = row["speedup"]
        d = row["density_blocks"]
        if row["method"] == "ours-bf16":
            if d >= 1.0 and "sdpa" in speed:
                checks.append(("dense vs best SDPA", speed["sdpa"], 0.9))
            elif shape.tokens >= 16384 and "sdpa" in speed:
                checks.append(("vs best SDPA >= 0.85/d", speed["sdpa"], 0.85 / d))
            if "flex" in speed:
                checks.append(("vs FlexAttention, same mask", speed["flex"], 1.2))
        elif row["method"] == "ours-int8" and d >= 1.0:
            if "ours-bf16" in speed:
                checks.append(("INT8 vs our bf16, dense", speed["ours-bf16"], 1.25))
            if row["rel_l2_vs_dense_fp32"] is not None:
                err = row["rel_l2_vs_dense_fp32"]
                row["targets"] = [
                    {"name": "INT8 rel. L2 error <= 2e-2", "value": err, "target": 2e-2, "met": err <= 2e-2}
                ]
        row.setdefault("targets", [])
        row["targets"] += [{"name": n, "value": v, "target": t, "met": v >= t} for n, v, t in checks]




# ---------------------------------------------------------------------------------------------------- outputs


def _config_dict(config: KernelBenchConfig) -> dict:
    """The resolved configuration as the JSON's ``config``."""
    return {
        "shapes": list(config.shapes),
        "densities": list(config.densities),
        "methods": list(config.methods),
        "tiny": config.tiny,
        "quick": config.quick,
        "block_size": config.block_size,
        "dtype": config.dtype,
        "seed": config.seed,
        "error_rows": config.error_rows,
    }



def write_outputs(result: dict, out_dir: Path | str, *, plot: bool = True, merge: bool = False) -> dict[str, Path]:
    """The kernel result's JSON, markdown table and (with ``plot``) plot in ``out_dir``; see
    :func:`diffaccel.bench.report.write_outputs` (``merge`` keeps the other shapes of today's file)."""
    return report.write_outputs(result, out_dir, plot=plot, merge=merge)


def render_markdown(result: dict) -> str:
    """The kernel result as markdown: one table per shape, then the targets."""
    return report.render_kernels_markdown(result)


# -------------------------------------------------------------------------------------------------------- CLI


def build_arg_parser(prog: str = "diffaccel bench kernels") -> argparse.ArgumentParser:
    """The one option parser of the kernel benchmark (used by the CLI and by benchmarks/bench_kernels.py)."""
    parser = common_parser(
        prog,
        "Time diffaccel's block-sparse attention (bf16, INT8) against SDPA (best backend), "
        "FlexAttention with the same block mask, xformers and SageAttention; write JSON, markdown and a plot.",
        methods=METHODS,
        quick_help="short run: 2 shapes, 2 densities, fewer repetitions",
    )
    parser.add_argument(
        "--density", nargs="+", type=float, default=[], metavar="D", help="key-block densities in (0, 1]"
    )
    parser.add_argument("--block-size", type=int, default=None, help="block mask granularity (default 128; 16 tiny)")
    parser.add_argument(
        "--merge", action="store_true", help="keep the other shapes of today's result file for this device (split runs)"
    )
    parser.add_argument("--no-plot", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace, command: str | None = None) -> KernelBenchConfig:
    """The configuration that parsed options describe (``command`` is recorded in the JSON)."""
    return KernelBenchConfig(
        shapes=tuple(args.shape),
        densities=tuple(args.density),
        methods=tuple(args.method),
        out_dir=args.out,
        tiny=args.tiny,
        quick=args.quick,
        block_size=args.block_size,
        dtype=args.dtype,
        seed=args.seed,
        error_rows=args.error_rows,
        flex_compile=False if args.no_flex_compile else None,
        device=args.device,
        merge=args.merge,
        plot=not args.no_plot,
        progress=not args.no_progress,
        command=command,
    )


def main(argv: Sequence[str] | None = None, *, prog: str = "diffaccel bench kernels") -> dict:
    """Parse ``argv``, run, print where the results went and a one-line summary per shape; return the result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_arg_parser(prog).parse_args(argv)
    result = run_kernel_bench(config_from_args(args, command=" ".join([prog, shlex.join(argv)]).strip()))
    for name, info in result["shapes"].items():
        rows = [r for r in result["rows"] if r["shape"] == name]
        failed = sum(r["status"] != "ok" for r in rows)
        print(f"{name}: {len(rows) - failed} rows ok, {failed} not run (see notes); best SDPA: {info.get('sdpa_best')}")
    for kind, path in result.get("files", {}).items():
        print(f"{kind}: {path}")
    return result
