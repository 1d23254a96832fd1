"""GPU only, NOT RUN in the session that wrote it: a static method compiled with inductor, max-autotune and CUDA
graphs, timed against eager (alternating calls, warm-up excluded, median and min-max).

    python benchmarks/compile_gpu.py --model tiny-wan --method tile --steps 8

Records device, torch/triton versions and the command with the numbers (print; redirect to results/*.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import diffaccel
from diffaccel.pipelines.loading import load_pipeline

MODES = ("eager", "default", "max-autotune-no-cudagraphs", "reduce-overhead")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-wan")
    parser.add_argument("--method", default="tile")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    pipe = load_pipeline(args.model, dtype=torch.bfloat16, device=torch.device("cuda"))
    diffaccel.apply(pipe, args.method)
    base = pipe.transformer
    runners = {}
    for mode in MODES:
        if mode == "eager":
            runners[mode] = base
        else:
            torch._dynamo.reset()
            runners[mode] = torch.compile(base, fullgraph=True, mode=mode)

    def call(mode: str) -> float:
        pipe.transformer = runners[mode]
        torch.cuda.synchronize()
        start = time.perf_counter()
        pipe("a cat", num_inference_steps=args.steps, output_type="latent", generator=torch.Generator("cuda").manual_seed(0))
        torch.cuda.synchronize()
        return time.perf_counter() - start

    for mode in MODES:  # warm-up (compilation) excluded
        call(mode)
    samples: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:  # alternating
            samples[mode].append(call(mode))
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "command": "python benchmarks/compile_gpu.py " + " ".join(argv),
        "seconds": {m: {"median": statistics.median(s), "min": min(s), "max": max(s)} for m, s in samples.items()},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
