#!/usr/bin/env bash
# Engine settings read from the environment, against each other on a GPU host, in one run (from the repo root
# on the device machine):  OUT=out SETTINGS="A=1 A=32,B=2" bash benchmarks/gpu_env_ab.sh
# SETTINGS: space-separated settings, each comma-separated VAR=value pairs (default: PDL on launches of up to 1
# and up to 32 rows, INFLIGHT_PDL_ROWS in worker/torch_engine/triton_support.py). The CUDA kernel tests and
# greedy tokens with CUDA graphs against eager (bf16 and fp32) under the last setting; then decode steps at
# TP=1 and for one rank of TP=2 with no all-reduce, the settings alternating, ROUNDS times.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
PY=${PY:-python3}
source benchmarks/gpu_env.sh
MODEL=${MODEL:-random:llama-3-8b}
BATCHES=${BATCHES:-2,8,16,32,64}
CONTEXTS=${CONTEXTS:-128,512}
ROUNDS=${ROUNDS:-2}
SETTINGS=${SETTINGS:-"INFLIGHT_PDL_ROWS=1 INFLIGHT_PDL_ROWS=32"}
LAST=${SETTINGS##* }
with() { env ${1//,/ } "${@:2}"; }  # run a command under one setting

echo "## tests, $LAST"
TESTS=${TESTS:-tests/test_attention_kernels.py tests/test_fused_kernels.py tests/test_paged_engine.py \
  tests/test_paged_step.py tests/test_matvec.py tests/test_batch_invariance.py}
with "$LAST" $PY -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tail -2

echo "## greedy tokens, CUDA graphs against eager, $LAST"
for dtype in bfloat16 float32; do
  for graphs in cuda-graphs no-cuda-graphs; do
    with "$LAST" $PY benchmarks/tp_decode.py --model "$MODEL" --dtype $dtype --batches "" --$graphs \
      --out "$OUT/${graphs}_$dtype.json" >/dev/null 2>&1
  done
  $PY - "$OUT" $dtype <<'PYEOF'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/{n}_{sys.argv[2]}.json"))["greedy_tokens"] for n in ("cuda-graphs", "no-cuda-graphs"))
print(sys.argv[2], "greedy tokens, graphs == eager:", a == b, f"({sum(map(len, a))} tokens)")
PYEOF
done

echo "## decode steps (ms): median one at a time / pipelined"
for round in $(seq "$ROUNDS"); do
  for setting in $SETTINGS; do
    for alone in 0 2; do
      out="$OUT/steps_${setting//[,=]/_}_alone${alone}_r$round.json"
      with "$setting" $PY benchmarks/tp_decode.py --model "$MODEL" --batches "$BATCHES" \
        --contexts "$CONTEXTS" --rank-alone $alone --steps 30 --new-tokens 4 --out "$out" >/dev/null 2>&1
      $PY - "$out" "$setting r$round" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
cells = " ".join(f"b{t['batch']}c{t['context']} {t['median_ms']:.3f}/{t['pipelined_ms']:.3f}" for t in r["decode"])
print(f"{sys.argv[2]} tp{r['tp']}{' alone' if r.get('rank_alone') else '      '}: {cells}")
PYEOF
    done
  done
done
