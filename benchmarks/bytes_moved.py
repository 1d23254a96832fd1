#!/usr/bin/env python
"""Bytes moved per block-sparse attention call with a token permutation: before (gather/scatter passes) vs after.

    python benchmarks/bytes_moved.py [--densities 1 0.25 0.1]

Before: what the locality methods do today with a tile-major (or any) token order: ``index_select`` q, k and v
into kernel order, run the kernel on the copies, ``index_select`` the output back (``methods/_locality.py``).
After: ``block_sparse_attention(..., token_order=order)``: the kernel reads Q/K/V rows and writes O rows through
the order (gathered loads, scattered stores); the only extra traffic is the int32 order itself.

Two numbers per row, both in bf16 and per call:

* **analytic**: the passes from the shapes: each gather reads and writes the whole tensor (plus its int64
  index), the kernel reads Q once, writes O once and reads the K/V tiles of the visited key blocks once per query
  tile (no L2 reuse: an upper bound; DRAM traffic is lower when K/V stay in L2), plus -- after -- the int32 order
  entries of every Q tile and visited K/V tile;
* **counted**: the permutation passes actually executed, counted by a ``TorchDispatchMode`` that sums the bytes of
  every tensor each aten op reads and writes, on ``meta`` tensors of the real shapes (no data, no device), plus
  the kernel's reads from the visited-tile counts of a real random block mask of that density. This checks the
  analytic formula for the passes (they must agree exactly); the kernel term is the same model in both.

These are byte counts, not timings (timings need a GPU: ``benchmarks/bench_kernels.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    # name: (batch, heads, tokens, head_dim) -- FLUX.1 1024x1024 (4096 image + 512 text), Wan 1.3B 480p.
    "flux-1024": (1, 24, 4608, 128),
    "wan13-480": (1, 12, 32760, 128),
}
BLOCK = 128
BLOCK_M, BLOCK_N = 128, 64  # the kernel's default tiles at head_dim 128 (order entries are read per tile)
ELEM = 2  # bf16
ORDER_ELEM = 4  # int32 order read by the kernel
INDEX_ELEM = 8  # int64 index of index_select


class ByteCounter(TorchDispatchMode):
    """Sums, over the aten ops run inside it, the bytes of every tensor argument (read) and result (written)."""

    def __init__(self) -> None:
        super().__init__()
        self.read = 0
        self.written = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.__name__ in ("detach.default", "view.default", "_to_copy.default", "empty.memory_format"):
            return out
        self.ops.append(str(func.__name__))
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                self.read += t.numel() * t.element_size()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.written += t.numel() * t.element_size()
        return out

    @property
    def total(self) -> int:
        return self.read + self.written


def visited_tiles(heads: int, n: int, density: float, seed: int = 0) -> int:
    """Visited (query block, key block) pairs of a random block mask with exactly round(d * blocks) per row."""
    nb = -(-n // BLOCK)
    if density >= 1.0:
        return heads * nb * nb
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(1, heads, nb, nb, dtype=torch.bool)
    keep.scatter_(-1, torch.rand(1, heads, nb, nb, generator=gen).topk(max(1, round(density * nb)), -1).indices, True)
    return int(keep.sum())


def kernel_bytes(b: int, h: int, n: int, d: int, pairs: int, with_order: bool) -> int:
    """Kernel traffic, no L2 reuse: Q read + O write once, K and V of every visited key block once per query block;
    with an order, the int32 order entries of each Q tile and each visited K/V tile (read twice: K and V loads
    share them, counted once)."""
    qo = 2 * b * h * n * d * ELEM
    kv = b * pairs * 2 * BLOCK * d * ELEM
    order = b * (h * n + pairs * BLOCK) * ORDER_ELEM if with_order else 0
    return qo + kv + order


def passes_analytic(b: int, h: int, n: int, d: int) -> int:
    """Three gathers and one scatter-back (index_select): each reads the tensor and its index, writes the copy."""
    tensor = b * h * n * d * ELEM
    return 4 * (2 * tensor + n * INDEX_ELEM)


def passes_counted(b: int, h: int, n: int, d: int) -> tuple[int, list[str]]:
    q, k, v = (torch.empty(b, h, n, d, dtype=torch.bfloat16, device="meta") for _ in range(3))
    order = torch.empty(n, dtype=torch.long, device="meta")
    inverse = torch.empty(n, dtype=torch.long, device="meta")
    with ByteCounter() as counter:
        qg, kg, vg = (t.index_select(2, order) for t in (q, k, v))  # before the kernel (methods/_locality.py)
    out = torch.empty_like(qg)  # the kernel's output, written by the kernel (counted in kernel_bytes)
    with ByteCounter() as back:
        out.index_select(2, inverse)  # after the kernel
    return counter.total + back.total, counter.ops + back.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--densities", nargs="+", type=float, default=[1.0, 0.25, 0.1])
    args = parser.parse_args()
    print("| shape | density | passes analytic (MB) | passes counted (MB) | kernel before (MB) | before total (MB) "
          "| after total (MB) | after / before |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (b, h, n, d) in SHAPES.items():
        counted, ops = passes_counted(b, h, n, d)
        analytic = passes_analytic(b, h, n, d)
        if counted != analytic:
            raise SystemExit(f"{name}: counted {counted} bytes, analytic {analytic} (ops {ops})")
        for dens in args.densities:
            pairs = visited_tiles(h, n, dens)
            before = kernel_bytes(b, h, n, d, pairs, False) + counted
            after = kernel_bytes(b, h, n, d, pairs, True)
            print(f"| {name} (B{b} H{h} N{n} D{d}) | {pairs / (h * (-(-n // BLOCK)) ** 2):.3f} | {analytic / 1e6:.1f} "
                  f"| {counted / 1e6:.1f} | {kernel_bytes(b, h, n, d, pairs, False) / 1e6:.1f} | {before / 1e6:.1f} "
                  f"| {after / 1e6:.1f} | {after / before:.3f} |")
    print(f"\nbf16; block {BLOCK}; counted ops per call before: {', '.join(ops)}. Kernel term: no L2 reuse (upper "
          "bound), the same model before and after; 'after' adds the int32 order reads.")


if __name__ == "__main__":
    main()
