#!/usr/bin/env bash
# Tensor-parallel check and decode timings on a host with 2+ NVIDIA GPUs (run on the device
# machine from the repository root; $OUT receives the JSON reports).
#   bash benchmarks/gpu_tp.sh
# Optional wheels in .carry/wheels (mpi4py, mpich) are used when the host lacks an MPI.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if ! $PY -c "import mpi4py; from mpi4py import MPI" 2>/dev/null || ! command -v mpiexec >/dev/null; then
  echo "no working MPI here: installing the carried mpich + mpi4py wheels"
  $PY -m pip install --no-deps --no-index --target /tmp/mpi .carry/wheels/mpich-*.whl .carry/wheels/mpi4py-*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/mpi PATH=/tmp/mpi/bin:$PATH
fi
$PY -c "import torch, mpi4py; from mpi4py import MPI; print('torch', torch.__version__, 'mpi4py', mpi4py.__version__, MPI.Get_library_version().splitlines()[0])"
MODEL=${MODEL:-random:llama-3-8b}
for tp in 1 2; do
  mpiexec -n $tp $PY benchmarks/tp_decode.py --model "$MODEL" --dtype bfloat16 --batches 1,32 --out "$OUT/tp${tp}_bf16.json" || echo "tp=$tp bf16 failed"
  mpiexec -n $tp $PY benchmarks/tp_decode.py --model "$MODEL" --dtype float32 --batches "" --out "$OUT/tp${tp}_fp32.json" || echo "tp=$tp fp32 failed"
done
$PY benchmarks/compare_tp.py "$OUT"
