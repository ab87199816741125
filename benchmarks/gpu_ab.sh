#!/usr/bin/env bash
# Same card, same session: this tree against a base tree (default .carry/base, a `git archive` of an
# older commit): the paged-attention check, fp32 greedy tokens with CUDA graphs against eager, and
# decode step times of both trees at TP=1. Run from the repo root on the device machine.
#   bash benchmarks/gpu_ab.sh [BASE_DIR]
set -uo pipefail
BASE=${1:-.carry/base}
OUT=${OUT:-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(pwd)
PY=${PY:-python3}
source benchmarks/gpu_env.sh
MODEL=${MODEL:-random:llama-3-8b}
$PY benchmarks/check_paged_attention.py 2>&1 | tail -3
mpiexec -n 1 $PY benchmarks/tp_decode.py --model "$MODEL" --dtype float32 --batches "" --out "$OUT/graphs_fp32.json" >/dev/null 2>&1
mpiexec -n 1 $PY benchmarks/tp_decode.py --model "$MODEL" --dtype float32 --batches "" --no-cuda-graphs --out "$OUT/eager_fp32.json" >/dev/null 2>&1
(cd "$BASE" && cp "$ROOT"/inflight/v1/*_pb2*.py inflight/v1/ && \
 mpiexec -n 1 $PY benchmarks/tp_decode.py --model "$MODEL" --dtype float32 --batches "" --out "$OUT/base_fp32.json" >/dev/null 2>&1)
$PY - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
a, b, c = (json.load(open(f"{out}/{n}_fp32.json")) for n in ("graphs", "eager", "base"))
print("fp32 greedy tokens: graphs == eager:", a["greedy_tokens"] == b["greedy_tokens"], "; this tree == base:", a["greedy_tokens"] == c["greedy_tokens"])
PYEOF
for round in 1 2; do
  for tree in . "$BASE"; do
    (cd "$tree" && mpiexec -n 1 $PY benchmarks/tp_decode.py --model "$MODEL" --dtype bfloat16 --batches 1,32,64 \
       --out /dev/null 2>&1 | grep '^{' | sed "s|^|$tree round $round: |")
  done
done
