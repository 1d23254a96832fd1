"""Two-process context-parallel runs for tests/test_context_parallel.py (run in spawned processes, gloo on the CPU).

Each case builds a tiny Wan or FLUX transformer (4 heads, seeded), installs a diffaccel method, and runs it twice
(two denoising steps, so AdaSpa's searched mask is used at the second): once on the whole sequence in this process
(the reference, no parallelism), once with diffusers' ``enable_parallelism(ContextParallelConfig(...))`` on both
ranks. Rank 0 writes the largest difference per case, the method's call counts, and the error messages of the
cases that must raise.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

HEADS = 4


def tiny_wan():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()


def tiny_flux(heads: int = HEADS):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def wan_inputs(step: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 4, 4, 8, 8, generator=g),  # grid (4, 4, 4): 64 tokens
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
        "timestep": torch.tensor([900.0 - 100 * step]),
        "return_dict": False,
    }


def flux_inputs(step: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(2)
    rows, cols, text = 8, 8, 8
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] = torch.arange(rows)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None, :]
    return {
        "hidden_states": torch.randn(1, rows * cols, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, text, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.9 - 0.1 * step]),
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }


def _sharpen_first_heads(model, factor: float = 3.0):
    """Scale the query projections of heads 0 and 1 (peaked attention, high recall; heads 2, 3 diffuse): AdaSpa's
    head tiers, ranked over every head of the model, then differ from a ranking within one rank's heads."""
    import torch

    rows = 2 * 16  # two heads of head_dim 16
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("to_q", "add_q_proj")) and "attn2" not in name:
                module.weight[:rows] *= factor
                if module.bias is not None:
                    module.bias[:rows] *= factor
    return model


BUILD = {"wan": (lambda: _sharpen_first_heads(tiny_wan()), wan_inputs),
         "flux": (lambda: _sharpen_first_heads(tiny_flux()), flux_inputs),
         "flux-3-heads": (lambda: tiny_flux(3), flux_inputs)}

CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "wan-dense": ("wan", "dense", {}),
    "wan-gna": ("wan", "gna", {"block_size": 16, "kernel_size": [3, 3, 3], "backend": "reference"}),
    # one frame list per head: per-head state indexed by global head id
    "wan-tile": ("wan", "tile", {"block_size": 16, "global_frames": [[0], [1], [2], [3]], "backend": "reference"}),
    "wan-adaspa": ("wan", "adaspa", {"block_size": 16, "sparsity": 0.5, "search_at": [0.5], "backend": "reference",
                                     "recall_threshold": 1e-6}),
    "flux-dense": ("flux", "dense", {}),
    "flux-gna": ("flux", "gna", {"block_size": 16, "kernel_size": [3, 3], "backend": "reference"}),
    "flux-adaspa": ("flux", "adaspa", {"block_size": 16, "sparsity": 0.5, "search_at": [0.5],
                                       "backend": "reference", "recall_threshold": 1e-6}),
}


def _run(family: str, method: str, config: dict[str, Any], cp: Any | None, *, order: str = "apply-first"):
    """Two steps of ``method`` on a fresh seeded model; ``cp``: a ContextParallelConfig or None."""
    import torch

    import diffaccel

    build, inputs = BUILD[family]
    torch.manual_seed(0)
    model = build()
    if cp is not None and order == "cp-first":
        model.enable_parallelism(config=cp)
    processor = diffaccel.apply(model, method, **config)
    processor.context.num_steps_fn = lambda: 2
    if cp is not None and order == "apply-first":
        model.enable_parallelism(config=cp)
    outs = []
    with torch.no_grad():
        for step in range(2):
            outs.append(model(**inputs(step))[0])
    counts = getattr(processor.method, "call_counts", None)
    return outs, (None if counts is None else (counts.method, counts.dense))


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return f"{type(exc).__name__}: {exc}"
    return None


def worker(rank: int, world: int, init_file: str, out_dir: str, cases: list[str], errors: bool) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.distributed as dist

    # diffusers' _resolve_parallel_config computes rank % torch.accelerator.device_count(): 0 on a CPU machine
    torch.accelerator.device_count = lambda: 1
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result: dict[str, Any] = {"cases": {}, "errors": {}}
    try:
        from diffusers import ContextParallelConfig

        for name in cases:
            family, method, config = CASES[name]
            ref, ref_counts = _run(family, method, config, None)
            order = "cp-first" if name.endswith("-dense") else "apply-first"  # both install orders
            out, counts = _run(family, method, config, ContextParallelConfig(ulysses_degree=world), order=order)
            diff = max(float((a - b).abs().max()) for a, b in zip(out, ref))
            finite = all(bool(torch.isfinite(o).all()) for o in out)
            result["cases"][name] = {"diff": diff, "finite": finite, "counts": counts, "ref_counts": ref_counts}
        if errors:
            result["errors"] = _error_cases(world)
        result["stock_diff"] = _stock_diff(world)
    except Exception:  # noqa: BLE001
        result["crash"] = traceback.format_exc()
    finally:
        if rank == 0:
            Path(out_dir, "result.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def _stock_diff(world: int) -> float:
    """Stock diffusers CP (no diffaccel) against one process: the gloo all-to-all path itself is exact."""
    import torch
    from diffusers import ContextParallelConfig

    torch.manual_seed(0)
    ref_model = tiny_wan()
    torch.manual_seed(0)
    model = tiny_wan()
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    with torch.no_grad():
        return float((model(**wan_inputs(0))[0] - ref_model(**wan_inputs(0))[0]).abs().max())


def _error_cases(world: int) -> dict[str, str | None]:
    """Parallel configs diffaccel cannot honour: each must raise (never return a result)."""
    from diffusers import ContextParallelConfig

    def ring(method):
        return lambda: _run("wan", method, {}, ContextParallelConfig(ring_degree=world))

    out = {
        # dense under ring attention runs through diffusers' templated ring (exact); anything else raises
        "ring-msw": ring("msw"),
        "ulysses-unsupported-method": lambda: _run("wan", "msw", {}, ContextParallelConfig(ulysses_degree=world)),
        "ulysses-unsupported-method-cp-first": lambda: _run(
            "wan", "vmoba", {}, ContextParallelConfig(ulysses_degree=world), order="cp-first"),
        "uneven-heads": lambda: _run("flux-3-heads", "dense", {}, ContextParallelConfig(ulysses_degree=world)),
        "ulysses-anything": lambda: _run(
            "wan", "dense", {}, ContextParallelConfig(ulysses_degree=world, ulysses_anything=True)),
    }
    def bare_processor():  # no diffaccel.apply: the processor is never told about the parallel config
        import torch

        from diffaccel.pipelines.processor import DiffAccelAttnProcessor

        torch.manual_seed(0)
        model = tiny_flux()
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        model.set_attn_processor(DiffAccelAttnProcessor("dense"))
        with torch.no_grad():
            model(**flux_inputs(0))

    out["bare-processor-after-cp"] = bare_processor
    results = {name: _error(fn) for name, fn in out.items()}
    # ring + dense: must equal the single-process result
    import torch

    ref, _ = _run("wan", "dense", {}, None)
    got, _ = _run("wan", "dense", {}, ContextParallelConfig(ring_degree=world))
    results["ring-dense-diff"] = repr(max(float((a - b).abs().max()) for a, b in zip(got, ref)))
    return results


def spawn(fn, world: int, tmp: Path, *args) -> dict[str, Any]:
    """Run ``fn(rank, world, init_file, out_dir, *args)`` in ``world`` spawned processes; rank 0's result."""
    import torch.multiprocessing as mp

    init_file = tmp / "init"
    mp.start_processes(fn, args=(world, str(init_file), str(tmp), *args), nprocs=world, join=True,
                       start_method="spawn")
    return json.loads((tmp / "result.json").read_text())


if __name__ == "__main__":  # python tests/cp_helpers.py CASE...: the same runs outside pytest
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(spawn(worker, 2, Path(d), sys.argv[1:] or list(CASES), True), indent=1))
