"""Kernel benchmark: our block-sparse attention (bf16 and INT8) against the attention kernels it must beat.

Protocol (benchmarks/README.md): per attention shape (diffaccel.bench.shapes) and key-block density, one random
block mask (diagonal kept, independent per head) is built once as a torch ``BlockMask`` and given to both
FlexAttention and our kernel, so the two sparse kernels skip exactly the same tiles. Dense baselines
(``F.scaled_dot_product_attention`` on each backend, xformers, SageAttention) are timed once per shape. Every
time is the median of ``triton.testing.do_bench`` on CUDA (``time.perf_counter`` on CPU, where only the tiny
shapes run, as a smoke test); inputs are random normal, rotated over several sets when one set would sit in L2.
Every time has the relative L2 error beside it, against float32 attention on the same inputs (dense, and with
the same block mask), measured on a fixed random subset of query rows of every head.

Each measurement is wrapped: a baseline that is missing or fails becomes a row with the reason, never a crash.
Results: ``<out>/<date>-<device>-kernels.json`` (versions, device, command line, rows), a markdown table and a
speedup-vs-density plot next to it.

    python benchmarks/bench_kernels.py --shape flux-1024 wan13-480 --density 1 0.5 0.25 0.1
    diffaccel bench kernels --quick
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from diffaccel.bench.shapes import SHAPES, TINY_SHAPES, AttentionShape, get_shape
from diffaccel.errors import ConfigError

__all__ = [
    "KernelBenchConfig",
    "build_arg_parser",
    "main",
    "merge_results",
    "random_block_mask",
    "render_markdown",
    "render_plot",
    "run_kernel_bench",
    "write_outputs",
]

DEFAULT_DENSITIES = (1.0, 0.5, 0.25, 0.1)
QUICK_SHAPES = ("flux-1024", "wan13-480")
QUICK_DENSITIES = (1.0, 0.25)
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")
METHODS = ("sdpa", "flex", "xformers", "sage", "ours-bf16", "ours-int8", "ours-int8-pv")
SPARSE_METHODS = ("flex", "ours-bf16", "ours-int8", "ours-int8-pv")
# Columns of speedup in the table: the best SDPA backend, the dense peers, FlexAttention at the same mask, and
# (for the INT8 rows) our bf16 kernel at the same mask.
BASELINES = ("sdpa", "flex", "xformers", "sage", "ours-bf16")
_OURS_FLAGS = {"ours-bf16": (False, False), "ours-int8": (True, False), "ours-int8-pv": (True, True)}
_FULL_BLOCK, _TINY_BLOCK = 128, 16
_CPU_L2_BYTES = 4 << 20  # nominal; only decides input rotation in CPU smoke runs


# ---------------------------------------------------------------------------------------------- configuration


@dataclass
class KernelBenchConfig:
    """What to run. Empty/None fields take device-dependent defaults (see :meth:`resolved`)."""

    shapes: tuple[str, ...] = ()  # empty: every full-size shape on CUDA, every tiny shape otherwise
    densities: tuple[float, ...] = ()  # empty: DEFAULT_DENSITIES (QUICK_DENSITIES with quick)
    methods: tuple[str, ...] = METHODS
    out_dir: Path = Path("benchmarks/results")
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


# ------------------------------------------------------------------------------------------------ block masks


@dataclass
class BenchMask:
    """One random block mask in the two forms the kernels take, plus the exact fraction of work it keeps."""

    flex: Any  # torch.nn.attention.flex_attention.BlockMask
    kernel: Any  # what our kernel is given (converted once, outside the timing)
    blocks: torch.Tensor  # (B, H, n_q_blocks, n_k_blocks) bool, kept tiles (for the float32 reference)
    block_size: int
    density_blocks: float  # kept tiles / all tiles
    kept_pairs: float  # (query, key) pairs inside kept tiles, ragged tail tiles counted exactly

    def density_pairs(self, total_pairs: float) -> float:
        return self.kept_pairs / total_pairs


def random_block_mask(
    batch: int,
    heads: int,
    n_q: int,
    n_k: int,
    block_size: int,
    density: float,
    *,
    generator: torch.Generator,
    device: torch.device | str,
    slot: MaskModSlot | None = None,
) -> BenchMask:
    """Keep ``round(density * n_k_blocks)`` key blocks per query block (at least one, always the diagonal one).

    The kept blocks are chosen at random, independently per (batch, head, query block), like the per-head masks
    of AdaSpa or PARO. All kept blocks are *full* (no element mask inside), so both sparse kernels time pure
    block skipping. The BlockMask's ``mask_mod`` says the same thing element-wise (FlexAttention's eager path
    reads only the mask_mod); it reads the tile table from ``slot``, which masks of one shape share so that
    compiled FlexAttention sees the same function for every density and does not recompile. A slot holds one
    table at a time: the previous mask of that slot is stale once a new one is drawn.
    """
    from torch.nn.attention.flex_attention import BlockMask

    n_qb, n_kb = -(-n_q // block_size), -(-n_k // block_size)
    if slot is None:
        slot = MaskModSlot((batch, heads, n_qb, n_kb), block_size, device)
    keep = max(1, min(n_kb, round(density * n_kb)))
    scores = torch.rand((batch, heads, n_qb, n_kb), generator=generator, device=generator.device)
    diagonal = (torch.arange(n_qb, device=scores.device) * n_kb) // n_qb
    scores[..., torch.arange(n_qb, device=scores.device), diagonal] = 2.0  # ranks first: always kept
    kept = scores.topk(keep, dim=-1).indices.sort(dim=-1).values.to(device=device, dtype=torch.int32)

    full_indices = torch.zeros((batch, heads, n_qb, n_kb), dtype=torch.int32, device=device)
    full_indices[..., :keep] = kept
    full_counts = torch.full((batch, heads, n_qb), keep, dtype=torch.int32, device=device)
    partial_counts = torch.zeros_like(full_counts)
    partial_indices = torch.zeros_like(full_indices)
    blocks = torch.zeros((batch, heads, n_qb, n_kb), dtype=torch.bool, device=device)
    blocks.scatter_(-1, kept.long(), True)
    slot.fill(blocks)
    flex_mask = BlockMask.from_kv_blocks(
        partial_counts,
        partial_indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=block_size,
        mask_mod=slot.mask_mod,
        seq_lengths=(n_q, n_k),
    )
    q_sizes = torch.full((n_qb,), float(block_size), dtype=torch.float64, device=device)
    k_sizes = torch.full((n_kb,), float(block_size), dtype=torch.float64, device=device)
    q_sizes[-1] = n_q - (n_qb - 1) * block_size
    k_sizes[-1] = n_k - (n_kb - 1) * block_size
    kept_pairs = float(torch.einsum("bhij,i,j->", blocks.double(), q_sizes, k_sizes))
    return BenchMask(
        flex=flex_mask,
        kernel=_kernel_mask(flex_mask),
        blocks=blocks,
        block_size=block_size,
        density_blocks=keep / n_kb,
        kept_pairs=kept_pairs,
    )


class MaskStats(Protocol):
    """What :func:`_measure` reads from a mask: the (query, key) pairs it keeps and its kept-block fraction."""

    kept_pairs: float
    density_blocks: float


class MaskModSlot:
    """A (B, H, n_q_blocks, n_k_blocks) tile table and a FlexAttention ``mask_mod`` that reads it."""

    def __init__(self, shape: tuple[int, int, int, int], block_size: int, device: torch.device | str) -> None:
        self.table = torch.zeros(shape, dtype=torch.bool, device=device)
        table = self.table

        def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 (FlexAttention's mask_mod signature)
            return table[b, h, q_idx // block_size, kv_idx // block_size]

        self.mask_mod = mask_mod

    def fill(self, blocks: torch.Tensor) -> None:
        if blocks.shape != self.table.shape:
            raise ValueError(
                f"block table shape {tuple(blocks.shape)} does not fit this slot {tuple(self.table.shape)}"
            )
        self.table.copy_(blocks)


def _kernel_mask(flex_mask: Any) -> Any:
    """Our kernel's own block-mask form of a torch BlockMask, converted once, outside the timing.

    The mask has only full blocks, so no element mask travels with it (the custom ``mask_mod`` is not needed).
    """
    from diffaccel.kernels.masks import SparseBlockMask

    return SparseBlockMask.from_block_mask(flex_mask)


# ------------------------------------------------------------------------------------------- float32 reference


def _reference_rows(
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
    with _no_tf32():
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
def _no_tf32() -> Iterator[None]:
    """The float32 reference must be float32 (TF32 would put its own 1e-3 error into every comparison)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    if previous:
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        if previous:
            torch.backends.cuda.matmul.allow_tf32 = previous


def _relative_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


# --------------------------------------------------------------------------------------------------- runners


class Unavailable(Exception):
    """A baseline that cannot run here (not installed, not supported on this device or dtype)."""


class Skipped(Exception):
    """A measurement deliberately not taken (e.g. it would not fit in memory)."""


@dataclass
class Runner:
    """One timed method: ``prepare`` (outside the timing) turns a (q, k, v) set into ``call``'s arguments;
    ``output`` turns ``call``'s result back into (B, H, N, d)."""

    method: str
    call: Callable[..., torch.Tensor]
    prepare: Callable[[tuple[torch.Tensor, ...]], tuple] = lambda qkv: qkv
    output: Callable[[torch.Tensor], torch.Tensor] = lambda out: out
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    detail: str = ""


def _sdpa_runner(backend: str, scale: float, shape: AttentionShape, dtype: torch.dtype, cuda: bool) -> Runner:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    enum = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend]
    if not cuda and backend in ("cudnn", "efficient"):
        raise Unavailable(f"SDPA {backend} backend needs CUDA")
    if backend == "math" and cuda:
        # The math backend materializes the (B, H, N, N) scores a few times over.
        need = 3 * shape.batch * shape.heads * shape.tokens**2 * (torch.finfo(dtype).bits // 8 + 4)
        free = torch.cuda.mem_get_info()[0]
        if need > 0.8 * free:
            raise Skipped(f"math backend would need ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")
    return Runner(
        method=f"sdpa-{backend}",
        call=lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale),
        context=lambda: sdpa_kernel(enum),
        detail=f"F.scaled_dot_product_attention, SDPBackend.{enum.name}",
    )


_FLEX_COMPILED: dict[str, Callable] = {}


def flex_attention_fn(compiled: bool) -> Callable:
    """``flex_attention``, or the process's one ``torch.compile(flex_attention)`` (recompiles per shape and mask_mod)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "flex" not in _FLEX_COMPILED:
        _raise_recompile_limit()
        _FLEX_COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED["flex"]


def _flex_runner(mask: BenchMask, scale: float, compiled: bool) -> Runner:
    fn = flex_attention_fn(compiled)
    return Runner(
        method="flex",
        call=lambda q, k, v: fn(q, k, v, block_mask=mask.flex, scale=scale),
        # Eager FlexAttention warns on every new call site that it is unfused; the JSON already says it is eager.
        context=contextlib.nullcontext if compiled else _quiet_eager_flex,
        detail=("torch.compile(flex_attention)" if compiled else "flex_attention (eager)") + ", same BlockMask",
    )


@contextlib.contextmanager
def _quiet_eager_flex() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def _raise_recompile_limit() -> None:
    """One compiled graph per shape: keep dynamo from falling back to eager after its default 8 recompiles."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))


def _xformers_runner(scale: float) -> Runner:
    try:
        xops = importlib.import_module("xformers.ops")
    except Exception as err:  # ImportError, or a broken build raising something else at import
        raise Unavailable(f"xformers not importable ({type(err).__name__}: {_first_line(err)})") from None
    return Runner(
        method="xformers",
        # xformers takes (B, N, H, d); the transposes happen in prepare, outside the timing.
        prepare=lambda qkv: tuple(t.transpose(1, 2).contiguous() for t in qkv),
        call=lambda q, k, v: xops.memory_efficient_attention(q, k, v, scale=scale),
        output=lambda out: out.transpose(1, 2),
        detail=f"xformers.ops.memory_efficient_attention {_version('xformers')}",
    )


def _sage_runner(scale: float) -> Runner:
    try:
        sage = importlib.import_module("sageattention")
    except Exception as err:
        raise Unavailable(f"sageattention not importable ({type(err).__name__}: {_first_line(err)})") from None
    return Runner(
        method="sage",
        call=lambda q, k, v: sage.sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale),
        detail=f"sageattention.sageattn (auto kernel for this GPU) {_version('sageattention')}",
    )


def _ours_runner(method: str, mask: BenchMask, scale: float) -> Runner:
    from diffaccel.kernels import block_sparse_attention

    qk_int8, pv_int8 = _OURS_FLAGS[method]
    precision = {
        "ours-bf16": "QK and PV in the input dtype (bf16)",
        "ours-int8": "INT8 QK (per-block scales, K smoothed), bf16 PV",
        "ours-int8-pv": "INT8 QK and PV",
    }[method]
    return Runner(
        method=method,
        call=lambda q, k, v: block_sparse_attention(
            q, k, v, mask.kernel, scale=scale, qk_int8=qk_int8, pv_int8=pv_int8
        ),
        detail=f"diffaccel block_sparse_attention, {precision}, quantization included in the time",
    )


# ------------------------------------------------------------------------------------------------ measurement


@dataclass
class _Inputs:
    sets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    rows: torch.Tensor  # query rows on which the error is measured
    dense_ref: torch.Tensor  # float32 dense attention at those rows (input set 0)
    set_bytes: int


def _make_inputs(shape: AttentionShape, config: KernelBenchConfig, dtype: torch.dtype, scale: float) -> _Inputs:
    device = torch.device(config.device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    dims = (shape.batch, shape.heads, shape.tokens, shape.head_dim)
    set_bytes = 3 * math.prod(dims) * (torch.finfo(dtype).bits // 8)
    l2 = _CPU_L2_BYTES
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
    return _Inputs(sets=sets, rows=rows, dense_ref=_reference_rows(q, k, v, rows, scale), set_bytes=set_bytes)


def _time_ms(call: Callable, prepared: list[tuple], cuda: bool, quick: bool) -> float:
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


def _measure(
    make_runner: Callable[[], Runner],
    method: str,
    shape: AttentionShape,
    inputs: _Inputs,
    config: KernelBenchConfig,
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
                row["rel_l2_vs_dense_fp32"] = _relative_l2(out_rows, inputs.dense_ref)
                if masked_ref is not None:
                    row["rel_l2_vs_masked_fp32"] = _relative_l2(out_rows, masked_ref)
            del out_rows
            ms = _time_ms(runner.call, prepared, cuda, config.quick)
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
        row["reason"] = f"{type(err).__name__}: {_first_line(err)}"
    finally:
        if cuda:
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
    return row


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


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
        "meta": _environment(config),
        "config": _config_dict(config),
        "shapes": {},
        "rows": [],
    }
    progress = _progress(total=len(plan), enabled=config.progress)
    try:
        for shape_name in config.shapes:
            shape = get_shape(shape_name)
            scale = 1.0 / math.sqrt(shape.head_dim)
            progress.set_description(f"{shape.name}: inputs")
            inputs = _make_inputs(shape, config, dtype, scale)
            shape_rows: list[dict] = []
            result["shapes"][shape.name] = {
                **shape.as_dict(),
                "input_sets": len(inputs.sets),
                "input_set_bytes": inputs.set_bytes,
                "error_rows_per_head": int(inputs.rows.numel()),
                "block_size": block,
                "run": {"date": result["meta"]["date"], "command": config.command},
            }
            dense_methods = [m for m in ("sdpa", "xformers", "sage") if m in config.methods]
            for method in dense_methods:
                factories = _dense_factories(method, scale, shape, dtype, cuda)
                for name, factory in factories:
                    progress.set_description(f"{shape.name}: {name}")
                    shape_rows.append(
                        _measure(factory, name, shape, inputs, config, density_target=1.0, mask=None, masked_ref=None)
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
                    masked_ref = _reference_rows(q, k, v, inputs.rows, scale, mask_or_error)
                for method in (m for m in SPARSE_METHODS if m in config.methods):
                    progress.set_description(f"{shape.name}: {method} d={density:g}")
                    if isinstance(mask_or_error, BenchMask):
                        mask = mask_or_error
                        factory = _sparse_factory(method, mask, scale, config.flex_compile)
                        shape_rows.append(
                            _measure(
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
    dense = [m for m in ("sdpa", "xformers", "sage") if m in config.methods]
    sparse = [m for m in SPARSE_METHODS if m in config.methods]
    return [(s, m) for s in config.shapes for m in dense + sparse * len(config.densities)]


def _dense_factories(
    method: str, scale: float, shape: AttentionShape, dtype: torch.dtype, cuda: bool
) -> list[tuple[str, Callable[[], Runner]]]:
    if method == "sdpa":
        return [
            (f"sdpa-{b}", (lambda b=b: _sdpa_runner(b, scale, shape, dtype, cuda))) for b in SDPA_BACKENDS
        ]
    if method == "xformers":
        return [("xformers", lambda: _xformers_runner(scale))]
    return [("sage", lambda: _sage_runner(scale))]


def _sparse_factory(method: str, mask: BenchMask, scale: float, flex_compile: bool) -> Callable[[], Runner]:
    if method == "flex":
        return lambda: _flex_runner(mask, scale, flex_compile)
    return lambda: _ours_runner(method, mask, scale)


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as err:
        return f"{type(err).__name__}: {_first_line(err)}"


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


class _NoProgress:
    def set_description(self, _: str) -> None: ...
    def update(self, _: int) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------- provenance (JSON)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _kernel_path(device: str) -> str:
    """Which implementation our kernel ran as: compiled Triton, Triton's interpreter, or the PyTorch reference."""
    if device.startswith("cuda"):
        return "triton"
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return "triton-interpreter" if interpreting else "reference (PyTorch, no Triton on CPU)"


def _driver_version() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
        return done.stdout.strip().splitlines()[0] or None
    except Exception:
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip() or None
    except Exception:
        return None


def _environment(config: KernelBenchConfig) -> dict:
    cuda = config.device.startswith("cuda")
    meta: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": config.command,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffaccel": _version("diffaccel"),
        "git_commit": _git_commit(),
        "xformers": _version("xformers"),
        "sageattention": _version("sageattention"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "driver": _driver_version() if cuda else None,
        "device": config.device,
        "gpu": None,
        "timer": "triton.testing.do_bench, median (ms)" if cuda else "time.perf_counter, median (ms)",
        "kernel_path": _kernel_path(config.device),
        "flex": "torch.compile(flex_attention)" if config.flex_compile else "flex_attention (eager)",
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "error_reference": "float32 attention (TF32 off) on a fixed random subset of query rows of every head",
    }
    if cuda:
        props = torch.cuda.get_device_properties(torch.device(config.device))
        meta["gpu"] = props.name
        meta["gpu_capability"] = f"{props.major}.{props.minor}"
        meta["gpu_sms"] = props.multi_processor_count
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["gpu_l2_bytes"] = getattr(props, "L2_cache_size", None)
    else:
        meta["cpu"] = platform.processor() or platform.machine()
        meta["cpu_threads"] = torch.get_num_threads()
    return meta


def _config_dict(config: KernelBenchConfig) -> dict:
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


# ---------------------------------------------------------------------------------------------------- outputs


def _device_slug(meta: dict) -> str:
    name = meta.get("gpu") or "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    slug = "-".join(part for part in slug.split("-") if part and part != "nvidia")
    return slug or "device"


def output_stem(result: dict) -> str:
    """``<date>-<device>-<kind>`` (``kind``: ``kernels``, ``locality``; ``-quick``/``-tiny`` appended for short
    runs, so they never replace a full one)."""
    date = result["meta"]["date"][:10]
    suffix = "-tiny" if result["config"]["tiny"] else ("-quick" if result["config"]["quick"] else "")
    return f"{date}-{_device_slug(result['meta'])}-{result['kind']}{suffix}"


def write_outputs(result: dict, out_dir: Path | str, *, plot: bool = True, merge: bool = False) -> dict[str, Path]:
    """Write the JSON document, its markdown table and (with ``plot``) the speedup-vs-density PNG.

    With ``merge``, shapes of an existing result file of the same name (same day, device and versions) that this
    run did not measure are kept: a long benchmark can be run as several shorter commands. Speedups stay valid
    because each shape's rows and baselines always come from one run (each shape records its command).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(result)
    if merge and (out_dir / f"{stem}.json").exists():
        try:
            result = merge_results(json.loads((out_dir / f"{stem}.json").read_text()), result)
        except (ConfigError, ValueError, KeyError) as err:  # never lose a finished run over a merge
            stem += "-" + result["meta"]["date"][11:19].replace(":", "")
            warnings.warn(f"not merged ({err}); writing {stem}.json instead", stacklevel=2)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    if plot:
        paths["plot"] = out_dir / f"{stem}.png"
    document = {**result, "files": {k: p.name for k, p in paths.items()}}
    paths["json"].write_text(json.dumps(_finite(document), indent=2) + "\n")
    paths["markdown"].write_text(render_markdown(document))
    if plot:
        render_plot(document, paths["plot"])
    return paths


_SAME_SETUP = ("device", "gpu", "torch", "triton", "cuda", "driver", "kernel_path", "flex")


def merge_results(previous: dict, current: dict) -> dict:
    """``current`` plus the shapes of ``previous`` that it did not re-measure (same device and versions only)."""
    differ = [k for k in _SAME_SETUP if previous.get("meta", {}).get(k) != current["meta"].get(k)]
    if previous.get("kind") != "kernels" or differ:
        raise ConfigError(
            f"cannot merge into the existing result file: it was measured with a different setup ({differ or 'kind'}); "
            "use another --out folder or drop --merge"
        )
    kept = [name for name in previous["shapes"] if name not in current["shapes"]]
    merged = dict(current)
    merged["shapes"] = {**{n: previous["shapes"][n] for n in kept}, **current["shapes"]}
    merged["rows"] = [r for r in previous["rows"] if r["shape"] in kept] + current["rows"]
    config = dict(current["config"])
    config["shapes"] = list(merged["shapes"])
    config["densities"] = sorted({*previous["config"]["densities"], *config["densities"]}, reverse=True)
    merged["config"] = config
    merged["meta"] = {**current["meta"], "merged_commands": [
        *previous["meta"].get("merged_commands", [previous["meta"]["command"]]), current["meta"]["command"],
    ]}  # fmt: skip
    return merged


def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def render_markdown(result: dict) -> str:
    """One table per shape: time, throughput, density, error and speedups; then the targets and the failures."""
    meta = result["meta"]
    lines = [
        f"# Kernel benchmark: {meta.get('gpu') or meta['device']} ({meta['date'][:10]})",
        "",
        f"- command: `{meta['command']}`",
        f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, driver {meta['driver']}, "
        f"cuDNN {meta['cudnn']}; xformers {meta['xformers']}, sageattention {meta['sageattention']}",
        f"- timer: {meta['timer']}; our kernel ran as: {meta['kernel_path']}; FlexAttention: {meta['flex']}",
        f"- error: relative L2 vs {meta['error_reference']}; 'masked' = same block mask as the kernel",
        "- TFLOP/s: dense-equivalent = 4·B·H·N²·d / time; kept = 4·d·(query, key pairs in kept blocks) / time",
        "",
    ]
    header = (
        "| method | density (target / kept) | ms | TFLOP/s dense-eq | TFLOP/s kept | rel. L2 vs dense fp32 "
        "| rel. L2 vs masked fp32 | ×SDPA | ×Flex | ×xformers | ×Sage | ×ours-bf16 | notes |"
    )
    for name, info in result["shapes"].items():
        grid = "x".join(str(g) for g in info["grid"])
        lines += [
            f"## {name}: {info['model']}",
            "",
            f"B={info['batch']} H={info['heads']} N={info['tokens']} ({info['text_tokens']} text + {grid}) "
            f"d={info['head_dim']}, block {info['block_size']}, best SDPA backend: {info.get('sdpa_best') or 'none'}",
            "",
            header,
            "|" + "---|" * 13,
        ]
        for r in (r for r in result["rows"] if r["shape"] == name):
            sp = r.get("speedup", {})
            notes = r["reason"] if r["status"] != "ok" else ""
            if r["status"] != "ok":
                notes = f"**{r['status']}**: {notes}"
            lines.append(
                "| "
                + " | ".join(
                    [
                        r["method"],
                        f"{r['density_target']:g} / {_fmt(r['density_kept'], '.3f')}",
                        _fmt(r["ms"], ".3f"),
                        _fmt(r["tflops_dense_equiv"], ".4g"),
                        _fmt(r["tflops_kept"], ".4g"),
                        _fmt(r["rel_l2_vs_dense_fp32"], ".2e"),
                        _fmt(r["rel_l2_vs_masked_fp32"], ".2e"),
                        *(_fmt(sp.get(b), ".2f") for b in BASELINES),
                        notes.replace("|", "\\|"),
                    ]
                )
                + " |"
            )
        lines.append("")
    targets = [(r, t) for r in result["rows"] for t in r.get("targets", [])]
    if targets:
        lines += [
            "## Targets (benchmark protocol, H100 bf16)",
            "",
            "| shape | method | density | check | value | target | met |",
            "|---|---|---|---|---|---|---|",
        ]
        for r, t in targets:
            lines.append(
                f"| {r['shape']} | {r['method']} | {r['density_target']:g} | {t['name']} | {t['value']:.3g} "
                f"| {t['target']:.3g} | {'yes' if t['met'] else 'no'} |"
            )
        lines.append("")
    return "\n".join(lines)


def render_plot(result: dict, path: Path | str) -> None:
    """Speedup over the best SDPA backend versus kept density, one panel per shape, log-log, with 1/d and 0.85/d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(result["shapes"])
    cols = min(3, max(1, len(names)))
    nrows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.8 * nrows), squeeze=False)
    styles = {"ours-bf16": "o-", "ours-int8": "s--", "ours-int8-pv": "^:", "flex": "x-."}
    for ax, name in zip(axes.flat, names, strict=False):
        rows = [r for r in result["rows"] if r["shape"] == name and r["status"] == "ok"]
        densities = sorted({r["density_kept"] for r in rows if r["method"] in styles})
        if densities:
            grid = [min(densities) * (1.0 / min(densities)) ** (i / 50) for i in range(51)]
            ax.plot(grid, [1 / d for d in grid], color="0.7", lw=1, label="1/d (ideal)")
            ax.plot(grid, [0.85 / d for d in grid], color="0.7", lw=1, ls="--", label="0.85/d (target)")
        for method, style in styles.items():
            pts = sorted(
                (r["density_kept"], r["speedup"]["sdpa"]) for r in rows if r["method"] == method and "sdpa" in r["speedup"]
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=method)
        best = result["shapes"][name].get("sdpa_best") or "no SDPA"
        ax.set(title=f"{name} (vs {best})", xlabel="density kept", ylabel="speedup vs best SDPA")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if densities:  # label the measured densities in plain numbers, not powers of ten
            ax.set_xticks(densities, [f"{d:.2g}" for d in densities])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    meta = result["meta"]
    fig.suptitle(f"block-sparse attention, {meta.get('gpu') or meta['device']}, {meta['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------- CLI


def build_arg_parser(prog: str = "diffaccel bench kernels") -> argparse.ArgumentParser:
    """The one option parser of the kernel benchmark (used by the CLI and by benchmarks/bench_kernels.py)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Time diffaccel's block-sparse attention (bf16, INT8) against SDPA (best backend), "
        "FlexAttention with the same block mask, xformers and SageAttention; write JSON, markdown and a plot.",
    )
    all_shapes = [*SHAPES, *TINY_SHAPES]
    parser.add_argument("--shape", nargs="+", default=[], metavar="NAME", help=f"shapes to run, from {all_shapes}")
    parser.add_argument(
        "--density", nargs="+", type=float, default=[], metavar="D", help="key-block densities in (0, 1]"
    )
    parser.add_argument(
        "--method", nargs="+", default=list(METHODS), choices=METHODS, metavar="M", help=f"methods, from {list(METHODS)}"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes only (implied without CUDA)")
    parser.add_argument("--quick", action="store_true", help="short run: 2 shapes, 2 densities, fewer repetitions")
    parser.add_argument("--block-size", type=int, default=None, help="block mask granularity (default 128; 16 tiny)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--error-rows", type=int, default=None, help="query rows per head for the error")
    parser.add_argument("--no-flex-compile", action="store_true", help="run FlexAttention eagerly")
    parser.add_argument(
        "--merge", action="store_true", help="keep the other shapes of today's result file for this device (split runs)"
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace, command: str | None = None) -> KernelBenchConfig:
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
