#!/usr/bin/env bash
# Batch invariance on one NVIDIA GPU (run on the device machine from the repository root; $OUT
# receives the JSON reports):
#   bash benchmarks/gpu_invariance.sh
# A sequence's bf16 greedy tokens alone against inside batches, with cuBLAS (the default) and with
# --batch-invariant; the CUDA tests of the mode; decode steps with the mode against without it.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
PY=${PY:-python3}
source benchmarks/gpu_env.sh
MODEL=${MODEL:-random:llama-3-8b}
echo "## batch invariance, bf16, 64 tokens: default, then --batch-invariant"
$PY benchmarks/batch_invariance.py --model "$MODEL" --out "$OUT/invariance_default.json" | head -1
$PY benchmarks/batch_invariance.py --model "$MODEL" --batch-invariant --out "$OUT/invariance_mode.json" | head -1
echo "## tests"
$PY -m pytest -q -p no:cacheprovider tests/test_batch_invariance.py 2>&1 | tail -3
echo "## decode steps (bf16, context 512): default, then --batch-invariant"
for mode in --no-batch-invariant --batch-invariant; do
  mpiexec -n 1 $PY benchmarks/tp_decode.py --model "$MODEL" --dtype bfloat16 --batches "${BATCHES:-1,32,64,256}" \
    --contexts 512 --num-kv-blocks 12000 --steps 20 --new-tokens 4 $mode --out "$OUT/steps$mode.json" | tail -1 | \
    $PY -c "
import json, sys
r = json.loads(sys.stdin.read())
print('batch_invariant', r['batch_invariant'], 'floor', r['floor_per_rank'])
for t in r['decode']: print(f\"  batch {t['batch']:4d} context {t['context']:5d}: {t['median_ms']:7.2f} ms\")"
done
