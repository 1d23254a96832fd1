"""Host-side (CPU) cost of one ``block_sparse_attention`` call, without a GPU: everything up to the kernel launch.

    env -u TRITON_INTERPRET DIFFACCEL_AUTOTUNE=0 python -m diffaccel.kernels._host_timing [--calls 2000]

Why: at flux-1024 with a sparse mask the kernel runs in ~0.1 ms on an H100, the same order as a Python launch
path; ``do_bench`` then times the host, not the GPU. This tool measures that host path on a CPU-only machine:

* q, k, v live on the ``meta`` device (torch ops cost their dispatch only, like asynchronous CUDA launches; no
  data), the block mask is built on the CPU and its tensors are then swapped for meta ones; K's smoothing mean
  (INT8 path) is replaced by an allocation of its result (meta ``mean`` runs Python decompositions);
* Triton runs for real up to the compiled kernel (autotuner key and cache, heuristics, the JIT binder that
  specializes every argument, the kernel cache key) through a stand-in driver (current device 0, target sm_90);
  compilation is replaced by a kernel object whose launch is a no-op. Not included: the C launcher (argument
  packing, ``cuLaunchKernel``, a few microseconds) and torch's CUDA caching allocator (``torch.empty``).

With ``DIFFACCEL_AUTOTUNE=0`` each key has one config, so every call takes the autotuner's cached path, which is
what tuned steady-state calls take too. Development tool; it relies on Triton runtime internals (3.6 to 3.9).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch


class _StubKernel:
    """Stands in for a CompiledKernel: launching it does nothing."""

    function = None
    packed_metadata = None

    def launch_metadata(self, grid, stream, *args):  # noqa: ANN001, ANN201
        return None

    def run(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return None


class _StubDriver:
    """The questions ``JITFunction.run`` asks the active driver, answered as on one sm_90 GPU."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):  # noqa: ANN201
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):  # noqa: ANN201
        return torch.device("meta")


def install_stubs() -> None:
    """Route Triton launches to no-op kernels (global; for this tool's process only)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    import diffaccel.kernels.dispatch as dispatch
    import diffaccel.kernels.quant as quant

    driver.set_active(_StubDriver())

    def _do_compile(self, key, signature, device, constexprs, options, attrs, warmup):  # noqa: ANN001, ANN202
        kernel = _StubKernel()
        self.device_caches[device][0][key] = kernel
        return kernel

    JITFunction._do_compile = _do_compile
    dispatch._interpreting = lambda: True  # let dispatch pick Triton for meta tensors
    # torch's meta kernel of mean() runs Python decompositions (~10x a CUDA launch); an allocation of the same
    # result stands in for the one reduction launch it is on CUDA.
    quant.smoothing_mean = lambda k: torch.empty(
        k.shape[0], k.shape[1], k.shape[3], dtype=torch.float32, device=k.device
    )


def _meta_mask(bm):  # noqa: ANN001, ANN202
    """The same SparseBlockMask with its tensors on the meta device (values were validated on the CPU)."""
    for name, value in list(vars(bm).items()):
        if isinstance(value, torch.Tensor):
            object.__setattr__(bm, name, value.to("meta"))
        elif isinstance(value, dict):  # per-device caches of derived tensors, if any
            value.clear()
    return bm


FLUX_1024 = (1, 24, 512, (64, 64), 128)
"""(batch, heads, text tokens, visual grid, head_dim) of the timed shape (FLUX.1 at 1024x1024)."""


def random_block_mask(heads: int, n: int, block: int, density: float, seed: int = 0, *, validate: bool = True):  # noqa: ANN201
    """Exactly ``round(density * num_kv_blocks)`` random full key blocks per (head, query block), on the CPU."""
    from diffaccel.kernels.masks import SparseBlockMask

    nb = -(-n // block)
    if density >= 1.0:
        return SparseBlockMask.dense(n, n, block)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, heads, nb, nb, generator=gen)
    keep = torch.zeros(1, heads, nb, nb, dtype=torch.bool)
    keep.scatter_(-1, scores.topk(max(1, round(density * nb)), dim=-1).indices, True)
    return SparseBlockMask.from_block_keep(keep, q_len=n, kv_len=n, q_block_size=block, kv_block_size=block,
                                           validate=validate)


def _time_us(fn, calls: int, repeats: int = 15) -> float:
    """Median over ``repeats`` batches of this thread's CPU microseconds per call (``time.thread_time``: other
    processes on a shared machine do not inflate it), after a warm-up."""
    for _ in range(20):
        fn()
    per_call = []
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        per_call.append((time.thread_time() - t0) / calls * 1e6)
    return statistics.median(per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--density", type=float, default=0.25)
    args = parser.parse_args()

    install_stubs()
    from torch.nn.attention.flex_attention import BlockMask

    from diffaccel.kernels import block_sparse_attention, block_sparse_attention_unchecked
    from diffaccel.kernels.masks import SparseBlockMask

    B, H, T, grid, D = FLUX_1024
    n = T + math.prod(grid)
    q, k, v = (torch.empty(B, H, n, D, dtype=torch.bfloat16, device="meta") for _ in range(3))
    scale = 1.0 / math.sqrt(D)
    cpu_mask = random_block_mask(H, n, 128, args.density)
    bm = _meta_mask(random_block_mask(H, n, 128, args.density))
    out = torch.empty_like(q)
    print(f"flux-1024 B={B} H={H} N={n} D={D}, random block mask density {bm.density:.3f}, torch {torch.__version__}")
    rows = []
    for label, kw in (("bf16", {}), ("qk_int8", {"qk_int8": True})):
        rows.append((f"block_sparse_attention, SparseBlockMask, {label}",
                     _time_us(lambda: block_sparse_attention(q, k, v, bm, scale=scale, **kw), args.calls)))
        rows.append((f"  same, out= preallocated, {label}",
                     _time_us(lambda: block_sparse_attention(q, k, v, bm, scale=scale, out=out, **kw), args.calls)))
    rows.append(("block_sparse_attention_unchecked, SparseBlockMask, bf16, out=",
                 _time_us(lambda: block_sparse_attention_unchecked(q, k, v, bm, scale=scale, out=out), args.calls)))
    order = torch.empty(n, dtype=torch.int32, device="meta")
    rows.append(("block_sparse_attention_unchecked, + token_order (N,), bf16, out=",
                 _time_us(lambda: block_sparse_attention_unchecked(q, k, v, bm, scale=scale, out=out,
                                                                   token_order=order), args.calls)))
    keep = torch.rand(1, H, -(-n // 128), -(-n // 128)) < args.density
    rows.append(("SparseBlockMask.from_block_keep (CPU tensors), validated",
                 _time_us(lambda: SparseBlockMask.from_block_keep(keep, q_len=n, kv_len=n), max(1, args.calls // 10))))
    rows.append(("SparseBlockMask.from_block_keep (CPU tensors), validate=False",
                 _time_us(lambda: SparseBlockMask.from_block_keep(keep, q_len=n, kv_len=n, validate=False),
                          max(1, args.calls // 10))))
    # A torch BlockMask input is converted on every call; measured on the CPU (no kernel launch): on CUDA every
    # host read of a device value in the conversion is also a synchronization.
    fbm = cpu_mask.to_block_mask()
    assert isinstance(fbm, BlockMask)
    rows.append(("SparseBlockMask.from_block_mask(BlockMask) (CPU tensors)",
                 _time_us(lambda: SparseBlockMask.from_block_mask(fbm), max(1, args.calls // 10))))
    qc, kc, vc = (torch.empty(B, H, n, D, dtype=torch.bfloat16) for _ in range(3))
    outc = torch.empty_like(qc)
    rows.append(("block_sparse_attention, torch BlockMask, bf16, out= (CPU tensors)",
                 _time_us(lambda: block_sparse_attention(qc, kc, vc, fbm, scale=scale, out=outc),
                          max(1, args.calls // 10))))
    for label, us in rows:
        print(f"{label:70s} {us:9.1f} us/call")


if __name__ == "__main__":
    main()
