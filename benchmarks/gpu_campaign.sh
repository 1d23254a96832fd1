#!/usr/bin/env bash
# The GPU campaign: everything the project measures on a lent GPU, in one device call of at most ~9 minutes.
#
#   bash benchmarks/gpu_campaign.sh             # on the lent H100/H200 (run from the repository root)
#   bash benchmarks/gpu_campaign.sh --dry-run   # rehearsal on the CPU: every stage at tiny sizes (TRITON_INTERPRET=1;
#                                               # the e2e stages run as one, both models in one process)
#
# Stages, in order, each under its own timeout (cut to the time left of CAMPAIGN_BUDGET_S, default 540 s, less 25 s;
# SIGTERM at the limit, SIGKILL 20 s later: bench e2e then writes what it measured; a stage with under 20 s left is
# skipped, and says so):
#   env        GPU, driver, Python, torch, Triton, diffusers versions
#   wheels     install the carried wheels (.whl/, made by ../shared/tools/device-wheels.sh: diffusers is not on the
#              device image) into /tmp/site
#   tests      the kernel test files compiled on the GPU (not the interpreter): the @gpu tests (bf16/fp16
#              tolerances, FlexAttention parity) and every other kernel test with CUDA tensors, which covers the
#              cached launch path and every kernel change since the last GPU run; then the sync-free pipeline test
#   kernels    the kernel benchmark at BENCHMARKS.md shapes (flux-1024, wan13-480; densities 1, 0.5, 0.25, 0.1)
#   e2e-flux   diffaccel bench e2e, flux-dev 1024x1024, every registered method
#   e2e-wan    diffaccel bench e2e, wan21-1.3b 480x832x81, every registered method
#   locality   the locality benchmark (flux-1024, wan13-480)
#   e2e-*      larger ones while time remains: cogvideox-5b 480x720x49, wan21-14b 720p, hunyuan-video 720p
# Each stage's log and results go to a work folder that is packed into $OUT/campaign.tar.gz after every stage, with
# $OUT/summary.md (one row per stage: status, seconds) and $OUT/campaign.log beside it, so a timeout of the whole
# call still returns everything finished before it. $OUT defaults to outputs/campaign[-dry].
#
# On the device: carry [".whl"] and run `bash benchmarks/gpu_campaign.sh` with timeout_s 600.
set -uo pipefail

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "error: unknown option $arg (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}
BUDGET=${CAMPAIGN_BUDGET_S:-540}
OUT=${OUT:-$ROOT/outputs/campaign$([ $DRY = 1 ] && echo -dry)}
WORK=${CAMPAIGN_WORK:-$(mktemp -d /tmp/campaign.XXXXXX)}
mkdir -p "$OUT" "$WORK/results"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=
else
  unset TRITON_INTERPRET
fi
SUMMARY="$WORK/summary.md"
{
  echo "# GPU campaign $( [ $DRY = 1 ] && echo '(dry run on the CPU: tiny sizes, times mean nothing)')"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown); budget ${BUDGET} s"
  echo
  echo "| stage | status | seconds | command |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

pack() {  # everything so far into $OUT (atomic: a killed call leaves the previous pack)
  cp "$SUMMARY" "$OUT/summary.md"
  cat "$WORK"/*.log > "$OUT/campaign.log" 2>/dev/null
  tar -czf "$OUT/.campaign.tar.gz" -C "$WORK" . && mv -f "$OUT/.campaign.tar.gz" "$OUT/campaign.tar.gz"
}

# stage NAME CAP_SECONDS COMMAND...: run under min(CAP, time left - 10 s); record the row; pack
stage() {
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - SECONDS - 25)) limit
  limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 20 ]; then
    echo "| $name | skipped: ${left} s left | 0 | \`$*\` |" >> "$SUMMARY"; pack; return 0
  fi
  local start=$SECONDS rc
  if declare -F "$1" >/dev/null; then set -- bash -c "$1"; fi  # a function above (exported), under timeout too
  echo "== $name (limit ${limit} s): $*" | tee -a "$WORK/$name.log"
  timeout --kill-after=20 "$limit" "$@" >> "$WORK/$name.log" 2>&1
  rc=$?
  local status=ok
  if [ $rc = 124 ] || [ $rc = 137 ]; then status="timeout after ${limit} s"; elif [ $rc != 0 ]; then status="failed (exit $rc)"; fi
  echo "| $name | $status | $((SECONDS - start)) | \`$*\` |" >> "$SUMMARY"
  echo "== $name: $status in $((SECONDS - start)) s" | tee -a "$WORK/$name.log"
  tail -n 3 "$WORK/$name.log"
  pack
}

env_report() {
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for dist in ("triton", "diffusers", "transformers", "safetensors", "typer", "matplotlib", "tqdm", "natten"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
EOF
}

install_wheels() {
  if [ $DRY = 1 ]; then echo "dry run: the current environment is used"; return 0; fi
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no .whl/*.whl carried (run ../shared/tools/device-wheels.sh here and carry .whl)"
    "$PY" -c "import diffusers" && return 0 || return 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
  "$PY" -c "import sys; sys.path.insert(0, '/tmp/site'); import diffusers; print('diffusers', diffusers.__version__)"
}

export -f env_report install_wheels
export DRY PY
E2E=("$PY" -m diffaccel.cli bench e2e --no-progress --out "$WORK/results")
KERNEL_TESTS=(tests/test_kernels_block_sparse.py tests/test_kernels_token_order.py tests/test_kernels_quant.py
              tests/test_kernels_stats.py tests/test_kernels_masks.py)

stage env 30 env_report
stage wheels 90 install_wheels
[ $DRY = 1 ] || export PYTHONPATH="/tmp/site:$PYTHONPATH"

if [ $DRY = 1 ]; then
  # collection of every kernel test file, and the @gpu tests (skipped without CUDA): the stage's command line works
  stage tests 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu "${KERNEL_TESTS[@]}"
  stage kernels 120 "$PY" benchmarks/bench_kernels.py --tiny --quick --shape tiny-image --method sdpa ours-bf16 \
    --no-flex-compile --no-progress --no-plot --out "$WORK/results"
  stage e2e 150 "${E2E[@]}" --model-config flux-dev,wan21-1.3b --scale tiny --methods dense,gna,tile \
    --backend reference --steps-timed 1 --warmup 0
  stage locality 120 "$PY" benchmarks/bench_locality.py --tiny --quick --shape tiny-video --method tile --no-flex-compile --no-progress \
    --out "$WORK/results"
else
  stage tests 150 "$PY" -m pytest -q -x -p no:cacheprovider "${KERNEL_TESTS[@]}" tests/test_sync_free.py
  stage kernels 100 "$PY" benchmarks/bench_kernels.py --shape flux-1024 wan13-480 --density 1 0.5 0.25 0.1 \
    --no-progress --out "$WORK/results"
  stage e2e-flux 100 "${E2E[@]}" --model-config flux-dev --height 1024 --width 1024 --steps-timed 3
  stage e2e-wan 130 "${E2E[@]}" --model-config wan21-1.3b --height 480 --width 832 --frames 81 --steps-timed 3
  stage locality 90 "$PY" benchmarks/bench_locality.py --quick --no-progress --out "$WORK/results"
  stage e2e-cogvideox 90 "${E2E[@]}" --model-config cogvideox-5b --steps-timed 2
  stage e2e-wan14b 150 "${E2E[@]}" --model-config wan21-14b --methods dense,gna,tile --steps-timed 1
  stage e2e-hunyuan 150 "${E2E[@]}" --model-config hunyuan-video --methods dense,gna,tile --steps-timed 1
fi

echo >> "$SUMMARY"
echo "Results (JSON, markdown, plots) are under results/ in campaign.tar.gz; logs per stage beside them." >> "$SUMMARY"
pack
cat "$SUMMARY"
grep -q "| failed\|| timeout" "$SUMMARY" && exit 1
exit 0
