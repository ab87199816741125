# Sourced on a GPU host without network (the device machine): puts carried wheels in front of
# what the host has, so the generated protos and gRPC match this repository's versions.
#   source benchmarks/gpu_env.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
PY=${PY:-python3}
if [ -d .carry/wheels ]; then
  wheels=$(ls .carry/wheels/*.whl | grep -v -e mpich -e mpi4py)
  # The host's own MPI stays if it works: mpi4py must match the mpiexec that starts the ranks.
  if ! $PY -c "from mpi4py import MPI" 2>/dev/null || ! command -v mpiexec >/dev/null; then
    echo "gpu_env: no working MPI on this host, using the carried mpich and mpi4py"
    wheels="$wheels $(ls .carry/wheels/mpich-*.whl .carry/wheels/mpi4py-*.whl)"
  fi
  $PY -m pip install --quiet --no-deps --no-index --target /tmp/carried $wheels 2>&1 | tail -2
  export PYTHONPATH=/tmp/carried:$PWD PATH=/tmp/carried/bin:$PATH
fi
