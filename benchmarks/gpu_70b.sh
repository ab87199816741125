#!/usr/bin/env bash
# Llama-3-70B shape (random weights) at tensor parallelism: tokens, step times and serving figures.
# On the device machine, from the repository root ($OUT receives the reports):
#   TPS="4 8" bash benchmarks/gpu_70b.sh      # an 8-GPU host: TP=4 and TP=8 (the issue's run)
#   TPS="4" bash benchmarks/gpu_70b.sh        # a 4-GPU host
#   TPS="2" bash benchmarks/gpu_70b.sh        # a 2-GPU host (the whole 70B in bf16 fits two H200s)
# Parts (PARTS="tokens steps allreduce serving"):
# - tokens: fp32 greedy on the 8-layer 70B-width shape (the whole model in fp32 fits no 8-GPU host's
#   spare memory for a check) at every TP in TPS, and at TP=1 where only one GPU is needed;
# - steps: bf16 decode at batch 1, 32 and 128 beside each rank's weight-read floor, and a 2048-token prefill;
# - allreduce: NCCL against peer memory at hidden 8192, per call (two per layer);
# - serving: the whole stack under mpiexec -n TP, fixed 128/128 at concurrency 64 and 256.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
PY=${PY:-python3}
TPS=${TPS:-4 8}
PARTS=${PARTS:-tokens steps allreduce serving}
has() { [[ " $PARTS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c
source benchmarks/gpu_env.sh
if has tokens; then
  for tp in 1 $TPS; do
    timeout 600 mpiexec -n $tp $PY benchmarks/tp_decode.py --model random:llama-3-70b-8-layers --dtype float32 \
      --batches "" --out "$OUT/tokens_tp${tp}_fp32.json" | tail -1 | cut -c1-160
  done
  $PY - "$OUT" $TPS <<'PYEOF'
import json, sys
out, tps = sys.argv[1], sys.argv[2:]
one = json.load(open(f"{out}/tokens_tp1_fp32.json"))["greedy_tokens"]
for tp in tps:
    print(f"fp32 greedy tokens, 8-layer 70B width: TP={tp} equals TP=1:",
          json.load(open(f"{out}/tokens_tp{tp}_fp32.json"))["greedy_tokens"] == one)
PYEOF
fi
if has steps; then
  for tp in $TPS; do
    timeout 900 mpiexec -n $tp $PY benchmarks/tp_decode.py --model random:llama-3-70b --dtype bfloat16 \
      --batches 1,32,128 --contexts 128 --num-kv-blocks 4096 --max-num-seqs 128 --steps 20 --new-tokens 4 \
      --prefill-tokens 2048 --out "$OUT/steps_tp${tp}_bf16.json" | tail -1 | $PY -c "
import json, sys
r = json.loads(sys.stdin.read())
print('TP', r['tp'], r['gpu'], 'peer all-reduce', r['peer_all_reduce'], 'floor per rank',
      [f['floor_ms'] for f in r['floor_per_rank']], 'ms')
for t in r['decode']: print(f\"  decode batch {t['batch']:4d} context {t['context']:5d}: {t['median_ms']:7.2f} ms\")
p = r['prefill']
print(f\"  prefill {p['tokens']} tokens: {p['median_ms']:.1f} ms\")"
  done
fi
if has allreduce; then
  for tp in $TPS; do
    timeout 300 mpiexec -n $tp $PY benchmarks/all_reduce.py --hidden 8192 --tokens 1,32,128,256,2048 \
      --out "$OUT/all_reduce_tp${tp}.json" | grep '^{' | cut -c1-400
  done
fi
if has serving; then
  for tp in $TPS; do
    timeout 900 $PY benchmarks/tp_serving.py --model random:llama-3-70b --tp $tp --concurrencies 64,256 \
      --out "$OUT/serving_tp${tp}.json" 2>&1 | grep -a '^{\|stopped'
  done
fi
