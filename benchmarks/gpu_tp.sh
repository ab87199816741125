#!/usr/bin/env bash
# Tensor-parallel check and decode timings on a host with 2+ NVIDIA GPUs (run on the device
# machine from the repository root; $OUT receives the JSON reports).
#   bash benchmarks/gpu_tp.sh
# Wheels in .carry/wheels (see gpu_env.sh) fill in what the host lacks.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
source benchmarks/gpu_env.sh
$PY -c "import torch, mpi4py; from mpi4py import MPI; print('torch', torch.__version__, 'mpi4py', mpi4py.__version__, MPI.Get_library_version().splitlines()[0])"
MODEL=${MODEL:-random:llama-3-8b}
for tp in 1 2; do
  mpiexec -n $tp $PY benchmarks/tp_decode.py --model "$MODEL" --dtype bfloat16 --batches 1,32 --out "$OUT/tp${tp}_bf16.json" || echo "tp=$tp bf16 failed"
  mpiexec -n $tp $PY benchmarks/tp_decode.py --model "$MODEL" --dtype float32 --batches "" --out "$OUT/tp${tp}_fp32.json" || echo "tp=$tp fp32 failed"
done
$PY benchmarks/compare_tp.py "$OUT"
