"""A layer's all-reduce, residual add and RMSNorm in one kernel, through GPU peer memory (NVLink).

At tensor parallelism a decoder layer ends each half with: all-reduce the rank's partial output, add it
to the residual, RMSNorm the residual. Done as two kernels (a peer all-reduce, then add_rms_norm), a
batch-1 step on two H200s spends ~13 us per call, 64 calls per Llama-3-8B step. Here one Triton kernel:

1. pushes this rank's partial rows into every rank's buffer (its own slot there), over NVLink;
2. each program signals every peer, then waits for every peer's signal (release / acquire, system
   scope, on the buffer's signal pads; each wait resets the pad, so the pads end every call at zero);
3. sums the ranks' rows from its own buffer in rank order, in float32, rounds to the model's dtype, adds
   the residual and RMS-normalises as worker/torch_engine/fused.py's add_rms_norm does.

Every rank adds the same numbers in the same order, so every rank holds the same bits. The caller
alternates between two halves of the buffer (its slot argument: one per half of a layer): a rank can
only write a half again after every peer has reached the call in between, so after it has read that
half. The buffer is its own symmetric allocation, with its own signal pads, apart from
PeerAllReduce's.
"""

from __future__ import annotations

import torch

from worker.torch_engine.triton_support import pdl_args, tl, triton

MAX_PROGRAMS = 64  # the rows of a call are spread over at most this many programs, each with its own pads

if triton is not None:
    from worker.torch_engine.triton_support import wait_for_predecessor

    @triton.jit
    def _all_reduce_add_norm_kernel(partial_ptr, residual_ptr, weight_ptr, out_ptr, buffer_ptrs, signal_pad_ptrs,
                                    rows, hidden, eps, slot_offset, rank_stride, stride_p, stride_r, stride_o,
                                    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        wait_for_predecessor(PDL)  # under PDL the next layer's first kernel reads its weights while this one waits
        program = tl.program_id(0)
        programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        dtype = residual_ptr.dtype.element_ty
        for row in range(program, rows, programs):  # 1. this rank's rows into its slot on every rank
            x = tl.load(partial_ptr + row * stride_p + cols, mask=mask, other=0.0)
            for peer in tl.static_range(WORLD):
                base = tl.load(buffer_ptrs + peer).to(tl.pointer_type(dtype))
                tl.store(base + slot_offset + RANK * rank_stride + row * hidden + cols, x, mask=mask)
        tl.debug_barrier()  # every thread's stores are issued before the signal below releases them
        for peer in tl.static_range(WORLD):  # 2. signal, then wait for, every peer
            if peer != RANK:
                pads = tl.load(signal_pad_ptrs + peer).to(tl.pointer_type(tl.int32))
                while tl.atomic_cas(pads + program * WORLD + RANK, 0, 1, sem="release", scope="sys") != 0:
                    pass
        own_pads = tl.load(signal_pad_ptrs + RANK).to(tl.pointer_type(tl.int32))
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                while tl.atomic_cas(own_pads + program * WORLD + peer, 1, 0, sem="acquire", scope="sys") != 1:
                    pass
        tl.debug_barrier()
        own = tl.load(buffer_ptrs + RANK).to(tl.pointer_type(dtype))
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        for row in range(program, rows, programs):  # 3. sum in rank order, add, normalise
            total = tl.zeros([BLOCK], dtype=tl.float32)
            for source in tl.static_range(WORLD):
                part = tl.load(own + slot_offset + source * rank_stride + row * hidden + cols, mask=mask,
                               other=0.0, volatile=True)
                total += part.to(tl.float32)
            residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            residual = (residual + total.to(dtype).to(tl.float32)).to(dtype)
            tl.store(residual_ptr + row * stride_r + cols, residual, mask=mask)
            r = residual.to(tl.float32)
            variance = tl.sum(r * r, axis=0) / hidden
            normed = (r * tl.rsqrt(variance + eps)).to(dtype).to(tl.float32)
            tl.store(out_ptr + row * stride_o + cols, (weight * normed).to(dtype), mask=mask)


class PeerAddNorm:
    """All-reduce + residual add + RMSNorm across the ranks whose buffers and signal pads it is given (CUDA only).

    buffer_ptrs, signal_pad_ptrs: int64 [world] on the device, every rank's buffer (buffer_bytes each) and
    its zeroed int32 signal pads (pad_bytes each), mapped into this process: torch's symmetric memory in the
    engine (symmetric()), CUDA IPC where ranks share a GPU (benchmarks/peer_add_norm.py).
    """

    def __init__(self, buffer_ptrs: torch.Tensor, signal_pad_ptrs: torch.Tensor, rank: int, buffer_bytes: int,
                 pad_bytes: int, keep: object = None) -> None:
        self.buffer_ptrs, self.signal_pad_ptrs = buffer_ptrs, signal_pad_ptrs
        self.rank, self.world = rank, buffer_ptrs.numel()
        self.programs = min(MAX_PROGRAMS, pad_bytes // (4 * self.world))
        self.slot_bytes = buffer_bytes // 2 // self.world // 16 * 16  # one rank's part of one half
        self._keep = keep  # what owns the mapped memory

    @classmethod
    def symmetric(cls, device: torch.device, buffer_bytes: int) -> PeerAddNorm:
        """Over a new symmetric allocation of the default process group (collective: every rank calls it)."""
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        buffer = symm_mem.empty(buffer_bytes, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(buffer, dist.group.WORLD.group_name)

        def table(pointers: list[int]) -> torch.Tensor:
            return torch.tensor(pointers, dtype=torch.int64, device=device)

        return cls(table(handle.buffer_ptrs), table(handle.signal_pad_ptrs), handle.rank, buffer_bytes,
                   handle.signal_pad_size, keep=(buffer, handle))

    def fits(self, partial: torch.Tensor, residual: torch.Tensor) -> bool:
        nbytes = partial.numel() * partial.element_size()
        return (triton is not None and partial.dtype == residual.dtype
                and partial.dtype in (torch.bfloat16, torch.float32) and partial.shape == residual.shape
                and partial.dim() == 2 and partial.stride(1) == 1 and residual.stride(1) == 1
                and nbytes <= self.slot_bytes)

    def __call__(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 slot: int) -> torch.Tensor:
        """RMSNorm(residual + sum over ranks of partial), with residual updated in place; slot: 0 or 1, the
        buffer half, alternating from call to call (see the module's docstring)."""
        rows, hidden = partial.shape
        out = torch.empty_like(residual)
        element = partial.element_size()
        block = triton.next_power_of_2(hidden)
        _all_reduce_add_norm_kernel[(min(rows, self.programs),)](
            partial, residual, weight, out, self.buffer_ptrs, self.signal_pad_ptrs, rows, hidden, eps,
            slot * self.world * self.slot_bytes // element, self.slot_bytes // element,
            partial.stride(0), residual.stride(0), out.stride(0),
            RANK=self.rank, WORLD=self.world, BLOCK=block, num_warps=min(16, max(1, block // 256)),
            enable_fp_fusion=False, **pdl_args(partial.device, rows))
        return out
