"""The CPU kernels, in C++, built once per machine into one module, and the engine's calls into it.

- **Decode attention** straight from the paged KV cache (cpu_attention.cpp), float32 or bfloat16. Without it
  a CPU decode step copies every sequence's K/V blocks into a padded tensor (index_select) in each layer and
  runs SDPA over the copy. SmolLM2, 16 decode rows of ~160 keys on the 2-core CI VM: decode steps are 8%
  faster in float32 and 13% in bfloat16 (`benchmarks/cpu_step.py --attention-ab 5`).
- **Elementwise steps in bfloat16** (cpu_elementwise.cpp): the residual add with the RMSNorm after it, and
  SiLU times up, one pass each where eager PyTorch makes several, rounding where eager rounds. float32 keeps
  torch's own ops, whose results equal transformers' bit for bit.

The module is compiled by torch's cpp_extension (g++ and ninja, about 40 s) for the CPU it runs on
(-march=native), once, by `make setup`:

    python -m worker.torch_engine.cpu_kernels

The build lives in $XDG_CACHE_HOME/inflight/kernels (default ~/.cache), under a name that digests the
sources, the flags, torch's and Python's versions and the CPU's model and flags, so a change to any of them
(or a home directory shared by different CPUs) gets a build of its own. The worker only loads a finished
build and never compiles: a compile at serving time would stall the start, and torch's build lock, left
behind by a process killed mid-build, would hold every later start for ever. Where no build is found (no
compiler, or setup not run), the engine keeps torch's ops (gather + SDPA for attention) and says so once in
its log.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import platform
import sys
from pathlib import Path
from types import ModuleType

import structlog
import torch

from inflight.model_store import default_cache_dir

log = structlog.get_logger()

_HERE = Path(__file__).parent
_SOURCES = [_HERE / name for name in ("cpu_kernels.cpp", "cpu_attention.cpp", "cpu_elementwise.cpp")]
_HEADERS = [_HERE / "cpu_kernels.h"]
# -fno-trapping-math lets GCC vectorise loops with floor, min/max and selects in them; it changes no result
# (it only assumes that no floating-point exception traps).
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"]
BUILD_COMMAND = "python -m worker.torch_engine.cpu_kernels"


def _cpu_description() -> str:
    """What -march=native compiles for: the machine, the CPU model and its flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields = {line.split(":")[0].strip(): line for line in lines if line.startswith(("model name", "flags"))}
    return platform.machine() + "".join(fields.values())


@functools.cache
def _build_name() -> str:
    sources = [path.read_text() for path in _SOURCES + _HEADERS]
    described = "\n".join([*sources, " ".join(_FLAGS), torch.__version__, sys.version, _cpu_description()])
    return "inflight_cpu_kernels_" + hashlib.sha256(described.encode()).hexdigest()[:16]


def _build_directory() -> Path:
    return default_cache_dir().parent / "kernels" / _build_name()  # beside the converted models


def _module_path() -> Path:
    return _build_directory() / f"{_build_name()}.so"


def build() -> Path:
    """Compile the kernels for this machine unless they are built already; the built module's path."""
    from torch.utils.cpp_extension import load

    directory = _build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    load(name=_build_name(), sources=[str(path) for path in _SOURCES], extra_cflags=_FLAGS,
         build_directory=str(directory))
    return _module_path()


@functools.cache
def _module() -> ModuleType | None:
    path = _module_path()
    if not path.exists():
        log.warning("cpu_kernels_not_built", fallback="torch's ops (gather + SDPA for attention)", build=BUILD_COMMAND)
        return None
    try:
        spec = importlib.util.spec_from_file_location(_build_name(), path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as error:  # a build that does not load here: torch's ops
        log.warning("cpu_kernels_unusable", path=str(path), error=str(error))
        return None
    return module


def available() -> bool:
    """Whether the kernels are built and load (loading them on the first call)."""
    return _module() is not None


def _loaded() -> ModuleType:
    module = _module()
    assert module is not None, "check the kernel applies first"
    return module


def attention_applies(q: torch.Tensor) -> bool:
    """Whether decode rows like q go through the attention kernel (float32 or bfloat16 on CPU)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and available()


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """[B, H, D] attention of one query per sequence over its first context_lens keys in the paged cache.

    q [B, H, D]; k_cache, v_cache [slots, HKV, D]; block_tables [B, W] int64; context_lens [B] int64.
    Query head j reads KV head j // (H // HKV)."""
    return _loaded().paged_decode(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)


def elementwise_applies(x: torch.Tensor) -> bool:
    """Whether rows like x take the elementwise kernels (bfloat16 on CPU)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and available()


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x (in place, rounded; skipped when x is None), then Llama's RMSNorm of it, as eager rounds."""
    return _loaded().add_rms_norm(x, residual, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a [rows, 2 * width] gate-up projection, as eager SiLU then multiply round."""
    return _loaded().silu_mul(gate_up)


if __name__ == "__main__":
    try:
        print(f"CPU kernels built: {build()}")
    except Exception as error:  # no compiler or no ninja: the engine keeps torch's ops
        print(f"CPU kernels not built ({error}); the engine keeps torch's ops (gather + SDPA for attention)")
