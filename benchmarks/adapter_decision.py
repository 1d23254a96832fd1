"""The adapter decision (docs/adapters.md): explicit adapters (a) versus routed adapters (b), measured on FLUX.1.

FLUX.1's ``FluxAttnProcessor`` calls ``dispatch_attention_fn``, so the same model can run through today's explicit
adapter (``adapters/flux.py``, which re-implements the processor) and through a routed adapter (the stock processor
runs, its attention call goes to the method; ``adapters/dispatch.py``) holding FLUX.1's layout only. For each of
stock / (a) / (b), with the ``dense`` method:

1. exactness: the transformer output versus stock, fp32, max abs difference;
2. per-call overhead: one double-stream attention module call, rounds alternating the three (order rotated),
   warm-up excluded, median and interquartile range of microseconds per call;
3. ``torch.compile``: graph breaks and graphs from ``torch._dynamo.explain`` on the transformer forward;
4. lines of code of the FLUX.1 adapter either way.

    python benchmarks/adapter_decision.py [--rounds 60] [--tokens 256] [--json out.json]

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


def _routed_flux_adapter():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from diffaccel.pipelines.adapters.dispatch import RoutedAdapter, grid_or_none, joint_layout, prepare_routed

    class RoutedFlux(RoutedAdapter):
        """FLUX.1 as a routed adapter: the layout only (text first; single-stream text length from the hook)."""

        family = "flux"
        stock_processors = ()

        def layout(self, attn, call, ctx, query, key, attn_mask, index):
            n = query.shape[1]
            t = call.encoder_hidden_states.shape[1] if call.encoder_hidden_states is not None else int(ctx.text_len)
            return joint_layout(n, grid_or_none(ctx, n - t, "FLUX.1"), t, text_first=True), attn_mask

    prepare_routed(FluxAttnProcessor)
    return RoutedFlux()


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


class _Mode:
    """Installs stock, explicit (a) or routed (b) on the model."""

    def __init__(self, model):
        from diffaccel.pipelines.adapters import base

        self.model = model
        self.base = base
        base._load_builtin_adapters()
        self.explicit = base._ADAPTERS["FluxAttnProcessor"]
        self.routed = _routed_flux_adapter()

    def set(self, mode: str) -> None:
        import diffaccel

        diffaccel.remove(self.model)
        if mode == "stock":
            return
        self.base._ADAPTERS["FluxAttnProcessor"] = self.explicit if mode == "a" else self.routed
        diffaccel.apply(self.model, "dense")

    def restore(self) -> None:
        import diffaccel

        diffaccel.remove(self.model)
        self.base._ADAPTERS["FluxAttnProcessor"] = self.explicit


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
    modes = _Mode(model)
    result: dict = {"device": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "tokens": args.tokens ** 2 + 32, "command": "python benchmarks/adapter_decision.py"}

    # 1. exactness
    outs = {}
    with torch.no_grad():
        for mode in ("stock", "a", "b"):
            modes.set(mode)
            outs[mode] = model(**kwargs, return_dict=False)[0]
    result["max_abs_diff"] = {m: float((outs[m] - outs["stock"]).abs().max()) for m in ("a", "b")}

    # 2. per-call overhead on one double-stream attention module, the processor's inputs captured once
    attn = model.transformer_blocks[0].attn
    captured = {}

    def grab(module, a, k):
        captured.update(k)
        captured["hidden_states"] = a[0] if a else k["hidden_states"]

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    modes.set("stock")
    with torch.no_grad():
        model(**kwargs)
    handle.remove()
    samples: dict[str, list[float]] = {"stock": [], "a": [], "b": []}
    order = ["stock", "a", "b"]
    with torch.no_grad():
        for r in range(args.rounds + 3):
            for mode in order[r % 3:] + order[:r % 3]:
                modes.set(mode)
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
        for mode in ("stock", "a", "b"):
            modes.set(mode)
            torch._dynamo.reset()
            with torch.no_grad():
                explanation = torch._dynamo.explain(model)(**kwargs)
            reasons = sorted({str(b.reason).splitlines()[0][:140] for b in explanation.break_reasons})
            result["dynamo"][mode] = {"graph_breaks": explanation.graph_break_count,
                                      "graphs": explanation.graph_count, "reasons": reasons[:5]}
    modes.restore()

    # 4. lines of code
    from diffaccel.pipelines.adapters import flux

    result["loc"] = {"a (adapters/flux.py)": len(inspect.getsource(flux).splitlines()),
                     "b (layout class in this script)": len(inspect.getsource(_routed_flux_adapter).splitlines())}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
