#!/usr/bin/env bash
# A decode-step change against the base tree, or engine settings against each other, same card, same session
# (run from the repo root on the device machine):
#   BASE=.carry/base OUT=out bash benchmarks/gpu_decode_ab.sh     # BASE: a `git archive` of the base commit,
#                                                                 # with its generated protos
#   SETTINGS="--no-pdl --pdl-max-rows=1 --pdl-max-rows=64,--peer-add-norm" OUT=out bash benchmarks/gpu_decode_ab.sh
# SETTINGS: space-separated settings, each comma-separated flags of benchmarks/tp_decode.py (the worker's
# engine flags), all in this tree. The CUDA kernel and engine tests in this tree; greedy tokens with CUDA
# graphs against eager, bf16 and fp32 (decode-only steps replay graphs, mixed steps and eager steps do not),
# in this tree under the last setting; then decode steps at TP=1 and for one rank of TP=2 with no
# all-reduce (tp_decode.py --rank-alone 2), the trees or settings alternating, ROUNDS times.
set -uo pipefail
BASE=${BASE:-.carry/base}
OUT=${OUT:-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
source benchmarks/gpu_env.sh
MODEL=${MODEL:-random:llama-3-8b}
BATCHES=${BATCHES:-1,32,64}
CONTEXTS=${CONTEXTS:-128,512}
ROUNDS=${ROUNDS:-2}
SETTINGS=${SETTINGS:-}
# Each variant: name:tree:setting. The trees: the base and this one; or this one under each setting.
if [ -n "$SETTINGS" ]; then
  VARIANTS=$(for s in $SETTINGS; do n=${s//-/}; echo "${n//[,=]/_}:.:$s"; done)
  LAST=${SETTINGS##* }
else
  VARIANTS="base:$BASE: this:.:"
  LAST=
fi
flags() { echo "${1//,/ }"; }  # one setting's flags ("" for none)

echo "## tests"
TESTS=${TESTS:-tests/test_attention_kernels.py tests/test_fused_kernels.py tests/test_paged_engine.py \
  tests/test_paged_step.py tests/test_matvec.py tests/test_batch_invariance.py}
$PY -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tail -3

echo "## greedy tokens, CUDA graphs against eager${LAST:+, $LAST}"
for dtype in bfloat16 float32; do
  $PY benchmarks/tp_decode.py --model "$MODEL" --dtype $dtype --batches "" $(flags "$LAST") \
    --out "$OUT/graphs_$dtype.json" >/dev/null 2>&1
  $PY benchmarks/tp_decode.py --model "$MODEL" --dtype $dtype --batches "" $(flags "$LAST") --no-cuda-graphs \
    --out "$OUT/eager_$dtype.json" >/dev/null 2>&1
  $PY - "$OUT" $dtype <<'PYEOF'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/{n}_{sys.argv[2]}.json"))["greedy_tokens"] for n in ("graphs", "eager"))
print(sys.argv[2], "greedy tokens, graphs == eager:", a == b, f"({sum(map(len, a))} tokens)")
PYEOF
done

echo "## decode steps (ms): median one at a time / pipelined"
for round in $(seq "$ROUNDS"); do
  for variant in $VARIANTS; do
    IFS=: read -r name tree setting <<< "$variant"
    for alone in 0 2; do
      (cd "$tree" && $PY benchmarks/tp_decode.py $(flags "$setting") --model "$MODEL" --batches "$BATCHES" \
         --contexts "$CONTEXTS" --rank-alone $alone --steps 30 --new-tokens 4 \
         --out "$OUT/steps_${name}_alone${alone}_r$round.json" >/dev/null 2>&1)
      $PY - "$OUT/steps_${name}_alone${alone}_r$round.json" "$name r$round" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
cells = " ".join(f"b{t['batch']}c{t['context']} {t['median_ms']:.3f}/{t['pipelined_ms']:.3f}" for t in r["decode"])
print(f"{sys.argv[2]:<9} tp{r['tp']}{' alone' if r.get('rank_alone') else '      '} floor {r['floor_per_rank'][0]['floor_ms']}: {cells}")
PYEOF
    done
  done
done
