"""Per-call cost of diffaccel's adapter on LTX-Video and HunyuanVideo: one attention module call, stock vs ``dense``.

The LTX-Video and HunyuanVideo adapters moved from explicit (re-implemented processors) to routed (the stock
processor runs, its ``dispatch_attention_fn`` call goes to the method; docs/adapters.md). This script times one
attention module call of a tiny random model (grid 3 x 4 x 6, batch 2, 7 padded prompt tokens, fp32) with the stock
processor and with diffaccel's ``dense``, alternating the two each round (order flipped every round), warm-up
rounds excluded; it prints median and quartiles in microseconds per call. Run it in a checkout before and after the
migration to compare the explicit and the routed adapter (each against its own stock baseline, same process):

    python benchmarks/adapter_migration_video.py [--rounds 45] [--calls 20]

CPU only, one thread: the numbers are Python overhead around the same tensor ops.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

GRID, TEXT, BATCH = (3, 4, 6), 7, 2


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _prompt_mask() -> torch.Tensor:
    mask = torch.ones(BATCH, TEXT)
    mask[1, 4:] = 0
    return mask


def _ltx():
    from diffusers import LTXVideoTransformer3DModel

    model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=12,
                                       cross_attention_dim=24, num_layers=1, caption_channels=16)
    f, h, w = GRID
    inputs = dict(hidden_states=torch.randn(BATCH, f * h * w, 8), encoder_hidden_states=torch.randn(BATCH, TEXT, 16),
                  timestep=torch.tensor([700.0, 700.0]), encoder_attention_mask=_prompt_mask(), num_frames=f,
                  height=h, width=w, rope_interpolation_scale=(8 / 25, 32.0, 32.0))
    return _randomize(model), inputs, "transformer_blocks.0.attn1"


def _hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=2, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 4, 4), guidance_embeds=True,
    )
    f, h, w = GRID
    inputs = dict(hidden_states=torch.randn(BATCH, 4, 2 * f, 2 * h, 2 * w), timestep=torch.tensor([700.0, 700.0]),
                  encoder_hidden_states=torch.randn(BATCH, TEXT, 16), encoder_attention_mask=_prompt_mask(),
                  pooled_projections=torch.randn(BATCH, 8), guidance=torch.tensor([4.0, 4.0]))
    return _randomize(model), inputs, "transformer_blocks.0.attn"


def time_family(build, rounds: int, calls: int, warmup: int = 5) -> dict[str, list[float]]:
    import diffaccel

    model, inputs, layer = build()
    attn = dict(model.named_modules())[layer]
    captured: dict = {}
    handle = attn.register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    with torch.no_grad():
        model(**inputs, return_dict=False)
    handle.remove()
    stock = attn.processor
    diffaccel.apply(model, "dense")
    with torch.no_grad():
        model(**inputs, return_dict=False)  # the run hook's state for these inputs
    ours = attn.processor
    times: dict[str, list[float]] = {"stock": [], "diffaccel dense": []}
    order = [("stock", stock), ("diffaccel dense", ours)]
    with torch.no_grad():
        for r in range(rounds + warmup):
            for name, proc in order if r % 2 else order[::-1]:
                attn.processor = proc
                start = time.perf_counter()
                for _ in range(calls):
                    attn(*captured["args"], **captured["kwargs"])
                if r >= warmup:
                    times[name].append((time.perf_counter() - start) / calls * 1e6)
    attn.processor = ours
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=45)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from diffaccel.warn import DiffAccelWarning

    warnings.simplefilter("ignore", DiffAccelWarning)
    for family, build in (("ltx", _ltx), ("hunyuan_video", _hunyuan)):
        for name, ts in time_family(build, args.rounds, args.calls).items():
            q1, _, q3 = statistics.quantiles(ts, n=4)
            med = statistics.median(ts)
            print(f"{family:14s} {name:16s} median {med:7.0f} us  [q1 {q1:.0f}, q3 {q3:.0f}]  n={len(ts)}")


if __name__ == "__main__":
    main()
