#!/usr/bin/env bash
# One-GPU checks of the decode fast path, then the serving benchmark (run from the repo root on
# the device machine; $OUT receives the reports).
#   bash benchmarks/gpu_decode.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
PY=${PY:-python3}
source benchmarks/gpu_env.sh
MODEL=${MODEL:-random:llama-3-8b}
$PY benchmarks/check_paged_attention.py 2>&1 | tail -3
# Greedy tokens with CUDA graphs + paged attention against the eager gathered path, in float32.
mpiexec -n 1 $PY benchmarks/tp_decode.py --model "$MODEL" --dtype float32 --batches "" --out "$OUT/graphs_fp32.json" >/dev/null 2>&1
mpiexec -n 1 $PY benchmarks/tp_decode.py --model "$MODEL" --dtype float32 --batches "" --no-cuda-graphs --out "$OUT/eager_fp32.json" >/dev/null 2>&1
mpiexec -n 1 $PY benchmarks/tp_decode.py --model "$MODEL" --dtype bfloat16 --batches 1,32 --out "$OUT/graphs_bf16.json" 2>&1 | grep '^{'
$PY - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
a, b = (json.load(open(f"{out}/{n}_fp32.json")) for n in ("graphs", "eager"))
print("graphs", a["cuda_graphs"], "eager", b["cuda_graphs"], "fp32 greedy tokens identical:", a["greedy_tokens"] == b["greedy_tokens"],
      [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), None) for p, q in zip(a["greedy_tokens"], b["greedy_tokens"])])
PYEOF
[ "${SKIP_BENCH:-0}" = 1 ] || timeout 540 $PY benchmarks/serving.py --device cuda --model "$MODEL" --tokenizer .carry/tokenizer --out "$OUT/bench" > "$OUT/bench_log.txt" 2>&1
grep -v "it/s\|s/it" "$OUT/bench_log.txt" 2>/dev/null | grep -A30 "## The stack"
