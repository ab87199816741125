#!/usr/bin/env bash
# The model families on NVIDIA GPUs (run on the device machine from the repository root; $OUT gets
# the JSON reports): the paged decode kernel with ALiBi against SDPA, MPT-7B and Mixtral-8x7B shapes
# (random weights) at TP ranks, fp32 greedy tokens of CUDA graphs against eager, decode step times.
#   TP=1 bash benchmarks/gpu_families.sh          # one GPU
#   TP=2 bash benchmarks/gpu_families.sh          # two GPUs: also compare the tokens with TP=1
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
PY=${PY:-python3}
TP=${TP:-1}
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY benchmarks/check_paged_attention.py 2>&1 | tail -2
[ "${SKIP_MOE_CHECK:-0}" = 1 ] || $PY benchmarks/check_fused_moe.py 2>&1 | tail -3
run() {  # name model dtype batches [extra...]
  local name=$1 model=$2 dtype=$3 batches=$4; shift 4
  for tp in $(seq 1 "$TP"); do
    [ "$tp" = 1 ] || [ "$tp" = "$TP" ] || continue
    mpiexec -n "$tp" $PY benchmarks/tp_decode.py --model "$model" --dtype "$dtype" --batches "$batches" "$@" \
      --out "$OUT/${name}_tp${tp}.json" > "$OUT/${name}_tp${tp}.log" 2>&1 || { echo "$name tp=$tp failed"; tail -5 "$OUT/${name}_tp${tp}.log"; }
  done
}
run mpt_fp32 random:mpt-7b float32 ""
run mpt_fp32_eager random:mpt-7b float32 "" --no-cuda-graphs
run mixtral_tiny_fp32 random:tiny-mixtral float32 ""
run mixtral_tiny_fp32_eager random:tiny-mixtral float32 "" --no-cuda-graphs
run mpt_bf16 random:mpt-7b bfloat16 "${BATCHES:-1,32,64}"
run mixtral_bf16 random:mixtral-8x7b bfloat16 "${BATCHES:-1,32,64}" --num-kv-blocks 1024
$PY - "$OUT" "$TP" <<'PYEOF'
import json, sys
from pathlib import Path
out, tp = Path(sys.argv[1]), int(sys.argv[2])
def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None
summary = {}
for name in ("mpt_fp32", "mixtral_tiny_fp32"):
    a, b = load(f"{name}_tp1"), load(f"{name}_eager_tp1")
    if a and b:
        summary[f"{name} tokens, graphs == eager"] = a["greedy_tokens"] == b["greedy_tokens"]
        summary[f"{name} graphs used"] = a["cuda_graphs"]
if tp > 1:
    for name in ("mpt_fp32", "mpt_fp32_eager", "mixtral_tiny_fp32", "mixtral_tiny_fp32_eager"):
        one, many = load(f"{name}_tp1"), load(f"{name}_tp{tp}")
        if one and many:
            summary[f"{name} tokens, tp{tp} == tp1"] = one["greedy_tokens"] == many["greedy_tokens"]
for name in ("mpt_bf16", "mixtral_bf16"):
    for t in sorted({1, tp}):
        report = load(f"{name}_tp{t}")
        if report:
            summary[f"{name} tp{t} decode ms"] = {d["batch"]: round(d["median_ms"], 2) for d in report["decode"]}
            summary[f"{name} tp{t} weight GB/rank"] = [round(w / 1e9, 1) for w in report["weight_bytes_per_rank"]]
print(json.dumps(summary, indent=1))
PYEOF
