#!/usr/bin/env python
"""PARO on a GPU (issue 9, item 8): attention timings at the BENCHMARKS.md shapes and calibration wall time.

    python benchmarks/bench_paro.py                          # cogx-720, wan13-480, flux-1024 x densities 0.5/0.3/0.2
    python benchmarks/bench_paro.py --calibration wan13-480  # + calibration of a random-weight Wan2.1-1.3B transformer
    python benchmarks/bench_paro.py --tiny                   # CPU rehearsal (Triton interpreter / reference), seconds

Per shape and density, on the same inputs (random normal, bf16, batch 1), median ms of ``triton.testing.do_bench``:

* ``sdpa``: ``F.scaled_dot_product_attention`` (dense, its best backend);
* ``flex``: FlexAttention under ``torch.compile`` with the same block mask, on inputs already gathered into each
  head's order (the gather is not timed: an advantage for flex);
* ``block-sparse``: our kernel with the same block mask and no token order (the plain block-sparse kernel);
* ``paro`` / ``paro+qk8`` / ``paro+qk8+pv8``: the ``paro`` method's kernel call, the per-head order applied through
  indexed loads and stores, without and with INT8.

The masks are PARO-like: per head a random axis order and PARO's block-sum thresholding
(:func:`~diffaccel.methods.paro_plan.keep_from_mass`) on a synthetic mass that decays with the block distance
(the block-diagonal pattern a reordered head shows), text rows/columns dense; a real plan's masks come from
calibration. Accuracy: relative L2 of each output against dense fp32 attention restricted to the same mask.

``--calibration SHAPE`` builds the real-size transformer (Wan2.1-1.3B for wan13-480, CogVideoX-5B for cogx-720;
random weights: compute does not depend on their values) and times ``--steps`` denoiser forwards dense, then the
same forwards with the PARO calibrator applied (the dense forwards plus the statistics), and prints the ratio.

Results: <out>/<date>-<device>-paro.json and .md (device, versions, command line). Not run on a GPU yet.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from diffaccel.bench.shapes import AttentionShape, get_shape  # noqa: E402
from diffaccel.kernels import SparseBlockMask, TextSpec, block_sparse_attention_unchecked  # noqa: E402
from diffaccel.kernels.reference import block_sparse_attention_reference  # noqa: E402
from diffaccel.methods.paro_plan import keep_from_mass, text_blocks  # noqa: E402
from diffaccel.sparse.axis_orders import axis_orders_for, head_token_order  # noqa: E402

SHAPES = ("cogx-720", "wan13-480", "flux-1024")
DENSITIES = (0.5, 0.3, 0.2)
TINY = AttentionShape("tiny-video", "tiny video", 6, (3, 5, 7), 2, 32, tiny=True)
BLOCK = 64


def paro_mask(shape: AttentionShape, density: float, block: int, device: torch.device, seed: int = 0):
    """Per-head random axis orders and a thresholded block mask (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    n = shape.tokens
    nb = -(-n // block)
    orders = torch.randint(0, len(axis_orders_for(len(shape.grid))), (shape.heads,), generator=g)
    text = TextSpec(shape.text_tokens, "prefix") if shape.text_tokens else None
    order = head_token_order(shape.grid, orders.tolist(), text).to(device=device, dtype=torch.int32)
    i = torch.arange(nb, dtype=torch.float32)
    decay = torch.exp(-(i.view(-1, 1) - i.view(1, -1)).abs() / max(1.0, nb * 0.05))
    mass = decay * torch.rand(shape.heads, nb, nb, generator=g)
    keep = keep_from_mass(mass, density, text_blocks(n, shape.text_tokens, True, block))
    mask = SparseBlockMask.from_block_keep(keep.unsqueeze(0).to(device), q_len=n, kv_len=n, q_block_size=block,
                                           kv_block_size=block)
    return order, mask, keep


def timer(cuda: bool, repeats: int):
    if cuda:
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    return cpu


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def bench_attention(shape: AttentionShape, densities, cuda: bool, dtype: torch.dtype, block: int, time_fn,
                    with_flex: bool) -> list[dict]:
    device = torch.device("cuda" if cuda else "cpu")
    g = torch.Generator(device="cpu").manual_seed(1)
    n = shape.tokens
    q, k, v = (torch.randn(1, shape.heads, n, shape.head_dim, generator=g).to(device, dtype) for _ in range(3))
    scale = shape.head_dim ** -0.5
    backend = "auto" if cuda else "triton"
    rows = []
    t_sdpa = time_fn(lambda: F.scaled_dot_product_attention(q, k, v))
    flex = None
    if with_flex and cuda:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    for density in densities:
        order, mask, keep = paro_mask(shape, density, block, device)
        ol = order.long()
        gather = lambda x: x.gather(2, ol.view(1, shape.heads, n, 1).expand(1, shape.heads, n, x.shape[-1]))  # noqa
        qg, kg, vg = gather(q), gather(k), gather(v)
        ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), mask, scale=scale, token_order=order) \
            if n <= 20000 or not cuda else None
        row = {"shape": shape.name, "tokens": n, "heads": shape.heads, "head_dim": shape.head_dim,
               "density": density, "kept": float(keep.float().mean()), "sdpa_ms": t_sdpa}
        calls = {
            "block_sparse": lambda: block_sparse_attention_unchecked(qg, kg, vg, mask, scale=scale, backend=backend),
            "paro": lambda: block_sparse_attention_unchecked(q, k, v, mask, scale=scale, token_order=order,
                                                             backend=backend),
            "paro_qk8": lambda: block_sparse_attention_unchecked(q, k, v, mask, scale=scale, token_order=order,
                                                                 qk_int8=True, backend=backend),
            "paro_qk8_pv8": lambda: block_sparse_attention_unchecked(q, k, v, mask, scale=scale, token_order=order,
                                                                     qk_int8=True, pv_int8=True, backend=backend),
        }
        for name, fn in calls.items():
            out = fn()
            row[f"{name}_ms"] = time_fn(fn)
            row[f"{name}_speedup_vs_sdpa"] = t_sdpa / row[f"{name}_ms"]
            if ref is not None:
                row[f"{name}_rel_l2"] = rel_l2(out, ref) if name != "block_sparse" else None
        if flex is not None:
            bm = mask.to_block_mask()
            try:
                row["flex_ms"] = time_fn(lambda: flex(qg, kg, vg, block_mask=bm, scale=scale))
                row["paro_speedup_vs_flex"] = row["flex_ms"] / row["paro_ms"]
            except Exception as exc:  # report, do not hide
                row["flex_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row))
    return rows


def bench_calibration(name: str, steps: int, cuda: bool, dtype: torch.dtype, tiny: bool) -> dict:
    """Dense forwards vs calibrator forwards of a random-weight transformer at the shape's size."""
    import diffaccel
    from diffaccel.methods.paro_calibration import ParoCalibrator

    device = torch.device("cuda" if cuda else "cpu")
    if name.startswith("wan"):
        from diffusers import WanTransformer3DModel

        cfg = dict(num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=4096,
                   freq_dim=256, in_channels=16, out_channels=16, patch_size=(1, 2, 2))
        frames, h, w = 21, 60, 104
        if tiny:
            cfg.update(num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=32, text_dim=16)
            frames, h, w = 3, 8, 10
        model = WanTransformer3DModel(**cfg).to(device, dtype).eval()
        inputs = dict(hidden_states=torch.randn(1, 16, frames, h, w, device=device, dtype=dtype),
                      encoder_hidden_states=torch.randn(1, 512 if not tiny else 8, cfg["text_dim"], device=device,
                                                        dtype=dtype))
    else:
        raise SystemExit(f"--calibration supports wan13-480 (and a tiny rehearsal), got {name!r}")
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)
    timesteps = torch.linspace(999, 1, steps)

    def run() -> float:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            for t in timesteps:
                model(**inputs, timestep=t.view(1).to(device), return_dict=False)
        sync()
        return time.perf_counter() - t0

    run()  # warm-up (allocations, kernels)
    dense_s = run()
    calibrator = ParoCalibrator(num_steps=steps, backend="auto", block_size=BLOCK)
    diffaccel.apply(model, calibrator)
    calib_s = run()
    diffaccel.remove(model)
    t0 = time.perf_counter()
    plan = calibrator.build_plan(model=name, config_hash="random-weights", package_version=diffaccel.__version__,
                                 prompts=1)
    calib_s += time.perf_counter() - t0
    result = {"calibration_model": name, "steps": steps, "dense_s": dense_s, "calibration_s": calib_s,
              "ratio": calib_s / dense_s, "mean_recall": float(plan.recall.mean()), "layers": len(plan.layers)}
    print(json.dumps(result))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_paro.py", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", default=list(SHAPES))
    parser.add_argument("--density", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--calibration", default=None, help="wan13-480: time calibration of that transformer")
    parser.add_argument("--steps", type=int, default=4, help="denoiser forwards for --calibration")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal at tiny sizes")
    parser.add_argument("--out", default="outputs/bench")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = [TINY] if args.tiny else [get_shape(s) for s in args.shape]
    block = 16 if args.tiny else BLOCK
    time_fn = timer(cuda, repeats=2 if args.tiny else 5)
    rows = []
    for shape in shapes:
        rows += bench_attention(shape, args.density, cuda, dtype, block, time_fn, not args.no_flex)
    calib = bench_calibration(args.calibration, args.steps, cuda, dtype, args.tiny) if args.calibration else None
    device = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    import triton

    record = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
              "cuda": torch.version.cuda, "date": _dt.date.today().isoformat(), "command": " ".join(sys.argv),
              "dtype": str(dtype), "block": block, "rows": rows, "calibration": calib}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{record['date']}-{device.replace(' ', '-').lower()}-paro"
    Path(f"{stem}.json").write_text(json.dumps(record, indent=1))
    lines = [f"# PARO attention ({device}, {dtype}, block {block})", "", f"`{record['command']}`", "",
             "| shape | density | sdpa ms | block-sparse ms | paro ms | paro+qk8 ms | paro+qk8+pv8 ms | flex ms | "
             "paro vs sdpa |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['density']} | {r['sdpa_ms']:.3f} | {r['block_sparse_ms']:.3f} | "
                     f"{r['paro_ms']:.3f} | {r['paro_qk8_ms']:.3f} | {r['paro_qk8_pv8_ms']:.3f} | "
                     f"{r.get('flex_ms', float('nan')):.3f} | {r['paro_speedup_vs_sdpa']:.2f}x |")
    if calib:
        lines += ["", f"calibration of {calib['calibration_model']} ({calib['steps']} steps): "
                  f"{calib['calibration_s']:.2f} s vs dense {calib['dense_s']:.2f} s ({calib['ratio']:.2f}x)"]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
