"""Decode attention on CPU straight from the paged KV cache: one C++ kernel (cpu_attention.cpp).

Without it, a CPU decode step copies every sequence's K/V blocks into a padded tensor (index_select) in each
layer and runs SDPA over the copy. SmolLM2 fp32, 16 decode rows of ~160 keys on the 2-core CI VM: that took
about a fifth of the step; the kernel reads the blocks where they lie and takes half as long.

The kernel is built once per machine with torch's cpp_extension (g++ and ninja; about 30 s), for the CPU it
runs on (-march=native; the build's name carries a digest of the CPU's model and flags, so a home directory
shared by different CPUs keeps one build each), and cached under torch's extensions directory
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions). `make setup` builds it:

    python -m worker.torch_engine.cpu_attention

Where it cannot be built (no compiler), the engine keeps the gather and SDPA, and says so once in its log.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from collections.abc import Callable
from pathlib import Path

import structlog
import torch

log = structlog.get_logger()

_SOURCE = Path(__file__).with_name("cpu_attention.cpp")


def _cpu_digest() -> str:
    """A digest of what -march=native compiles for: the machine, the CPU model and its flags."""
    described = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        described += "".join(line for line in lines if line.startswith(("model name", "flags")))[:8192]
    except OSError:
        pass
    return hashlib.sha256(described.encode()).hexdigest()[:12]


@functools.cache
def _kernel() -> Callable[..., torch.Tensor] | None:
    try:
        from torch.utils.cpp_extension import load

        module = load(name=f"inflight_cpu_attention_{_cpu_digest()}", sources=[str(_SOURCE)],
                      extra_cflags=["-O3", "-march=native", "-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no ninja, a failed build: the engine keeps gather + SDPA
        log.warning("cpu_attention_kernel_unavailable", error=str(error).strip().splitlines()[-1:])
        return None
    return module.paged_decode


def available() -> bool:
    """Whether the kernel is built (building it on the first call)."""
    return _kernel() is not None


def applies(q: torch.Tensor) -> bool:
    """Whether decode rows like q go through the kernel (float32 on CPU, the kernel built)."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and available()


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """[B, H, D] attention of one query per sequence over its first context_lens keys in the paged cache.

    q [B, H, D]; k_cache, v_cache [slots, HKV, D]; block_tables [B, W] int64; context_lens [B] int64.
    Query head j reads KV head j // (H // HKV)."""
    kernel = _kernel()
    assert kernel is not None, "check applies() first"
    return kernel(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)


if __name__ == "__main__":
    print("CPU paged decode attention kernel:", "built" if available() else "unavailable (see the log)")
