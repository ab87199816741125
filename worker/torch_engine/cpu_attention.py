"""Decode attention on CPU straight from the paged KV cache: one C++ kernel (cpu_attention.cpp).

Without it, a CPU decode step copies every sequence's K/V blocks into a padded tensor (index_select) in each
layer and runs SDPA over the copy. float32 and bfloat16 caches (bfloat16 is widened to float32 as it is read;
only the output is rounded). SmolLM2, 16 decode rows of ~160 keys on the 2-core CI VM: decode steps are 8% faster
in float32 and 13% in bfloat16 (`benchmarks/cpu_step.py --attention-ab 5`).

The kernel is compiled by torch's cpp_extension (g++ and ninja, about 30 s) for the CPU it runs on
(-march=native), once, by `make setup`:

    python -m worker.torch_engine.cpu_attention

The build lives in $XDG_CACHE_HOME/inflight/kernels (default ~/.cache), under a name that digests the
source, the flags, torch's and Python's versions and the CPU's model and flags, so a change to any of them
(or a home directory shared by different CPUs) gets a build of its own. The worker only loads a finished
build and never compiles: a compile at serving time would stall the start, and torch's build lock, left
behind by a process killed mid-build, would hold every later start for ever. Where no build is found (no
compiler, or setup not run), the engine keeps the gather and SDPA and says so once in its log.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import structlog
import torch

from inflight.model_store import default_cache_dir

log = structlog.get_logger()

_SOURCE = Path(__file__).with_name("cpu_attention.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp"]
BUILD_COMMAND = "python -m worker.torch_engine.cpu_attention"


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
    described = "\n".join([_SOURCE.read_text(), " ".join(_FLAGS), torch.__version__, sys.version, _cpu_description()])
    return "inflight_cpu_attention_" + hashlib.sha256(described.encode()).hexdigest()[:16]


def _build_directory() -> Path:
    return default_cache_dir().parent / "kernels" / _build_name()  # beside the converted models


def _module_path() -> Path:
    return _build_directory() / f"{_build_name()}.so"


def build() -> Path:
    """Compile the kernel for this machine unless it is built already; the built module's path."""
    from torch.utils.cpp_extension import load

    directory = _build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    load(name=_build_name(), sources=[str(_SOURCE)], extra_cflags=_FLAGS, build_directory=str(directory))
    return _module_path()


@functools.cache
def _kernel() -> Callable[..., torch.Tensor] | None:
    path = _module_path()
    if not path.exists():
        log.warning("cpu_attention_kernel_not_built", fallback="gather + SDPA", build=BUILD_COMMAND)
        return None
    try:
        spec = importlib.util.spec_from_file_location(_build_name(), path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as error:  # a build that does not load here: gather + SDPA
        log.warning("cpu_attention_kernel_unusable", path=str(path), error=str(error))
        return None
    return module.paged_decode


def available() -> bool:
    """Whether the kernel is built and loads (loading it on the first call)."""
    return _kernel() is not None


def applies(q: torch.Tensor) -> bool:
    """Whether decode rows like q go through the kernel (float32 or bfloat16 on CPU, the kernel built)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and available()


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """[B, H, D] attention of one query per sequence over its first context_lens keys in the paged cache.

    q [B, H, D]; k_cache, v_cache [slots, HKV, D]; block_tables [B, W] int64; context_lens [B] int64.
    Query head j reads KV head j // (H // HKV)."""
    kernel = _kernel()
    assert kernel is not None, "check applies() first"
    return kernel(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)


if __name__ == "__main__":
    try:
        print(f"CPU decode-attention kernel built: {build()}")
    except Exception as error:  # no compiler or no ninja: the engine gathers K/V blocks instead
        print(f"CPU decode-attention kernel not built ({error}); CPU decode steps gather K/V blocks instead")
