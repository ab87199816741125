#!/usr/bin/env bash
# Tensor parallelism on a host with 2+ NVIDIA GPUs (run on the device machine from the repository
# root; $OUT receives the JSON reports):
#   bash benchmarks/gpu_tp.sh
# Parts (PARTS="allreduce tests steps tokens fused profile"): all-reduce per call, NCCL against GPU peer
# memory; the two-GPU tests; bf16 decode steps at TP=1, TP=2 with the peer all-reduce and TP=2 with
# NCCL alone, each beside its own floor; fp32 greedy tokens at TP=1 and TP=2; the fused peer all-reduce
# + residual add + RMSNorm (--peer-add-norm): its bits and time per call, then TP=2 steps and
# fp32 tokens with it; where the decode step's GPU time goes (profile_decode.py). compare_tp.py sums up
# all but the profiles. PARTS="alone" runs on one GPU: TP=1 steps beside rank 0's slice of TP=2 with no
# all-reduce (tp_decode.py --rank-alone 2), and both profiled: what a TP=2 step costs apart from its
# all-reduces.
# Wheels in .carry/wheels (see gpu_env.sh) fill in what the host lacks.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
PY=${PY:-python3}
PARTS=${PARTS:-allreduce tests steps tokens fused profile}
has() { [[ " $PARTS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nvidia-smi topo -m | head -4
source benchmarks/gpu_env.sh
$PY -c "import torch, mpi4py; from mpi4py import MPI; print('torch', torch.__version__, 'mpi4py', mpi4py.__version__, MPI.Get_library_version().splitlines()[0])"
MODEL=${MODEL:-random:llama-3-8b}
BATCHES=${BATCHES:-1,32,64}
if has allreduce; then
  echo "## all-reduce per call (us): graph / eager"
  mpiexec -n 2 $PY benchmarks/all_reduce.py --out "$OUT/all_reduce.json" || echo "all_reduce failed"
fi
if has tests; then
  echo "## two-GPU tests"
  $PY -m pytest -q -p no:cacheprovider tests/test_peer_all_reduce.py tests/test_peer_add_norm.py 2>&1 | tail -3
fi
if has steps; then
  mpiexec -n 1 $PY benchmarks/tp_decode.py --model "$MODEL" --dtype bfloat16 --batches "$BATCHES" --out "$OUT/tp1_bf16.json" | tail -1 | cut -c1-400
  mpiexec -n 2 $PY benchmarks/tp_decode.py --model "$MODEL" --dtype bfloat16 --batches "$BATCHES" --out "$OUT/tp2_bf16.json" | tail -1 | cut -c1-400
  mpiexec -n 2 $PY benchmarks/tp_decode.py --model "$MODEL" --dtype bfloat16 --batches "$BATCHES" --no-peer-all-reduce --out "$OUT/tp2nccl_bf16.json" | tail -1 | cut -c1-400
fi
if has tokens; then
  for tp in 1 2; do
    mpiexec -n $tp $PY benchmarks/tp_decode.py --model "$MODEL" --dtype float32 --batches "" --out "$OUT/tp${tp}_fp32.json" | tail -1 | cut -c1-200
  done
fi
if has fused; then
  echo "## fused peer all-reduce + add + RMSNorm: bits, then us per call (fused / peer then add_norm / NCCL then add_norm)"
  mpiexec -n 2 $PY benchmarks/peer_add_norm.py --out "$OUT/peer_add_norm.json" || echo "peer_add_norm failed"
  mpiexec -n 2 $PY benchmarks/tp_decode.py --model "$MODEL" --dtype bfloat16 --batches "$BATCHES" --peer-add-norm --out "$OUT/tp2fused_bf16.json" | tail -1 | cut -c1-400
  mpiexec -n 2 $PY benchmarks/tp_decode.py --model "$MODEL" --dtype float32 --batches "" --peer-add-norm --out "$OUT/tp2fused_fp32.json" | tail -1 | cut -c1-200
fi
if has alone; then
  echo "## one GPU: TP=1 against one rank of TP=2 with no all-reduce (bf16, context 128)"
  $PY benchmarks/tp_decode.py --model "$MODEL" --dtype bfloat16 --batches "$BATCHES" --out "$OUT/tp1_bf16.json" | tail -1 | cut -c1-400
  $PY benchmarks/tp_decode.py --model "$MODEL" --dtype bfloat16 --batches "$BATCHES" --rank-alone 2 --out "$OUT/tp2alone_bf16.json" | tail -1 | cut -c1-400
  for batch in ${BATCHES//,/ }; do
    $PY benchmarks/profile_decode.py --model "$MODEL" --batch $batch | grep '^{' | tee -a "$OUT/profiles_alone.jsonl"
    $PY benchmarks/profile_decode.py --model "$MODEL" --batch $batch --rank-alone 2 | grep '^{' | tee -a "$OUT/profiles_alone.jsonl"
  done
fi
if has profile; then
  echo "## decode step kernels (bf16, context 128)"
  for batch in ${BATCHES//,/ }; do
    mpiexec -n 1 $PY benchmarks/profile_decode.py --model "$MODEL" --batch $batch | grep '^{' | tee -a "$OUT/profiles.jsonl"
    mpiexec -n 2 $PY benchmarks/profile_decode.py --model "$MODEL" --batch $batch | grep '^{' | tee -a "$OUT/profiles.jsonl"
  done
fi
$PY benchmarks/compare_tp.py "$OUT"
