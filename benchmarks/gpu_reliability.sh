#!/usr/bin/env bash
# One-GPU check of the reliability work on CUDA (run from the repo root on the device machine):
# the decode fast path's fp32 greedy tokens (CUDA graphs against eager) and its bf16 step times, then the
# fuzz script against the whole stack on random Llama-3-8B weights: no UNKNOWN/INTERNAL, no worker-group
# loss, bystanders exact, every block free afterwards.
#   bash benchmarks/gpu_reliability.sh
# Carried there (git-ignored here): .carry/wheels (see gpu_env.sh), .carry/tokenizer (the prepared embedded
# model's config.json and tokenizer files, for the gateway in front of random weights), and inflight/v1.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
PY=${PY:-python3}
source benchmarks/gpu_env.sh
MODEL=${MODEL:-random:llama-3-8b}
SKIP_BENCH=1 bash benchmarks/gpu_decode.sh
timeout 420 $PY benchmarks/fuzz.py --launch --serve-args "--device cuda --model $MODEL --tokenizer .carry/tokenizer" \
  --requests "${FUZZ_REQUESTS:-1000}" --seed 3 --out "$OUT/fuzz_cuda.json" --serve-log "$OUT/stack.log" > "$OUT/fuzz_cuda.txt" 2>&1
echo "fuzz exit $?"
sed -n '/final status codes/,/^by family/p;/acceptance checks/,$p' "$OUT/fuzz_cuda.txt"
