"""The adapter decision (docs/adapters.md), re-measured after FLUX.1's migration: stock versus the routed adapter.

FLUX.1's adapter (``adapters/flux.py``) is routed since issue 13's migration: the stock ``FluxAttnProcessor`` runs,
its ``dispatch_attention_fn`` call goes to the method (``adapters/dispatch.py``), the adapter holds the layout. The
explicit adapter it replaced (a re-implementation of the processor, 199 lines) is deleted; its numbers are in
docs/adapters.md. For stock and routed, with the ``dense`` method:

1. exactness: the transformer output versus stock, fp32, max abs difference;
2. per-call overhead: one double-stream attention module call, rounds alternating the two (order rotated),
   warm-up excluded, median and interquartile range of microseconds per call;
3. ``torch.compile``: graph breaks and graphs from ``torch._dynamo.explain`` on the transformer forward;
4. lines of code of the FLUX.1 adapter module.

    python benchmarks/adapter_decision.py [--rounds 60] [--tokens 8] [--json out.json]

Runs on the CPU in a few minutes (no GPU needed; the numbers are Python overhead, which a GPU does not remove).
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import time

import torch


def _model_and_inputs(tokens_side: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    h = w = tokens_side
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), indexing="ij"), -1)
    img_ids = img_ids.reshape(-1, 3).float()
    kwargs = dict(hidden_states=torch.randn(1, h * w, 16), encoder_hidden_states=torch.randn(1, 32, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=img_ids,
                  txt_ids=torch.zeros(32, 3))
    return model, kwargs


MODES = ("stock", "routed")


def _set(model, mode: str) -> None:
    """Install stock (no diffaccel) or the routed FLUX.1 adapter (``diffaccel.apply(model, "dense")``)."""
    import diffaccel

    diffaccel.remove(model)
    if mode == "routed":
        diffaccel.apply(model, "dense")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--calls", type=int, default=20, help="attention calls per timed sample")
    parser.add_argument("--tokens", type=int, default=16, help="image side in tokens (side x side image tokens)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, kwargs = _model_and_inputs(args.tokens)
    result: dict = {"device": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "tokens": args.tokens ** 2 + 32, "command": "python benchmarks/adapter_decision.py"}

    # 1. exactness
    outs = {}
    with torch.no_grad():
        for mode in MODES:
            _set(model, mode)
            outs[mode] = model(**kwargs, return_dict=False)[0]
    result["max_abs_diff"] = {"routed": float((outs["routed"] - outs["stock"]).abs().max())}

    # 2. per-call overhead on one double-stream attention module, the processor's inputs captured once
    attn = model.transformer_blocks[0].attn
    captured = {}

    def grab(module, a, k):
        captured.update(k)
        captured["hidden_states"] = a[0] if a else k["hidden_states"]

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    _set(model, "stock")
    with torch.no_grad():
        model(**kwargs)
    handle.remove()
    samples: dict[str, list[float]] = {m: [] for m in MODES}
    order = list(MODES)
    with torch.no_grad():
        for r in range(args.rounds + 3):
            for mode in order[r % 2:] + order[:r % 2]:
                _set(model, mode)
                if mode != "stock":  # the hook's context as one denoiser call leaves it
                    processor = model.__dict__["_diffaccel_installation"].processor
                    processor.context.grid, processor.context.text_len = (args.tokens, args.tokens), 32
                start = time.perf_counter()
                for _ in range(args.calls):
                    attn(**captured)
                elapsed = (time.perf_counter() - start) / args.calls * 1e6
                if r >= 3:  # warm-up rounds excluded
                    samples[mode].append(elapsed)
    result["us_per_call"] = {
        m: {"median": statistics.median(v), "q1": statistics.quantiles(v, n=4)[0],
            "q3": statistics.quantiles(v, n=4)[2]} for m, v in samples.items()
    }

    # 3. torch.compile graph breaks
    if not args.no_compile:
        result["dynamo"] = {}
        for mode in MODES:
            _set(model, mode)
            torch._dynamo.reset()
            with torch.no_grad():
                explanation = torch._dynamo.explain(model)(**kwargs)
            reasons = sorted({str(b.reason).splitlines()[0][:140] for b in explanation.break_reasons})
            result["dynamo"][mode] = {"graph_breaks": explanation.graph_break_count,
                                      "graphs": explanation.graph_count, "reasons": reasons[:5]}
    _set(model, "stock")

    # 4. lines of code
    from diffaccel.pipelines.adapters import flux

    result["loc"] = {"adapters/flux.py": len(inspect.getsource(flux).splitlines()),
                     "FluxAdapter (layout class)": len(inspect.getsource(flux.FluxAdapter).splitlines())}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
