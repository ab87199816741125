#!/usr/bin/env bash
# The GPU engine against its base tree and the plain-PyTorch reference, same card, same session
# (issue: GPU engine at the roofline). Run from the repo root on the device machine:
#   bash benchmarks/gpu_engine.sh [BASE_DIR]      # BASE_DIR: default .carry/base, a `git archive` of the base commit
# Parts (PARTS="kernels tokens steps mix alone reference"): CUDA kernel tests and timings; fp32 greedy tokens
# (graphs, eager, base); decode step times at batch x context; mixed steps; the engine alone on the GPU
# preset's concurrency-64 workloads; the reference decoder.
set -uo pipefail
BASE=${1:-.carry/base}
OUT=${OUT:-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(pwd)
PY=${PY:-python3}
source benchmarks/gpu_env.sh
MODEL=${MODEL:-random:llama-3-8b}
PARTS=${PARTS:-kernels tokens steps mix alone reference}
BATCHES=${BATCHES:-1,8,32,64,256}
CONTEXTS=${CONTEXTS:-128,512,4096}
TREES=${TREES:-". $BASE"}  # the trees that the timing parts run in
# The base tree keeps its own generated protos (its contracts differ): generate them into it before carrying.
# The same drivers for both trees.
cp benchmarks/tp_decode.py "$BASE"/benchmarks/tp_decode_new.py
cp benchmarks/tp_decode.py benchmarks/tp_decode_new.py
cp benchmarks/engine_alone.py "$BASE"/benchmarks/engine_alone.py
has() { [[ " $PARTS " == *" $1 "* ]]; }

if has kernels; then
  echo "## kernels"
  $PY -m pytest -q tests/test_attention_kernels.py tests/test_fused_kernels.py tests/test_matvec.py \
    tests/test_paged_engine.py 2>&1 | tail -3
  $PY benchmarks/check_paged_attention.py 2>&1 | tail -30
fi
if has tokens; then
  echo "## fp32 greedy tokens"
  mpiexec -n 1 $PY benchmarks/tp_decode.py --model "$MODEL" --dtype float32 --batches "" --out "$OUT/graphs_fp32.json" >/dev/null 2>&1
  mpiexec -n 1 $PY benchmarks/tp_decode.py --model "$MODEL" --dtype float32 --batches "" --no-cuda-graphs --out "$OUT/eager_fp32.json" >/dev/null 2>&1
  (cd "$BASE" && mpiexec -n 1 $PY benchmarks/tp_decode_new.py --model "$MODEL" --dtype float32 --batches "" --out "$OUT/base_fp32.json" >/dev/null 2>&1)
  $PY - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
a, b, c = (json.load(open(f"{out}/{n}_fp32.json")) for n in ("graphs", "eager", "base"))
print("fp32 greedy tokens: graphs == eager:", a["greedy_tokens"] == b["greedy_tokens"],
      "; graphs == base tree:", a["greedy_tokens"] == c["greedy_tokens"])
PYEOF
fi
if has steps; then
  echo "## decode steps (bf16), this tree then the base tree"
  for tree in $TREES; do
    (cd "$tree" && mpiexec -n 1 $PY benchmarks/tp_decode_new.py --model "$MODEL" --dtype bfloat16 --batches "$BATCHES" \
       --contexts "$CONTEXTS" --num-kv-blocks 12000 --steps 20 --new-tokens 4 --out "$OUT/steps_$(basename "$tree").json" 2>&1 \
       | grep '^{' | $PY -c "
import json, sys
r = json.loads(sys.stdin.read())
print('$tree', r['gpu'], 'cuda_graphs', r['cuda_graphs'])
for t in r['decode']: print(f\"  batch {t['batch']:4d} context {t['context']:5d}: {t['median_ms']:7.2f} ms\")")
  done
fi
if has mix; then
  echo "## mixed steps (bf16, 64 decodes at context 128), this tree then the base tree"
  for tree in $TREES; do
    (cd "$tree" && $PY benchmarks/step_mix.py --model "$MODEL" --chunks 16,64,512,2048 2>&1 | grep '^{' | sed "s|^|$tree: |")
  done
fi
if has alone; then
  echo "## engine alone (bf16, concurrency 64), this tree then the base tree"
  for tree in $TREES; do
    (cd "$tree" && $PY benchmarks/engine_alone.py --model "$MODEL" --tokenizer "$ROOT/.carry/tokenizer" 2>&1 \
       | grep '^{' | sed "s|^|$tree: |")
  done
fi
if has reference; then
  echo "## plain-PyTorch reference decoder (bf16, torch.compile)"
  # Each shape compiles afresh: batch 1 at every context, the larger batches at context 512.
  for shape in "1 $CONTEXTS" "8,32,64,256 512"; do
    set -- $shape
    $PY benchmarks/reference_decoder.py --model "$MODEL" --device cuda --dtype bfloat16 --batches "$1" \
        --contexts "$2" --steps 30 2>&1 | grep '^{'
  done
fi
