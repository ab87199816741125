"""Decode attention on CPU: today's gather + SDPA against the same attention compiled with its gather fused.

    .venv/bin/python benchmarks/cpu_decode_attention.py

SmolLM2-135M's heads (9 query, 3 KV, dim 64), 16 decode rows of 129-192 keys in 16-token blocks,
fp32, 2 threads. The engine today copies each row's K/V blocks into a padded tensor (index_select)
and runs SDPA over it. The other form reads K/V through the block table inside one reduction, which
torch.compile (inductor) turns into loops that never write the gathered copy. Prints microseconds per
call, the compile time and the largest difference from SDPA. A probe for the CPU decode step (issue:
the embedded default against vLLM's CPU build), not yet the engine's path.
"""
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
torch.manual_seed(0)
B, H, HKV, D, BS = 16, 9, 3, 64, 16
lens = torch.randint(129, 193, (B,))
nblk = (lens.max().item() + BS - 1) // BS
num_blocks = 2048
kc = torch.randn(num_blocks * BS, HKV, D)
vc = torch.randn(num_blocks * BS, HKV, D)
perm = torch.randperm(num_blocks - 1)[: B * nblk] + 1
tables = perm.view(B, nblk)
q = torch.randn(B, H, D)
scale = D ** -0.5
pos = torch.arange(nblk * BS)
mask = torch.where(pos[None, :] < lens[:, None], 0.0, float("-inf"))  # [B, L]

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

def t(fn, n=50):
    fn()
    s = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - s) / n * 1e6
ref = gathered(q, kc, vc, tables, mask)
print("gathered SDPA us", t(lambda: gathered(q, kc, vc, tables, mask)))
print("eager fused-form us", t(lambda: fused(q, kc, vc, tables, mask), 10),
      (fused(q, kc, vc, tables, mask) - ref).abs().max().item())
began = time.perf_counter()
cf = torch.compile(fused, dynamic=True)
out = cf(q, kc, vc, tables, mask)
print("compile s", time.perf_counter() - began, "max diff", (out - ref).abs().max().item())
print("compiled us", t(lambda: cf(q, kc, vc, tables, mask)))
