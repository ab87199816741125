#!/usr/bin/env bash
# The flood (benchmarks/flood.py: 10,240 Generate calls at once over 200 tenants, default limits) on the
# device machine's 16 cores, where the client does not take the gateway's CPU as on the 2-core CI machine.
# Random Llama-3-1B weights on the GPU behind the embedded model's tokenizer; one gateway process, then
# GATEWAYS (4) sharing the port. LIMITS: the CPU preset's admission bound (the GPU preset admits all
# 10,240), and float32: in bf16 without --batch-invariant a random model's near-tied logits flip between
# batch sizes, so admitted tokens could not be checked against solo runs. Run from the repo root on the
# device machine:
#   OUT=out bash benchmarks/gpu_flood.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
PY=${PY:-python3}
source benchmarks/gpu_env.sh
nproc
LIMITS=${LIMITS:---dtype float32 --max-num-seqs 128 --max-waiting-requests 1024}
for gateways in 1 ${GATEWAYS:-4}; do
  echo "## gateway processes: $gateways"
  timeout 240 $PY benchmarks/flood.py --launch --serve-args "--device cuda --model random:llama-3-1b \
    --tokenizer .carry/tokenizer --gateway-processes $gateways $LIMITS" --max-rss-gb 64 \
    --out "$OUT/flood_gateways$gateways.json" --serve-log "$OUT/stack_gateways$gateways.log" \
    > "$OUT/flood_gateways$gateways.txt" 2>&1
  echo "flood exit $?"
  sed -n "/calls reported/,\$p" "$OUT/flood_gateways$gateways.txt" | head -30
done
