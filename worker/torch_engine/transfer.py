"""Host-to-device copies that never wait for the device.

A copy from pageable host memory makes CUDA wait for all work already queued on the stream before it
starts; a step launched behind the one still running (overlap scheduling) would then wait for it. So
every per-step input goes through pinned memory, whose copies are queued like kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(values: np.ndarray | Sequence[int] | Sequence[float], device: torch.device,
              dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """values as a tensor of dtype on device, copied without waiting (int64 unless told)."""
    host = torch.from_numpy(np.ascontiguousarray(values)) if isinstance(values, np.ndarray) else torch.tensor(values)
    host = host.to(dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
