"""Decode attention on CPU: today's gather + SDPA against the same attention compiled with its gather fused.

    .venv/bin/python benchmarks/cpu_decode_attention.py

SmolLM2-135M's heads (9 query, 3 KV, dim 64), 16 decode rows of 129-192 keys in 16-token blocks,
fp32, 2 threads, under inference mode. The engine copies each row's K/V blocks into a padded tensor
(index_select) and runs SDPA over it. The other form reads K/V through the block table inside one
reduction, which torch.compile (inductor) turns into loops that never write the gathered copy.

It times both twice: over one small cache (a single layer's, which stays in the CPU's caches) and over a
30-layer cache read one layer after the other, as a decode step reads it. Prints microseconds per call,
the compile time and the largest difference from SDPA.

Outcome on the 2-core CI VM (2026-11-30): one small cache, 393 us gather + SDPA against 385 compiled;
the 30-layer cache, the engine's case, 495 against 586 (compile 7.9 s). An earlier version of this
probe timed one small cache outside inference mode and showed the compiled form 1.5-2x faster; that
did not hold where it matters, so the engine keeps gather + SDPA (README, "Where a CPU step's
milliseconds go").
"""
import time

import torch
import torch.nn.functional as F

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
    print(f"compile {time.perf_counter() - began:.1f} s, largest difference from SDPA "
          f"{(out - gathered(q, *small[0], tables, mask)).abs().max().item():.1e}")
    cache = torch.randn(LAYERS, 2, NUM_BLOCKS * BS, HKV, D)
    layered = [(cache[i, 0], cache[i, 1]) for i in range(LAYERS)]
    for name, caches in (("one small cache", small), (f"{LAYERS}-layer cache", layered)):
        g = per_call_us(lambda kc, vc: gathered(q, kc, vc, tables, mask), caches)
        c = per_call_us(lambda kc, vc: compiled(q, kc, vc, tables, mask), caches)
        print(f"{name}: gather + SDPA {g:.0f} us, compiled {c:.0f} us per call")
