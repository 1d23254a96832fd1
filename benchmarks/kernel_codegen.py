#!/usr/bin/env python
"""Compile every variant of the block-sparse attention kernel for sm_90 on a CPU and count PTX/SASS instructions.

    env -u TRITON_INTERPRET DIFFACCEL_AUTOTUNE=0 python benchmarks/kernel_codegen.py --json before.json
    env -u TRITON_INTERPRET DIFFACCEL_AUTOTUNE=0 python benchmarks/kernel_codegen.py --json after.json \
        --compare before.json --markdown benchmarks/results/2026-12-01-sm90-codegen.md

Why: a refactor of the kernel body (named mask predicates, one tile-loop helper, the token-order switch) must leave
the generated code equivalent. Nothing here runs on a GPU: the kernels are *compiled* (Triton -> TTIR -> TTGIR ->
LLVM -> PTX -> cubin via the ptxas bundled with Triton, SASS via its nvdisasm), never launched.

How: the real launch path (``block_sparse_attention_triton``) runs on ``meta`` tensors with a stand-in driver that
reports one sm_90 GPU (``GPUTarget("cuda", 90, 32)``; 32 is the warp size), so every argument and constexpr is the
one a real call would pass. Triton's compile step runs for real; its result is recorded and replaced by a kernel
whose launch does nothing. ``DIFFACCEL_AUTOTUNE=0`` pins one config per variant (the default config).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("unset TRITON_INTERPRET: this script compiles for sm_90, it does not interpret")
os.environ.setdefault("DIFFACCEL_AUTOTUNE", "0")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, explicit (3.6 has no such knob)

import torch  # noqa: E402

_COMPILED: list = []


# The no-op kernel and the sm_90 stand-in driver are the host-timing tool's (one copy of the stubs).
from diffaccel.kernels._host_timing import _StubDriver, _StubKernel  # noqa: E402,F401


def _install() -> None:
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(_StubDriver())
    original = JITFunction._do_compile

    def _do_compile(self, key, signature, device, constexprs, options, attrs, warmup):  # noqa: ANN001, ANN202
        kernel = original(self, key, signature, device, constexprs, options, attrs, warmup)
        if hasattr(kernel, "result"):  # async compile future (some Triton versions)
            kernel = kernel.result()
        _COMPILED.append((self.__name__, kernel))
        stub = _StubKernel()
        self.device_caches[device][0][key] = stub
        return stub

    JITFunction._do_compile = _do_compile


_PTX_INSTR = re.compile(r"^\s*(@!?%p\d+\s+)?([a-z][\w.:]*)[\s;]")
_SASS_INSTR = re.compile(r"^[-\w]+:[-\w]+:[-\w]+:[-\w]+:\d+\t(@!?U?P\w+\s+)?([A-Z][\w.]*)")


def _counts(kernel) -> dict:  # noqa: ANN001
    ptx = kernel.asm["ptx"]
    ptx_ops = [m.group(2) for line in ptx.splitlines() if (m := _PTX_INSTR.match(line)) and not line.strip().startswith(".")]
    row = {
        "ptx": len(ptx_ops),
        "ptx_ld_global": sum(op.startswith("ld.global") for op in ptx_ops),
        "ptx_st_global": sum(op.startswith("st.global") for op in ptx_ops),
        "ptx_mma": sum(op.startswith(("wgmma.mma_async", "mma.sync")) for op in ptx_ops),
    }
    try:
        from triton.tools.disasm import get_sass

        sass = get_sass(kernel.asm["cubin"])
        ops = [m.group(2) for line in sass.splitlines() if (m := _SASS_INSTR.match(line))]
        row["sass"] = len(ops)
        row["sass_ldg"] = sum(op.startswith("LDG") for op in ops)
        row["sass_stg"] = sum(op.startswith("STG") for op in ops)
        row["sass_mma"] = sum(op.startswith(("HGMMA", "IGMMA", "HMMA", "IMMA")) for op in ops)
    except Exception as err:  # noqa: BLE001 - SASS is optional (needs nvdisasm)
        row["sass_error"] = f"{type(err).__name__}: {err}"[:120]
    row["shared_bytes"] = getattr(kernel.metadata, "shared", None)
    return row


def _variants(with_order: bool):  # noqa: ANN202
    from diffaccel.kernels.masks import CircleMask, NeighborhoodMask, ShiftedWindowMask, TextSpec, TileMask

    grid = (24, 24)
    kinds = {
        "neighborhood": lambda text: NeighborhoodMask(grid, (7, 7), (1, 1), text=text),
        "neighborhood-dil": lambda text: NeighborhoodMask(grid, (5, 5), (1, 1), (2, 2), text=text),
        "circle": lambda text: CircleMask(grid, 5.0, text=text),
        "tile": lambda text: TileMask((4, 12, 12), (0,), text=text),
        "shifted-window": lambda text: ShiftedWindowMask(grid, (12, 12), (3, 3), text=text),
    }
    texts = {"none": None, "prefix": TextSpec(77, "prefix"), "suffix": TextSpec(77, "suffix")}
    precisions = {"bf16": {}, "qk8": {"qk_int8": True}, "qk8+pv8": {"qk_int8": True, "pv_int8": True}}
    # Full-only (no element mask): dense masks, EVEN_N and not.
    for n in (1024, 1000):
        for prec, kw in precisions.items():
            for d in (64, 128):
                yield f"full-only N{n}", "-", prec, d, False, None, n, kw
    yield "full-only N1000", "-", "bf16+lse", 128, False, None, 1000, {"return_lse": True}
    for kind, make in kinds.items():
        for text_name, text in texts.items():
            for prec, kw in precisions.items():
                for d in (64, 128):
                    if (prec != "bf16" or d != 128) and text_name != "prefix":
                        continue
                    yield kind, text_name, prec, d, False, make(text), None, kw
    if with_order:
        for n in (1024, 1000):
            for prec, kw in precisions.items():
                yield f"full-only N{n}", "-", prec, 128, True, None, n, kw
        for kind, make in kinds.items():
            for prec, kw in precisions.items():
                yield kind, "prefix", prec, 128, True, make(texts["prefix"]), None, kw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="write the counts here")
    parser.add_argument("--compare", default=None, help="a previous --json to compare with")
    parser.add_argument("--markdown", default=None, help="write the before/after table here (with --compare)")
    parser.add_argument("--order", action="store_true", help="also compile the token-order variants")
    parser.add_argument("--only", default=None, help="regex on the variant name (development)")
    args = parser.parse_args()

    _install()
    import diffaccel.kernels.dispatch as dispatch
    from diffaccel.kernels import block_sparse as bs
    from diffaccel.kernels.masks import SparseBlockMask

    dispatch._interpreting = lambda: True  # noqa: SLF001 - let dispatch choose Triton for meta tensors
    import diffaccel.kernels.quant as quant

    fake_mean = lambda k: torch.empty(k.shape[0], k.shape[1], k.shape[3], dtype=torch.float32, device=k.device)  # noqa: E731
    for module in (bs, quant):  # before the refactor it was imported into block_sparse, after it lives in quant
        if hasattr(module, "smoothing_mean"):
            module.smoothing_mean = fake_mean

    rows = []
    for kind, text, prec, d, ordered, spec, n, kw in _variants(args.order):
        name = f"{kind} | {text} | {prec} | d{d} | {'order' if ordered else 'contiguous'}"
        if args.only and not re.search(args.only, name):
            continue
        if spec is None:
            bm = SparseBlockMask.dense(n, n, 128)
        else:
            bm = SparseBlockMask.from_spec(spec, 128)
            n = spec.num_tokens
        for attr, value in list(vars(bm).items()):
            if isinstance(value, torch.Tensor):
                object.__setattr__(bm, attr, value.to("meta"))
        q, k, v = (torch.empty(1, 2, n, d, dtype=torch.bfloat16, device="meta") for _ in range(3))
        extra = {}
        if ordered:
            extra["token_order"] = torch.empty(n, dtype=torch.int32, device="meta")
        if "dense_fast_path" in bs.block_sparse_attention_triton.__code__.co_varnames:
            extra["dense_fast_path"] = False
        _COMPILED.clear()
        bs.block_sparse_attention_triton(q, k, v, bm, scale=d ** -0.5, **kw, **extra)
        attn = [kern for fn, kern in _COMPILED if fn == "_block_sparse_fwd"]
        if len(attn) != 1:
            raise SystemExit(f"{name}: expected one attention kernel compile, got {[fn for fn, _ in _COMPILED]}")
        row = {"variant": name, "partial": bm.num_partial > 0, **_counts(attn[0])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.json).write_text(json.dumps({"triton": __import__("triton").__version__, "rows": rows}, indent=1))
    if args.compare:
        _compare(json.loads(Path(args.compare).read_text()), rows, args.markdown)


def _compare(before: dict, after: list[dict], markdown: str | None) -> None:
    old = {r["variant"]: r for r in before["rows"]}
    keys = ("ptx", "ptx_ld_global", "ptx_st_global", "ptx_mma", "sass", "sass_ldg", "sass_stg", "sass_mma", "shared_bytes")
    lines = [
        "| variant (kind \\| text \\| precision \\| head_dim \\| order) | partial | "
        + " | ".join(f"{k} before/after" for k in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for r in after:
        o = old.get(r["variant"], {})
        cells = []
        for k in keys:
            a, b = o.get(k, "-"), r.get(k, "-")
            cells.append(f"{a}/{b}" if a != b else f"{a}")
        lines.append(f"| {r['variant']} | {r['partial']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if markdown:
        Path(markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
