"""Decode attention on CPU: the engine's kernel (worker/torch_engine/cpu_attention.cpp) against the gather +
SDPA it replaced, and against that attention compiled with its gather fused.

    .venv/bin/python benchmarks/cpu_decode_attention.py

SmolLM2-135M's heads (9 query, 3 KV, dim 64), 16 decode rows of 129-192 keys in 16-token blocks,
fp32, 2 threads, under inference mode. gather + SDPA copies each row's K/V blocks into a padded tensor
(index_select) and runs SDPA over it. The compiled form reads K/V through the block table inside one
reduction, which torch.compile (inductor) turns into loops that never write the gathered copy. The
kernel reads the blocks where they lie, one sequence per task on torch's threads.

It times each over one small cache (a single layer's, which stays in the CPU's caches) and over a
30-layer cache read one layer after the other, as a decode step reads it. Prints microseconds per call,
the compile time and the largest difference from SDPA.

Outcomes on the 2-core CI VM: 2026-11-30, one small cache, 393 us gather + SDPA against 385 compiled; the
30-layer cache, the engine's case, 495 against 586 (compile 7.9 s). 2026-12-01 (a slower day for this VM),
the 30-layer cache: gather + SDPA 700-1040 us, the kernel 378-420 us.
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from worker.torch_engine import cpu_kernels  # noqa: E402

torch.set_num_threads(2)
torch.manual_seed(0)
B, H, HKV, D, BS, LAYERS = 16, 9, 3, 64, 16, 30
NUM_BLOCKS = 2048
lens = torch.randint(129, 193, (B,))
nblk = (lens.max().item() + BS - 1) // BS
tables = (torch.randperm(NUM_BLOCKS - 1)[: B * nblk] + 1).view(B, nblk)
q = torch.randn(B, H, D)
scale = D ** -0.5
mask = torch.where(torch.arange(nblk * BS)[None, :] < lens[:, None], 0.0, float("-inf"))  # [B, L]


def gathered(q, kc, vc, tables, mask):
    kb = kc.view(-1, BS, HKV, D).index_select(0, tables.flatten()).view(B, -1, HKV, D).transpose(1, 2)
    vb = vc.view(-1, BS, HKV, D).index_select(0, tables.flatten()).view(B, -1, HKV, D).transpose(1, 2)
    g = q.view(B, HKV, H // HKV, D)
    return F.scaled_dot_product_attention(g, kb, vb, attn_mask=mask[:, None, None, :], scale=scale).reshape(B, H * D)


def fused(q, kc, vc, tables, mask):
    rows = (tables[:, :, None] * BS + torch.arange(BS)).view(B, -1)           # [B, L]
    k = kc[rows]                                                               # [B, L, HKV, D] (inductor: no copy)
    v = vc[rows]
    g = q.view(B, HKV, H // HKV, D)
    s = (g[:, None] * k[:, :, :, None, :]).sum(-1) * scale + mask[:, :, None, None]   # [B, L, HKV, G]
    p = torch.softmax(s, dim=1)
    out = (p[..., None] * v[:, :, :, None, :]).sum(1)                          # [B, HKV, G, D]
    return out.reshape(B, H * D)


def kernel(q, kc, vc, tables, mask):
    return cpu_kernels.paged_decode_attention(q, kc, vc, tables, lens, BS, scale).view(B, H * D)


def per_call_us(fn, caches, n=60) -> float:
    fn(*caches[0])
    start = time.perf_counter()
    for i in range(n):
        fn(*caches[i % len(caches)])
    return (time.perf_counter() - start) / n * 1e6


with torch.inference_mode():
    began = time.perf_counter()
    compiled = torch.compile(fused, dynamic=True)
    small = [(torch.randn(NUM_BLOCKS * BS, HKV, D), torch.randn(NUM_BLOCKS * BS, HKV, D))]
    out = compiled(q, *small[0], tables, mask)
    want = gathered(q, *small[0], tables, mask)
    print(f"compile {time.perf_counter() - began:.1f} s, largest difference from SDPA: compiled "
          f"{(out - want).abs().max().item():.1e}, kernel {(kernel(q, *small[0], tables, mask) - want).abs().max().item():.1e}")
    cache = torch.randn(LAYERS, 2, NUM_BLOCKS * BS, HKV, D)
    layered = [(cache[i, 0], cache[i, 1]) for i in range(LAYERS)]
    for name, caches in (("one small cache", small), (f"{LAYERS}-layer cache", layered)):
        g = per_call_us(lambda kc, vc: gathered(q, kc, vc, tables, mask), caches)
        c = per_call_us(lambda kc, vc: compiled(q, kc, vc, tables, mask), caches)
        k = per_call_us(lambda kc, vc: kernel(q, kc, vc, tables, mask), caches)
        print(f"{name}: gather + SDPA {g:.0f} us, compiled {c:.0f} us, kernel {k:.0f} us per call")
