"""All-reduce of a step's activations through GPU peer memory (NVLink), in one kernel per call.

A decode step at tensor parallelism does two all-reduces per layer on a few KB to a few MB. NCCL
takes 18 us or more for each whatever the size: on a Llama-3-8B step at batch 1, over a millisecond
of the 2 ms that a second GPU saves. Here each rank's partial sum goes into a buffer that every rank
maps (torch's symmetric memory), and one kernel per call:
- one-shot (small tensors): copies the local partial in, waits for every rank at a barrier on the
  buffers' signal pads, then reads all ranks' partials and adds them in rank order. Every rank adds
  the same numbers in the same order, so all ranks hold the same bits.
- two-shot (larger): each rank reduces its own slice of the buffer, then gathers the other slices.

Where the sum goes straight into a residual add and an RMSNorm (every dense decoder layer, twice), add_norm
can do all three in one kernel (worker/peer_add_norm.py) over a buffer of its own. It is off unless the
worker runs with --peer-add-norm: its bits are checked on one GPU (two ranks through CUDA IPC), but it has
not yet run on two. Tensors larger than the buffer, and groups where peer memory cannot be set up (no P2P between
the GPUs, an old card), go to NCCL. CUDA graphs capture these kernels like any other.
"""

from __future__ import annotations

import structlog
import torch
import torch.distributed as dist

from worker.peer_add_norm import PeerAddNorm
from worker.torch_engine.triton_support import triton

log = structlog.get_logger()

# From benchmarks/all_reduce.py on two H200s (NVLink), in CUDA graphs: one-shot takes 7-16 us up to 1 MiB
# against NCCL's 18-29; from 2 MiB two-shot is the faster (20 us, one-shot 24, NCCL 44), and at 16 MiB
# it still beats NCCL (75 us against 93).
BUFFER_BYTES = 16 << 20         # the largest tensor reduced here: 2048 tokens of a 4096-wide bfloat16 model
ONE_SHOT_MAX_BYTES = 1 << 20
WORLD_SIZES = (2, 4, 8)         # the group sizes torch's two-shot kernel is built for


class PeerAllReduce:
    """Sum-all-reduce over the default process group through a symmetric buffer (CUDA only)."""

    def __init__(self, device: torch.device, buffer_bytes: int = BUFFER_BYTES,
                 one_shot_max_bytes: int = ONE_SHOT_MAX_BYTES, dtype: torch.dtype = torch.bfloat16,
                 fused_add_norm: bool = False) -> None:
        """dtype: the model's, which the fused add-norm kernel (with fused_add_norm) is set up for."""
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = dist.group.WORLD.group_name
        self.buffer = symm_mem.empty(buffer_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)
        self.one_shot_max_bytes = one_shot_max_bytes
        world = dist.get_world_size()
        # the fused kernel takes what one-shot takes: each rank's part of each half of its buffer holds that
        fused = fused_add_norm and triton is not None and one_shot_max_bytes
        self.add_norm = PeerAddNorm.symmetric(device, 2 * world * one_shot_max_bytes, dtype) if fused else None

    def fits(self, tensor: torch.Tensor) -> bool:
        nbytes = tensor.numel() * tensor.element_size()
        return (tensor.dtype in (torch.bfloat16, torch.float32) and tensor.is_contiguous()
                and nbytes % 16 == 0 and nbytes <= self.buffer.numel())

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of tensor (which must fit): a new tensor for one-shot, tensor itself for two-shot."""
        nbytes = tensor.numel() * tensor.element_size()
        staging = self.buffer[:nbytes].view(tensor.dtype)
        if nbytes <= self.one_shot_max_bytes:
            flat = torch.ops.symm_mem.one_shot_all_reduce_copy(staging, tensor.view(-1), "sum", self.group_name)
            return flat.view(tensor.shape)
        staging.copy_(tensor.view(-1))
        torch.ops.symm_mem.two_shot_all_reduce_out(staging, "sum", self.group_name, tensor.view(-1))
        return tensor


def peer_all_reduce(device: torch.device, dtype: torch.dtype, fused_add_norm: bool = False) -> PeerAllReduce | None:
    """A PeerAllReduce where every rank of the group can set one up, else None (NCCL alone); dtype: the model's;
    fused_add_norm: also set up the kernel that adds and normalises with the sum (PeerAllReduce.add_norm).

    Collective: every rank calls it at the same point, after torch.distributed is up.
    """
    built: PeerAllReduce | None = None
    reason = ""
    if device.type != "cuda" or dist.get_world_size() not in WORLD_SIZES:
        return None
    try:
        built = PeerAllReduce(device, dtype=dtype, fused_add_norm=fused_add_norm)
    except Exception as error:  # no P2P between these GPUs, a torch without symmetric memory, ...
        reason = f"{type(error).__name__}: {error}"
    agreed = torch.tensor([1 if built is not None else 0], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    if not agreed.item():
        log.warning("peer_all_reduce_unavailable", reason=reason or "another rank could not set it up")
        return None
    return built
