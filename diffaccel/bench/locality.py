"""Locality benchmark: the attention of GNA, attention tiles, CLEAR and MSW-MSA against SDPA and FlexAttention.

Per attention shape (diffaccel.bench.shapes) each locality method runs with its default configuration for the
shape's grid (GNA: the GNA paper's preset for the grid's rank; tile: video grids only; CLEAR: radius 16, the 2-D
circle per frame on video; MSW-MSA: HiDiffusion's 2x2 windows) and is timed *as the attention processor calls
it*: ``method(q, k, v, layout, ctx)``, so the time includes the token-permutation gathers of its plan. Beside it:

* ``F.scaled_dot_product_attention`` on every backend (dense; the fastest is the speedup baseline);
* FlexAttention (``torch.compile`` on CUDA) with the same mask. Where the method's plan runs the kernel in a
  permuted order (GNA tile-major, MSW window-major), Flex runs in that same order with the same block mask and
  its gathers are timed too; in sequence order (row-major plans) it gets the plan's block mask and the spec's
  ``mask_mod``; CLEAR per frame runs in sequence order with a per-frame circle ``mask_mod``. Each Flex row says
  which (``flex_mode``).

Every output is compared with float32 attention under the method's element mask (and with dense float32
attention) on a fixed random subset of query rows of every head. Timing, inputs and the error measurement
(:mod:`diffaccel.bench.measure`), SDPA backends and the compiled FlexAttention (:mod:`diffaccel.bench.runners`),
environment capture, file naming and the markdown (:mod:`diffaccel.bench.report`) and the command-line options
(:mod:`diffaccel.bench.options`) are shared with the kernel benchmark. Each measurement is wrapped: a failure
becomes a row with its reason. Results go under ``--out`` (default ``outputs/bench``).

    python benchmarks/bench_locality.py --quick
    diffaccel bench locality --shape flux-1024 wan13-480 cogx-720
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import shlex
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffaccel.bench import report
from diffaccel.bench.kernels import KernelBenchConfig
from diffaccel.bench.measure import Inputs, make_inputs, measure, progress_bar, reference_rows
from diffaccel.bench.options import DEFAULT_OUT, common_parser
from diffaccel.bench.random_masks import MaskModSlot
from diffaccel.bench.runners import (
    SDPA_BACKENDS,
    Runner,
    first_line,
    flex_attention_fn,
    quiet_eager_flex,
    sdpa_runner,
)
from diffaccel.bench.shapes import AttentionShape, get_shape
from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.kernels.masks import SparseBlockMask
from diffaccel.layout import TokenLayout

__all__ = [
    "LOCALITY_METHODS",
    "LocalityBenchConfig",
    "build_arg_parser",
    "main",
    "method_setup",
    "render_markdown",
    "run_locality_bench",
    "write_outputs",
]

LOCALITY_METHODS = ("gna", "tile", "clear", "msw")
TINY_CLEAR_RADIUS = 3.0
"""CLEAR's radius on the tiny grids: the default 16 covers an 8x8 grid (the plan would be dense SDPA)."""
# Where the text tokens sit in each model's joint attention (diffusers processors): FLUX and CogVideoX put the
# text first, SD3 and HunyuanVideo after the visual tokens. The tiny shapes cover both.
TEXT_POSITION = {
    "flux-1024": "prefix", "sd35-1024": "suffix", "cogx-720": "prefix", "hyv-720": "suffix",
    "tiny-image": "prefix", "tiny-batch2": "suffix",
}  # fmt: skip
_LAYER = "transformer_blocks.0.attn1"  # the layer name the methods see (MSW draws its shift from it)


# ---------------------------------------------------------------------------------------------- configuration


@dataclass
class LocalityBenchConfig:
    """What to run. Shapes, device, error rows and Flex compilation resolve as in the kernel benchmark."""

    shapes: tuple[str, ...] = ()  # empty: every full-size shape on CUDA (2 with quick), every tiny shape otherwise
    methods: tuple[str, ...] = LOCALITY_METHODS
    out_dir: Path = DEFAULT_OUT
    tiny: bool = False
    quick: bool = False
    dtype: str = "bfloat16"
    seed: int = 0
    error_rows: int | None = None  # None: 2048 (512 with quick)
    flex_compile: bool | None = None  # None: compiled on CUDA, eager on CPU
    device: str | None = None
    write: bool = True
    progress: bool = True
    command: str | None = None
    bench: KernelBenchConfig | None = field(default=None, repr=False)  # the resolved shared settings

    def resolved(self) -> LocalityBenchConfig:
        """A copy with defaults filled in and every value checked (ConfigError names the bad one)."""
        unknown = [m for m in self.methods if m not in LOCALITY_METHODS]
        if unknown or not self.methods:
            raise ConfigError(
                f"methods must be a non-empty subset of {list(LOCALITY_METHODS)}, got {list(self.methods)}"
            )
        shared = KernelBenchConfig(
            shapes=tuple(self.shapes), methods=("sdpa",), out_dir=Path(self.out_dir), tiny=self.tiny,
            quick=self.quick, dtype=self.dtype, seed=self.seed, error_rows=self.error_rows,
            flex_compile=self.flex_compile, device=self.device, write=False, plot=False, progress=self.progress,
            command=self.command,
        ).resolved()  # fmt: skip
        return dataclasses.replace(
            self,
            shapes=shared.shapes,
            methods=tuple(dict.fromkeys(self.methods)),
            out_dir=Path(self.out_dir),
            tiny=shared.tiny,
            error_rows=shared.error_rows,
            flex_compile=shared.flex_compile,
            device=shared.device,
            command=shared.command,
            bench=shared,
        )


# ------------------------------------------------------------------------------------------- method masks


@dataclass
class MethodSetup:
    """One locality method on one shape: the method object, its call, its element mask and the kernel plan."""

    method: Any  # the AttentionMethod (diffaccel.methods)
    layout: TokenLayout
    ctx: RunContext
    params: dict  # the resolved parameters (reported)
    plan: Any  # diffaccel.sparse.plans.AttentionPlan of the kernel launch (the method's own)
    mask_mod: Callable  # the element mask in sequence order, FlexAttention signature
    flex_mask_mod: Callable  # the same, written for torch.compile (no Python-side caches)
    per_frame: bool  # CLEAR per frame: frames folded into the batch (the plan is one frame's)
    notes: list[str] = field(default_factory=list)


def _layout(shape: AttentionShape) -> TokenLayout:
    nv, nt, n = shape.visual_tokens, shape.text_tokens, shape.tokens
    text = None
    if nt:
        text = slice(0, nt) if TEXT_POSITION.get(shape.name, "prefix") == "prefix" else slice(nv, n)
    return TokenLayout(num_tokens=n, grid=shape.grid, text=text)


def method_setup(name: str, shape: AttentionShape, device: str, heads: int | None = None) -> MethodSetup:
    """Build ``name`` with its default configuration for ``shape``'s grid, and describe its mask and plan.

    The plan is the method's own (``method.plan(layout, ctx)``), so the benchmark knows no method. Raises
    ConfigError when the method does not apply to the grid (tile on an image grid) or runs dense there.
    """
    from diffaccel.methods.base import get_method

    heads = shape.heads if heads is None else heads
    overrides: dict[str, Any] = {}
    if shape.tiny:
        overrides["block_size"] = 16
        if name == "clear":
            overrides["radius"] = TINY_CLEAR_RADIUS
    if name not in LOCALITY_METHODS:
        raise ConfigError(f"method must be one of {list(LOCALITY_METHODS)}, got {name!r}")
    method = get_method(name, **overrides)
    layout = _layout(shape)
    ctx = RunContext(grid=shape.grid, text_len=shape.text_tokens, layer=_LAYER)
    plan = method.plan(layout, ctx, heads=heads, device=device)
    if plan is None:
        raise ConfigError(f"{name} runs dense on {shape.name} (grid {shape.grid}) with its default configuration")
    params: dict[str, Any] = {"block_size": method.config.block_size, **method.plan_parameters(layout, ctx, heads=heads)}
    notes = list(_SETUP_NOTES.get(name, ()))
    per_frame = plan.folded is not None or plan.layout.startswith("per-frame")
    return MethodSetup(method, layout, ctx, params, plan, plan.mask_mod, plan.mask_mod, per_frame, notes)


_SETUP_NOTES = {"clear": ("training-free (no distilled CLEAR weights): speed and mask error only",)}


@dataclass
class MaskCounts:
    """What the kernel benchmark's rows read from a mask (:class:`diffaccel.bench.random_masks.MaskStats`)."""

    kept_pairs: float  # (query, key) pairs the element mask keeps, summed over batch and heads
    density_blocks: float  # fraction of (query block, key block) pairs the method's kernel launch visits


def count_mask(mask_mod: Callable, n: int, block: int, device: str | torch.device) -> tuple[int, torch.Tensor]:
    """Kept (query, key) pairs of ``mask_mod`` over ``n`` tokens and the kept count of every (query block, key
    block) pair, ``(n_blocks, n_blocks)`` int64; evaluated in row chunks of ~16M elements.

    Head 0 only: the default configurations benchmarked here use one mask for every head.
    """
    nb = -(-n // block)
    rows_per_chunk = block * max(1, (1 << 24) // (nb * block * block))
    cols = torch.arange(n, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    counts = torch.zeros((nb, nb), dtype=torch.long, device=device)
    kept = 0
    for start in range(0, n, rows_per_chunk):
        rows = torch.arange(start, min(n, start + rows_per_chunk), device=device)
        m = mask_mod(zero, zero, rows[:, None], cols[None, :])
        kept += int(m.sum())
        qb = -(-rows.numel() // block)
        padded = torch.zeros((qb * block, nb * block), dtype=torch.int32, device=device)
        padded[: rows.numel(), :n] = m
        counts[start // block : start // block + qb] = padded.view(qb, block, nb, block).sum(dim=(1, 3))
    return kept, counts


# ------------------------------------------------------------------------------------------------- runners


def _method_runner(name: str, setup: MethodSetup, scale: float, warned: list[str]) -> Runner:
    method, layout, ctx = setup.method, setup.layout, setup.ctx
    return Runner(
        method=name,
        call=lambda q, k, v: method(q, k, v, layout, ctx, scale=scale),
        context=lambda: _recording(warned),
        detail=f"{type(method).__name__}(q, k, v, layout, ctx) as the attention processor calls it; plan "
        f"{setup.plan.layout}, gathers included",
    )


def _flex_runner(setup: MethodSetup, shape: AttentionShape, scale: float, compiled: bool, device: str) -> tuple[Runner, str]:
    """FlexAttention with the method's mask, in the kernel's token order where the plan permutes tokens."""
    from torch.nn.attention.flex_attention import BlockMask, noop_mask

    fn = flex_attention_fn(compiled)
    plan = setup.plan
    order = inverse = None
    if setup.per_frame:
        n = shape.tokens
        block = setup.method.config.block_size
        _, counts = count_mask(setup.flex_mask_mod, n, block, device)
        sizes = torch.full((counts.shape[0],), block, dtype=torch.long, device=counts.device)
        sizes[-1] = n - (counts.shape[0] - 1) * block
        full_size = sizes[:, None] * sizes[None, :]
        sparse = SparseBlockMask.from_block_keep(
            counts == full_size, (counts > 0) & (counts < full_size), q_len=n, kv_len=n, q_block_size=block,
            kv_block_size=block,
        )  # fmt: skip
        base, mask_mod = sparse.to_block_mask(), setup.flex_mask_mod
        mode = "sequence order, per-frame circle mask_mod, block mask from that mask_mod"
    elif plan.block_mask is None:
        base, mask_mod = None, None
        mode = "dense (the method's plan is dense: SDPA)"
    else:
        base = plan.block_mask.to_block_mask()
        permuted = plan.order is not None
        if plan.block_mask.num_partial == 0 and compiled:
            # Every visited block is full: compiled Flex never evaluates the mask_mod there (only at the ragged
            # tail, in bounds), so noop_mask is exact and all such masks of a shape share one compiled kernel.
            mask_mod, what = noop_mask, "full blocks only (noop mask_mod)"
        elif plan.block_mask.num_partial == 0:
            # Eager Flex evaluates only the mask_mod: give it the block table of the kernel's order.
            mask_mod, what = _block_table_mask_mod(plan.block_mask, shape), "full blocks only (block-table mask_mod)"
        elif permuted:
            mask_mod, what = plan.kernel_mask_mod, "the spec's mask_mod read through the order on partial blocks"
        else:
            mask_mod, what = setup.flex_mask_mod, "the spec's mask_mod on partial blocks"
        if permuted:
            order, inverse = plan.order, plan.inverse
            mode = f"kernel order ({plan.layout} permutation, gathers timed), the plan's block mask, {what}"
        else:
            mode = f"sequence order ({plan.layout}), the plan's block mask, {what}"
    block_mask = None
    if base is not None:
        block_mask = BlockMask.from_kv_blocks(
            base.kv_num_blocks, base.kv_indices, base.full_kv_num_blocks, base.full_kv_indices,
            BLOCK_SIZE=base.BLOCK_SIZE, mask_mod=mask_mod, seq_lengths=base.seq_lengths,
        )  # fmt: skip

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if order is not None:
            q, k, v = (t.index_select(2, order) for t in (q, k, v))
        out = fn(q, k, v, block_mask=block_mask, scale=scale)
        return out if inverse is None else out.index_select(2, inverse)

    detail = ("torch.compile(flex_attention)" if compiled else "flex_attention (eager)") + f"; {mode}"
    return Runner(method="flex", call=call, context=contextlib.nullcontext if compiled else quiet_eager_flex,
                  detail=detail), mode  # fmt: skip


def _block_table_mask_mod(sparse: SparseBlockMask, shape: AttentionShape) -> Callable:
    """A mask_mod that keeps exactly the full blocks of ``sparse`` (no partial blocks), for eager FlexAttention."""
    full, _ = sparse.block_keep()
    slot = MaskModSlot((shape.batch, shape.heads, *full.shape[2:]), sparse.q_block_size, full.device)
    slot.fill(full.expand(shape.batch, shape.heads, -1, -1))
    return slot.mask_mod


@contextlib.contextmanager
def _recording(into: list[str]) -> Iterator[None]:
    """Collect the warnings a method emits (fallbacks, training-free notes) for its row instead of stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        text = first_line(w.message)  # type: ignore[arg-type]
        if text not in into:
            into.append(text)


# ------------------------------------------------------------------------------------------------ the run


def run_locality_bench(config: LocalityBenchConfig) -> dict:
    """Run the benchmark described by ``config``; return the result document (and write it unless told not to)."""
    config = config.resolved()
    shared = config.bench
    assert shared is not None
    cuda = config.device.startswith("cuda")
    dtype = getattr(torch, config.dtype)
    result: dict[str, Any] = {
        "kind": "locality",
        "meta": report.environment(shared.device, bool(shared.flex_compile), shared.command),
        "config": {
            "shapes": list(config.shapes), "methods": list(config.methods), "tiny": config.tiny,
            "quick": config.quick, "dtype": config.dtype, "seed": config.seed, "error_rows": config.error_rows,
        },  # fmt: skip
        "shapes": {},
        "rows": [],
    }
    result["meta"]["flex_same_mask"] = (
        "kernel order with the plan's block mask where the method permutes tokens (gathers timed); sequence order "
        "with the plan's block mask and the spec's mask_mod otherwise; CLEAR per frame: sequence order, per-frame "
        "mask_mod (see each row's flex_mode)"
    )
    progress = progress_bar(total=len(config.shapes) * (1 + len(config.methods)), enabled=config.progress)
    try:
        for shape_name in config.shapes:
            shape = get_shape(shape_name)
            scale = 1.0 / math.sqrt(shape.head_dim)
            progress.set_description(f"{shape.name}: inputs")
            inputs = make_inputs(shape, shared, dtype, scale)
            layout = _layout(shape)
            info = {
                **shape.as_dict(),
                "text_position": None if layout.text is None else ("prefix" if layout.text_first else "suffix"),
                "input_sets": len(inputs.sets),
                "error_rows_per_head": int(inputs.rows.numel()),
                "run": {"date": result["meta"]["date"], "command": config.command},
            }
            result["shapes"][shape.name] = info
            rows: list[dict] = []
            for backend in SDPA_BACKENDS:
                progress.set_description(f"{shape.name}: sdpa-{backend}")
                row = measure(
                    lambda b=backend: sdpa_runner(b, scale, shape, dtype, cuda), f"sdpa-{backend}", shape, inputs,
                    shared, density_target=1.0, mask=None, masked_ref=None,
                )  # fmt: skip
                rows.append(_locality_row(row, for_method=None))
            progress.update(1)
            for name in config.methods:
                progress.set_description(f"{shape.name}: {name}")
                rows += _measure_method(name, shape, inputs, shared, scale)
                progress.update(1)
            _add_speedups(rows, info)
            result["rows"].extend(rows)
            del inputs
            if cuda:
                torch.cuda.empty_cache()
    finally:
        progress.close()
    if config.write:
        paths = write_outputs(result, config.out_dir)
        result["files"] = {k: str(v) for k, v in paths.items()}
    return result


def _measure_method(name: str, shape: AttentionShape, inputs: Inputs, shared: KernelBenchConfig, scale: float) -> list[dict]:
    """The method's row and its FlexAttention row; a setup failure becomes both rows' reason."""
    try:
        q, k, v = inputs.sets[0]
        setup = method_setup(name, shape, str(q.device))  # the device the method's plan cache will see
        n = shape.tokens
        kept, _ = count_mask(setup.mask_mod, n, setup.method.config.block_size, q.device)
        stats = MaskCounts(kept * shape.batch * shape.heads, setup.plan.kept_block_fraction)
        keep = _row_mask(setup.mask_mod, n, q.device)
        masked_ref = reference_rows(q, k, v, inputs.rows, scale, keep=keep)
    except ConfigError as err:
        return [_skipped(shape, m, name, "skipped", str(err)) for m in (name, "flex")]
    except Exception as err:  # a method that fails to set up must not end the run
        reason = f"{type(err).__name__}: {first_line(err)}"
        return [_skipped(shape, m, name, "error", reason) for m in (name, "flex")]
    common = {"params": _jsonable(setup.params), "plan": setup.plan.layout + (" (per frame)" if setup.per_frame else "")}
    warned: list[str] = []
    method_row = measure(
        lambda: _method_runner(name, setup, scale, warned), name, shape, inputs, shared,
        density_target=stats.kept_pairs / (shape.batch * shape.heads * n * n), mask=stats, masked_ref=masked_ref,
    )  # fmt: skip
    method_row = _locality_row(method_row, for_method=name, **common)
    # CLEAR's training-free warning is already the setup's note (and warn_once fires on the first shape only).
    method_row["notes"] = setup.notes + [w for w in warned if not w.startswith("clear: running training-free")]
    mode: list[str] = []

    def flex_factory() -> Runner:
        runner, text = _flex_runner(setup, shape, scale, bool(shared.flex_compile), shared.device)
        mode.append(text)
        return runner

    flex_row = measure(
        flex_factory, "flex", shape, inputs, shared, density_target=method_row["density_kept"] or 0.0, mask=stats,
        masked_ref=masked_ref,
    )  # fmt: skip
    flex_row = _locality_row(flex_row, for_method=name, **common)
    flex_row["flex_mode"] = mode[0] if mode else None
    return [method_row, flex_row]


def _row_mask(mask_mod: Callable, n: int, device: torch.device) -> Callable[[int, int, torch.Tensor], torch.Tensor]:
    cols = torch.arange(n, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    cache: dict[int, torch.Tensor] = {}

    def keep(b: int, h: int, rows: torch.Tensor) -> torch.Tensor:
        if 0 not in cache:  # the defaults' masks are the same for every head
            cache[0] = mask_mod(zero, zero, rows[:, None], cols[None, :])
        return cache[0]

    return keep


def _locality_row(row: dict, *, for_method: str | None, params: dict | None = None, plan: str | None = None) -> dict:
    """A kernel-benchmark row in this benchmark's terms: density_kept is the element mask's fraction of pairs."""
    row = dict(row)
    row.pop("density_target", None)
    row["density_blocks"] = row.get("density_blocks")
    row["for_method"] = for_method
    row["params"] = params
    row["plan"] = plan
    row.setdefault("notes", [])
    return row


def _skipped(shape: AttentionShape, method: str, for_method: str, status: str, reason: str) -> dict:
    return {
        "shape": shape.name, "method": method, "for_method": for_method, "params": None, "plan": None,
        "density_blocks": None, "density_kept": None, "status": status, "reason": reason, "detail": "",
        "ms": None, "tflops_dense_equiv": None, "tflops_kept": None, "rel_l2_vs_dense_fp32": None,
        "rel_l2_vs_masked_fp32": None, "notes": [], "speedup": {},
    }  # fmt: skip


def _add_speedups(rows: list[dict], info: dict) -> None:
    """``speedup["sdpa"]``: fastest SDPA backend / row; ``speedup["flex"]``: Flex with the same mask / method row."""
    ok = [r for r in rows if r["status"] == "ok" and r["ms"]]
    sdpa = [r for r in ok if r["method"].startswith("sdpa-")]
    best = min(sdpa, key=lambda r: r["ms"]) if sdpa else None
    info["sdpa_best"] = best["method"] if best else None
    flex = {r["for_method"]: r for r in ok if r["method"] == "flex"}
    for row in rows:
        row["speedup"] = {}
        if row not in ok or row["method"].startswith("sdpa-"):
            continue
        if best is not None:
            row["speedup"]["sdpa"] = best["ms"] / row["ms"]
        if row["method"] != "flex" and row["for_method"] in flex:
            row["speedup"]["flex"] = flex[row["for_method"]]["ms"] / row["ms"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------- outputs


def write_outputs(result: dict, out_dir: Path | str) -> dict[str, Path]:
    """``<out>/<date>-<device>-locality[-quick|-tiny].json`` and the markdown table next to it."""
    return report.write_outputs(result, out_dir, plot=False)


def render_markdown(result: dict) -> str:
    """One table per shape: each method (as the processor runs it), its Flex row, the SDPA backends."""
    return report.render_locality_markdown(result)


# -------------------------------------------------------------------------------------------------------- CLI


def build_arg_parser(prog: str = "diffaccel bench locality") -> argparse.ArgumentParser:
    """The option parser of the locality benchmark (the CLI and benchmarks/bench_locality.py)."""
    return common_parser(
        prog,
        "Time the locality methods' attention (GNA, tile, CLEAR, MSW-MSA) as the processor runs it, "
        "against SDPA (best backend) and FlexAttention with the same mask; write JSON and markdown.",
        methods=LOCALITY_METHODS,
        quick_help="short run: flux-1024 and wan13-480, fewer repetitions",
    )


def config_from_args(args: argparse.Namespace, command: str | None = None) -> LocalityBenchConfig:
    """The configuration that parsed options describe (``command`` is recorded in the JSON)."""
    return LocalityBenchConfig(
        shapes=tuple(args.shape), methods=tuple(args.method), out_dir=args.out, tiny=args.tiny, quick=args.quick,
        dtype=args.dtype, seed=args.seed, error_rows=args.error_rows,
        flex_compile=False if args.no_flex_compile else None, device=args.device, progress=not args.no_progress,
        command=command,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None, *, prog: str = "diffaccel bench locality") -> dict:
    """Parse ``argv``, run, print a one-line summary per shape and where the results went; return the result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_arg_parser(prog).parse_args(argv)
    result = run_locality_bench(config_from_args(args, command=" ".join([prog, shlex.join(argv)]).strip()))
    for name, info in result["shapes"].items():
        parts = []
        for r in result["rows"]:
            if r["shape"] == name and r["method"] in LOCALITY_METHODS:
                sp = r["speedup"]
                parts.append(
                    f"{r['method']} {r['status']}"
                    + (f" {sp['sdpa']:.2f}x SDPA" if "sdpa" in sp else "")
                    + (f" {sp['flex']:.2f}x Flex" if "flex" in sp else "")
                )
        print(f"{name} (best SDPA {info.get('sdpa_best')}): " + "; ".join(parts))
    for kind, path in result.get("files", {}).items():
        print(f"{kind}: {path}")
    return result
