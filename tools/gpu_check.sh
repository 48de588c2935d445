#!/usr/bin/env bash
# One short GPU session: Pallas kernel correctness, then attention and contrastive timings.
# Logs and JSON go to $OUT (default ./gpu_out). Each step has its own timeout (`timeout`), so a
# hang costs only that step; about 7 min worst case, usually less.
# Needs only jax (+ numpy) importable; run from the repository root.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
B=tools/benchmark_kernels.py
nvidia-smi -L; $PY -c "import jax; print(jax.__version__, jax.devices())"
step() {  # step NAME SECONDS ARGS...: run one subcommand, log it, keep going on failure
  local name=$1 secs=$2; shift 2
  echo "=== $name (timeout ${secs}s)"
  timeout -k 5 "$secs" $PY $B "$@" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
  echo "=== $name rc=${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}
step check_contrastive 70 check-gpu --only contrastive --budget-s 55
step check_attention 130 check-gpu --only attention --budget-s 105
step attention_gpu 90 attention-gpu --iters 5
step contrastive_gpu 110 contrastive-gpu --batch 32768 --iters 5 --variant-timeout 50
ls -l "$OUT"
