#!/usr/bin/env bash
# `diffaccel eval` on a GPU machine (NOT run yet: no GPU was lent to issue 14's session). Speed only: the tiny
# pipelines have random weights, so their fidelity numbers say nothing about quality; real checkpoints (gated,
# downloaded once) give both. Usage: benchmarks/eval_gpu.sh OUT_DIR [NUM_GPUS]
set -euo pipefail
out=${1:?output folder}; gpus=${2:-1}
# 1. the tiny recipes on the GPU: the CUDA-event timing path, one process
diffaccel eval --config configs/eval/tiny-flux.yaml --device cuda --out "$out/tiny-flux"
diffaccel eval --config configs/eval/tiny-wan.yaml --device cuda --out "$out/tiny-wan"
# 2. data parallel over the GPUs: the same report as one process (timings aside)
if [ "$gpus" -gt 1 ]; then
  accelerate launch --num_processes "$gpus" -m diffaccel.cli eval --config configs/eval/tiny-flux.yaml \
    --out "$out/tiny-flux-${gpus}gpu"
fi
# 3. a real recipe where its weights are in the Hugging Face cache (speed and fidelity; 2 prompts x 1 seed)
if python -c "from huggingface_hub import try_to_load_from_cache as t; import sys; sys.exit(not isinstance(t('black-forest-labs/FLUX.1-dev', 'model_index.json'), str))"; then
  diffaccel eval --config configs/eval/flux-1024.yaml --num 2 --seeds 0 --out "$out/flux-1024"
fi
