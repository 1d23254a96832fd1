#!/usr/bin/env python
"""Online sparse methods (AdaSpa, VMoBA) at model shapes: attention time per step against SDPA and FlexAttention
(with the method's own last block mask), and the search/scoring overhead as a fraction of the attention saved over a
whole run (issue 10, item 7).

    python benchmarks/bench_online.py --shape wan13-480 hyv-720 cogx-720 --steps 50 --out benchmarks/results
    python benchmarks/bench_online.py --quick            # CPU rehearsal: a tiny shape, 6 steps, reference kernels

One attention layer is run through a whole schedule of ``--steps`` denoising steps on random inputs (the methods'
warm-up, searches and sparse steps as in a run); each method's ``overhead()`` gives the search seconds and the saving
against dense on the same layer (CUDA events). SDPA and FlexAttention are timed separately (median of ``--repeats``
after a warm-up). Random inputs make attention diffuse, so the masks and the error are not those of a real model: the
times and the overhead ratio are what this measures. Writes <out>/<date>-<device>-online.json and prints a table.
Not run on a GPU in the session that wrote it (no GPU was lent); rehearsed on the CPU with --quick.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from diffaccel.bench.shapes import get_shape  # noqa: E402
from diffaccel.context import RunContext  # noqa: E402
from diffaccel.kernels.masks import SparseBlockMask  # noqa: E402
from diffaccel.kernels.reference import gather_tokens  # noqa: E402
from diffaccel.layout import TokenLayout  # noqa: E402
from diffaccel.methods.base import get_method  # noqa: E402

TEXT_PLACEMENT = {"flux-1024": "prefix", "sd35-1024": "suffix", "cogx-720": "prefix", "hyv-720": "suffix"}
LAYER = "blocks.0.attn"  # layer index 0: VMoBA's temporal partition; pass --layer blocks.1.attn for spatial


def timed(fn, cuda: bool, repeats: int) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def layout_for(shape) -> TokenLayout:
    nv, nt = shape.visual_tokens, shape.text_tokens
    if nt == 0:
        return TokenLayout(nv, shape.grid)
    text = slice(0, nt) if TEXT_PLACEMENT.get(shape.name, "prefix") == "prefix" else slice(nv, nv + nt)
    return TokenLayout(nv + nt, shape.grid, text=text)


def flex_time(q, k, v, keep, block, order, cuda, repeats) -> float | None:
    if not cuda:
        return None
    from torch.nn.attention.flex_attention import flex_attention

    n = q.shape[2]
    mask = SparseBlockMask.from_block_keep(keep, q_len=n, kv_len=n, q_block_size=block, kv_block_size=block)
    bm = mask.to_block_mask()
    if order is not None:
        q, k, v = (gather_tokens(t, order) for t in (q, k, v))
    flex = torch.compile(flex_attention, dynamic=False)
    return timed(lambda: flex(q, k, v, block_mask=bm), cuda, repeats)


def run_method(name, params, q, k, v, layout, steps, layer, cuda):
    m = get_method(name, **params)
    per_step = []
    for step in range(steps):
        ctx = RunContext(step=step, num_steps=steps, layer=layer, denoiser_calls=step + 1)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        m(q, k, v, layout, ctx)
        if cuda:
            torch.cuda.synchronize()
        per_step.append((time.perf_counter() - t0) * 1e3)
    return m, per_step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", nargs="+", default=["wan13-480", "hyv-720", "cogx-720"])
    p.add_argument("--methods", nargs="+", default=["adaspa", "vmoba"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layer", default=LAYER)
    p.add_argument("--out", type=Path, default=Path("outputs/bench"))
    p.add_argument("--quick", action="store_true", help="CPU rehearsal: tiny-video, 6 steps, reference kernels")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = ["tiny-video"] if args.quick else args.shape
    steps = 6 if args.quick else args.steps
    extra = {} if cuda else {"backend": "reference", "block_size": 16}
    rows = []
    for shape_name in shapes:
        shape = get_shape(shape_name)
        layout = layout_for(shape)
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(shape.batch, shape.heads, shape.tokens, shape.head_dim, generator=g, device=device,
                               dtype=dtype) for _ in range(3))
        sdpa_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v), cuda, args.repeats)
        for name in args.methods:
            m, per_step = run_method(name, extra, q, k, v, layout, steps, args.layer, cuda)
            info = m.overhead() or {}
            keep = m.kept_blocks(args.layer)
            block = m.config.block_size
            order = None
            if name == "vmoba" and m._plans:
                order = next(iter(m._plans.values())).order
            flex_ms = None if keep is None else flex_time(q, k, v, keep[None], block, order, cuda, args.repeats)
            sparse_steps = [t for t, s in zip(per_step, range(steps)) if s >= steps // 2]
            row = {
                "shape": shape.as_dict(), "method": name, "params": {**extra}, "steps": steps,
                "sdpa_ms": sdpa_ms, "flex_same_mask_ms": flex_ms,
                "method_step_ms_median_second_half": statistics.median(sparse_steps),
                "method_step_ms": per_step,
                "density": None if keep is None else float(keep.float().mean()),
                "overhead": info,
                "search_over_saved": info.get("search_over_saved"),
            }
            rows.append(row)
            ratio = info.get("search_over_saved", float("nan"))
            print(f"{shape.name:10s} {name:7s} sdpa {sdpa_ms:9.3f} ms | flex(mask) "
                  f"{'-' if flex_ms is None else f'{flex_ms:9.3f}'} ms | method step {row['method_step_ms_median_second_half']:9.3f} ms"
                  f" | density {row['density'] if row['density'] is None else round(row['density'], 3)} | search "
                  f"{info.get('search_s', float('nan')):.4f} s vs saved {info.get('saved_s', float('nan')):.4f} s "
                  f"({100 * ratio:.1f} %)")
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "command": " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "note": "random inputs; one attention layer through a whole step schedule; times in ms (CUDA synchronized)",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if cuda else "cpu"
    path = args.out / f"{datetime.date.today().isoformat()}-{tag}-online.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
