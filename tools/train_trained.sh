#!/usr/bin/env bash
# Rebuild the shipped trained tiny models from their seeds: the commands that wrote
# diffaccel/pipelines/trained/weights/*.safetensors (each file's JSON header records its command, and the image
# model's records the stage it resumed from; tests/test_trained.py checks that they are the ones below).
#
#   bash tools/train_trained.sh [OUT]        # default OUT: the package's weights folder
#
# CPU, 2 cores, about 2 hours: the image chain and the video chain side by side, one torch thread each. The
# learning-rate schedules follow --steps, so a run is the same run on any machine; --minutes is only a cap (a run
# that hits it stops short, and its record says so). Float summation order differs between machines and thread
# counts, so weights rebuilt elsewhere match in quality, not in bits.
#
# Stage 1 of each model learns the colours (shapes near the centre, --jitter; why: ImageDataConfig.jitter in
# data.py); stage 2 continues at a lower rate (the image model: closer to the centre and larger, for the shapes).
set -euo pipefail
OUT=${1:-diffaccel/pipelines/trained/weights}
STAGE=${STAGE_DIR:-$(mktemp -d)}
DIFFACCEL=${DIFFACCEL:-diffaccel}
mkdir -p "$OUT" "$STAGE/image" "$STAGE/video"

video_chain() {
  $DIFFACCEL train-tiny --model tiny-wan-trained --steps 7000 --minutes 105 --seed 0 --lr 2e-3 --threads 1 \
    --time-shift 2.0 --jitter 3 --out "$STAGE/video"
  $DIFFACCEL train-tiny --model tiny-wan-trained --steps 3500 --minutes 60 --seed 1 --lr 1e-3 --threads 1 \
    --time-shift 2.0 --jitter 3 --resume "$STAGE/video/tiny-wan-trained.safetensors" --out "$OUT"
}
video_chain &
video=$!
$DIFFACCEL train-tiny --model tiny-flux-trained --steps 6500 --minutes 105 --seed 0 --lr 2e-3 --threads 1 \
  --time-shift 1.65 --single-shape 0.9 --two-tone 0.05 --half-range 7 12 --jitter 4 --out "$STAGE/image"
$DIFFACCEL train-tiny --model tiny-flux-trained --steps 3000 --minutes 60 --seed 1 --lr 1e-3 --threads 1 \
  --time-shift 1.65 --single-shape 0.9 --two-tone 0.05 --half-range 8 12 --jitter 2 \
  --resume "$STAGE/image/tiny-flux-trained.safetensors" --out "$OUT"
wait $video
