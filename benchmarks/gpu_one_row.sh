#!/usr/bin/env bash
# Batch-1 projections through one Triton matrix-vector kernel (worker/torch_engine/matvec.py),
# against the base tree, same card, same session. Run from the repo root on the device machine:
#   BASE=.carry/base OUT=out bash benchmarks/gpu_one_row.sh     # BASE: a `git archive` of the base commit
# Prints the CUDA kernel tests, the projection kernel against cuBLAS per shape (GEMV=1), bf16 greedy tokens with
# graphs and eagerly, decode steps beside this run's floor for both trees (one at a time, and pipelined two
# in flight as overlap scheduling runs them), and where a batch-1 step's
# time goes (kernels by kind, launches, idle) for both trees.
set -uo pipefail
BASE=${BASE:-.carry/base}
OUT=${OUT:-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
source benchmarks/gpu_env.sh
MODEL=${MODEL:-random:llama-3-8b}
cp benchmarks/tp_decode.py benchmarks/profile_decode.py benchmarks/profile_step.py "$BASE"/benchmarks/

echo "## kernels"
$PY -m pytest -q tests/test_matvec.py tests/test_fused_kernels.py tests/test_paged_engine.py 2>&1 | tail -3
[ -n "${GEMV:-}" ] && $PY benchmarks/gemv_m1.py --out "$OUT/gemv_m1.json" 2>&1 | tail -7

echo "## bf16 greedy tokens, CUDA graphs against eager"
mpiexec -n 1 $PY benchmarks/tp_decode.py --model "$MODEL" --batches "" --out "$OUT/graphs_bf16.json" >/dev/null 2>&1
mpiexec -n 1 $PY benchmarks/tp_decode.py --model "$MODEL" --batches "" --no-cuda-graphs --out "$OUT/eager_bf16.json" >/dev/null 2>&1
$PY - "$OUT" <<'PYEOF'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/{n}_bf16.json"))["greedy_tokens"] for n in ("graphs", "eager"))
print("bf16 greedy tokens, graphs == eager:", a == b, f"({sum(map(len, a))} tokens)")
PYEOF

for tree in . "$BASE"; do
  name=$( [ "$tree" = . ] && echo this || echo base )
  echo "## decode steps, $name tree"
  (cd "$tree" && mpiexec -n 1 $PY benchmarks/tp_decode.py --model "$MODEL" --batches 1,64 --contexts 128,512,4096 \
     --num-kv-blocks 12000 --steps 20 --new-tokens 4 --out "$OUT/steps_$name.json" >/dev/null 2>&1)
  $PY - "$OUT/steps_$name.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
floor = r["floor_per_rank"][0]
print(r["gpu"], "floor", floor)
for t in r["decode"]:
    print(f"  batch {t['batch']:3d} context {t['context']:5d}: {t['median_ms']:6.2f} ms"
          f" ({t['median_ms'] / floor['floor_ms']:.3f}x the floor), pipelined {t.get('pipelined_ms', 0):6.2f} ms"
          f" ({t.get('pipelined_ms', 0) / floor['floor_ms']:.3f}x)")
PYEOF
  (cd "$tree" && mpiexec -n 1 $PY benchmarks/profile_decode.py --model "$MODEL" --batch 1 2>/dev/null | grep '^{' \
     | tee "$OUT/profile_b1_$name.json")
done
