"""A layer's all-reduce, residual add and RMSNorm in one kernel, through GPU peer memory (NVLink).

At tensor parallelism a decoder layer ends each half with: all-reduce the rank's partial output, add it
to the residual, RMSNorm the residual. Done as two kernels (a peer all-reduce, then add_rms_norm), a
batch-1 step on two H200s spends ~13 us per call, 64 calls per Llama-3-8B step. Here one Triton kernel,
with no barrier between the ranks: the data is its own flag.

- Every rank's buffer starts filled with the EMPTY mark (negative zero's bits); a value written never
  carries it (a partial's -0.0 is written as +0.0, which sums the same).
- Each rank stores its partial rows into its own slot of every other rank's buffer, over NVLink.
- Each rank reads every other rank's slot in its own buffer until no element is EMPTY, writes EMPTY back
  for a later call, and sums the ranks' rows in rank order, in float32; then rounds to the model's dtype,
  adds the residual and RMS-normalises as worker/torch_engine/fused.py's add_rms_norm does.

Every rank adds the same numbers in the same order, so every rank holds the same bits. The caller
alternates between two halves of the buffer (its slot argument: one per half of a layer). A rank writes
into a half again only two calls later, after it has read the peers' rows of the call in between, which
they wrote after their kernel of the call before (the one that read and emptied that half) had completed.
The idea is TensorRT-LLM's Lamport all-reduce; the code is this project's.
"""

from __future__ import annotations

import torch

from worker.torch_engine.triton_support import pdl_args, tl, triton

MAX_PROGRAMS = 64  # the rows of a call are spread over at most this many programs

if triton is not None:
    from worker.torch_engine.triton_support import wait_for_predecessor

    @triton.jit
    def _all_reduce_add_norm_kernel(partial_ptr, residual_ptr, weight_ptr, out_ptr, buffer_ptrs, rows, hidden, eps,
                                    slot_offset, rank_stride, stride_p, stride_r, stride_o, RANK: tl.constexpr,
                                    WORLD: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr, PDL: tl.constexpr):
        wait_for_predecessor(PDL)  # under PDL the next layer's first kernel reads its weights while this one waits
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        dtype = residual_ptr.dtype.element_ty
        bits_type = tl.int16 if BITS == 16 else tl.int32
        empty_bits = tl.full([BLOCK], -32768 if BITS == 16 else -2147483648, bits_type)
        own = tl.load(buffer_ptrs + RANK).to(tl.pointer_type(dtype))
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        for row in range(program, rows, tl.num_programs(0)):
            x = tl.load(partial_ptr + row * stride_p + cols, mask=mask, other=0.0)
            x = tl.where(x == 0, 0.0, x).to(dtype)  # never EMPTY: -0.0 goes as +0.0
            offset = slot_offset + row * hidden + cols
            for peer in tl.static_range(WORLD):
                if peer != RANK:
                    base = tl.load(buffer_ptrs + peer).to(tl.pointer_type(dtype))
                    tl.store(base + offset + RANK * rank_stride, x, mask=mask)
            total = tl.zeros([BLOCK], dtype=tl.float32)
            for source in tl.static_range(WORLD):
                if source == RANK:
                    total += x.to(tl.float32)
                else:
                    slot = own + offset + source * rank_stride
                    part = tl.load(slot, mask=mask, other=1.0, volatile=True)
                    while tl.sum((part.to(bits_type, bitcast=True) == empty_bits).to(tl.int32), axis=0) > 0:
                        part = tl.load(slot, mask=mask, other=1.0, volatile=True)
                    tl.store(slot, empty_bits.to(dtype, bitcast=True), mask=mask)
                    total += part.to(tl.float32)
            residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            residual = (residual + total.to(dtype).to(tl.float32)).to(dtype)
            tl.store(residual_ptr + row * stride_r + cols, residual, mask=mask)
            r = residual.to(tl.float32)
            variance = tl.sum(r * r, axis=0) / hidden
            normed = (r * tl.rsqrt(variance + eps)).to(dtype).to(tl.float32)
            tl.store(out_ptr + row * stride_o + cols, (weight * normed).to(dtype), mask=mask)


def fill_empty(buffer: torch.Tensor, dtype: torch.dtype) -> None:
    """Fill a uint8 buffer with the EMPTY mark of dtype's elements (negative zero's bits)."""
    if dtype == torch.float32:
        buffer.view(torch.int32).fill_(-2**31)
    else:
        buffer.view(torch.int16).fill_(-2**15)


class PeerAddNorm:
    """All-reduce + residual add + RMSNorm across the ranks whose buffers it is given, for one dtype (CUDA only).

    buffer_ptrs: int64 [world] on the device, every rank's buffer (buffer_bytes each, filled with fill_empty
    for dtype before any rank calls), mapped into this process: torch's symmetric memory in the engine
    (symmetric()), CUDA IPC where ranks share a GPU (benchmarks/peer_add_norm.py).
    """

    def __init__(self, buffer_ptrs: torch.Tensor, rank: int, buffer_bytes: int, dtype: torch.dtype,
                 keep: object = None) -> None:
        self.buffer_ptrs, self.rank, self.world, self.dtype = buffer_ptrs, rank, buffer_ptrs.numel(), dtype
        self.slot_bytes = buffer_bytes // 2 // self.world // 16 * 16  # one rank's part of one half
        self._keep = keep  # what owns the mapped memory

    @classmethod
    def symmetric(cls, device: torch.device, buffer_bytes: int, dtype: torch.dtype) -> PeerAddNorm:
        """Over a new symmetric allocation of the default process group (collective: every rank calls it)."""
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        buffer = symm_mem.empty(buffer_bytes, dtype=torch.uint8, device=device)
        fill_empty(buffer, dtype)
        torch.cuda.synchronize(device)  # every rank's buffer is EMPTY before the rendezvous lets any rank on
        handle = symm_mem.rendezvous(buffer, dist.group.WORLD.group_name)
        pointers = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
        return cls(pointers, handle.rank, buffer_bytes, dtype, keep=(buffer, handle))

    def fits(self, partial: torch.Tensor, residual: torch.Tensor) -> bool:
        nbytes = partial.numel() * partial.element_size()
        return (triton is not None and partial.dtype == residual.dtype == self.dtype
                and partial.shape == residual.shape and partial.dim() == 2 and partial.stride(1) == 1
                and residual.stride(1) == 1 and nbytes <= self.slot_bytes)

    def __call__(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 slot: int) -> torch.Tensor:
        """RMSNorm(residual + sum over ranks of partial), with residual updated in place; slot: 0 or 1, the
        buffer half, alternating from call to call (see the module's docstring)."""
        rows, hidden = partial.shape
        out = torch.empty_like(residual)
        element = partial.element_size()
        block = triton.next_power_of_2(hidden)
        _all_reduce_add_norm_kernel[(min(rows, MAX_PROGRAMS),)](
            partial, residual, weight, out, self.buffer_ptrs, rows, hidden, eps,
            slot * self.world * self.slot_bytes // element, self.slot_bytes // element,
            partial.stride(0), residual.stride(0), out.stride(0), RANK=self.rank, WORLD=self.world, BLOCK=block,
            BITS=8 * element, num_warps=min(16, max(1, block // 256)), enable_fp_fusion=False,
            **pdl_args(partial.device, rows))
        return out
