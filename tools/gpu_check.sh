#!/usr/bin/env bash
# One short GPU session (issue 19; about 8 min worst case, each step under its own `timeout`,
# so a hang costs only that step): kernel correctness, the chunked contrastive loss's
# autotune, contrastive and attention timings, and SigLIP B/16's train step (MFU + profile).
# Everything lands in $WORK and is packed into one file, $OUT/gpu_check.tar.gz (the device
# tool returns at most 8 files), with a one-line status per step printed at the end.
#
# Before (here, once): bash tools/gpu_wheels.sh   (the wheels tools/benchmark.py needs there)
# On the device:       run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=560)
# Needs jax (+ numpy) for the kernel steps; run from the repository root.
set -u
OUT=${OUT:-gpu_out}
WORK=${WORK:-/tmp/gpu_check}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
K=tools/benchmark_kernels.py
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi -L 2>&1 | head -2
$PY -c "import jax; print(jax.__version__, jax.devices())"
STATUS=()
step() {  # step NAME SECONDS CMD...: run one command, log it, keep going on failure
  local name=$1 secs=$2; shift 2
  echo "=== $name (timeout ${secs}s): $*"
  timeout -k 5 "$secs" "$@" 2>&1 | tee "$WORK/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name rc=$rc" | tee -a "$WORK/$name.log"
  STATUS+=("$name rc=$rc")
}
step check_contrastive 55 $PY $K check-gpu --only contrastive --budget-s 45 \
  --json "$WORK/check_contrastive.json"
step check_attention 75 $PY $K check-gpu --only attention --budget-s 62 \
  --json "$WORK/check_attention.json"
step autotune_chunked 80 $PY $K autotune --batches 65536 --implementations chunked \
  --candidates '{"tile_rows": 256}' '{"tile_rows": 512}' '{"tile_rows": 1024}' \
  '{"tile_rows": 2048}' --iters 3 --warmup 1 --variant-timeout 18 \
  --write "$WORK/tuning.json" --json "$WORK/autotune_chunked.json"
# The losses below take the chunk the autotune just stored (if it stored one).
BIG_MM_KERNEL_TUNING="$WORK/tuning.json" step contrastive_gpu 120 $PY $K contrastive-gpu \
  --batches 32768 65536 --iters 3 --warmup 1 --variant-timeout 25 \
  --json "$WORK/contrastive_gpu.json"
step attention_gpu 60 $PY $K attention-gpu --iters 5 --json "$WORK/attention_gpu.json"
step siglip_b16 90 $PY tools/benchmark.py --config configs/siglip_b16.py \
  --config.batch_size=256 --steps 5 --uint8 --profile "$WORK/profile" --profile_steps 3 \
  --out "$WORK/siglip_b16.json"
tar czf "$OUT/gpu_check.tar.gz" -C "$WORK" --exclude=profile . \
  && ls -l "$OUT/gpu_check.tar.gz"
printf '%s\n' "${STATUS[@]}"
