"""GPU check and timings of the paged attention kernels (split-KV decode, varlen prefill).

    python benchmarks/check_paged_attention.py              # CUDA: accuracy against SDPA, then a timing table
    python benchmarks/check_paged_attention.py --sweep      # also time other tile sizes and warp counts
    python benchmarks/check_paged_attention.py --interpret  # CPU, TRITON_INTERPRET=1: a small accuracy check

Decode is timed against the single-pass kernel it replaced (benchmarks/paged_decode_single_pass.py),
prefill against SDPA: flash on contiguous K/V (the floor), and the engine's path before this kernel
(blocks gathered, then SDPA with a causal mask). Times are GPU microseconds per call, from CUDA-graph
replays, as the engine runs decode steps. Block tables are as wide as --max-model-len, like the engine's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--interpret" in sys.argv:  # must be set before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.graph_timing import graphed_us
from tests.test_attention_kernels import (
    BLOCK_SIZE,
    DEVICE,
    HEADS,
    Heads,
    PagedCache,
    decode,
    paged_cache,
    prefill,
    reference,
)
from worker.torch_engine import paged_attention, paged_prefill

LLAMA_8B = Heads(32, 8, 128)  # the timed shape: Llama-3-8B's attention on one GPU
DECODE_CASES = [(1, 128), (1, 1024), (1, 4096), (64, 512), (256, 512)]  # (batch, context)
PROMPT = 2048
DECODE_SWEEP = [(tile, sub, warps) for tile in (128, 256, 512) for sub in (32, 64, 128) for warps in (2, 4, 8) if sub <= tile]
PREFILL_SWEEP = [(64, 32, 4), (64, 64, 4), (64, 64, 8), (128, 32, 4), (128, 64, 8), (128, 128, 8), (32, 32, 4)]


def check_accuracy(interpret: bool) -> dict[str, float]:
    """Worst |kernel - fp32 SDPA| per (kernel, dtype, heads); asserts each within its dtype's tolerance."""
    heads_list = [Heads(9, 3, 64), Heads(12, 4, 64, alibi=True)] if interpret else HEADS
    lens = [1, 17, 257, 600] if interpret else [1, 15, 16, 17, 255, 256, 257, 300, 1000, 2047, 4100]
    seqs = [(1, 0), (17, 0), (5, 40), (40, 230)] if interpret else [(1, 0), (17, 0), (5, 40), (1, 300), (130, 1000),
                                                                      (300, 0), (1000, 30), (2048, 0), (1, 4000)]
    worst = {}
    for dtype in (torch.float32, torch.bfloat16):
        for heads in heads_list:
            torch.manual_seed(0)
            cache = paged_cache(lens, heads, dtype)
            q = torch.randn(len(lens), heads.q, heads.dim).to(dtype).to(cache.k.device)
            err = (decode(q, cache, heads).float() - reference(q, cache, [1] * len(lens), heads)).abs().max()
            worst[f"decode {str(dtype)[6:]} {heads}"] = err.item()
            query_lens = [q_len for q_len, _ in seqs]
            cache = paged_cache([q_len + cached for q_len, cached in seqs], heads, dtype)
            q = torch.randn(sum(query_lens), heads.q, heads.dim).to(dtype).to(cache.k.device)
            err = (prefill(q, cache, query_lens, heads).float() - reference(q, cache, query_lens, heads)).abs().max()
            worst[f"prefill {str(dtype)[6:]} {heads}"] = err.item()
    bad = {k: e for k, e in worst.items() if not e <= (1e-4 if "float32" in k else 3e-2)}
    assert not bad, bad
    return worst


def wide_cache(lens: list[int], heads: Heads, max_model_len: int) -> PagedCache:
    """A bf16 paged cache whose tables are as wide as the engine's (max_model_len / block_size columns)."""
    columns = -(-max_model_len // BLOCK_SIZE)
    return paged_cache(lens, heads, torch.bfloat16, spare_columns=columns - -(-max(lens) // BLOCK_SIZE))


def decode_args(batch: int, context: int, max_model_len: int) -> tuple:
    """paged_decode_attention's arguments for `batch` sequences of `context` tokens (bf16, Llama-3-8B heads)."""
    cache = wide_cache([context] * batch, LLAMA_8B, max_model_len)
    q = torch.randn(batch, LLAMA_8B.q, LLAMA_8B.dim, device=DEVICE, dtype=torch.bfloat16)
    return q, cache.k, cache.v, cache.tables, cache.lens, BLOCK_SIZE


def time_decode(max_model_len: int) -> list[tuple[str, str, float, float]]:
    from benchmarks.paged_decode_single_pass import single_pass_decode

    rows = []
    for batch, context in DECODE_CASES:
        args = decode_args(batch, context, max_model_len)
        rows.append((f"decode B={batch} ctx={context}", "single-pass decode",
                     graphed_us(lambda args=args: single_pass_decode(*args)),
                     graphed_us(lambda args=args: paged_attention.paged_decode_attention(*args))))
    return rows


def time_prefill(max_model_len: int) -> list[tuple[str, str, float, float]]:
    heads = LLAMA_8B
    cache = wide_cache([PROMPT], heads, max_model_len)
    q = torch.randn(PROMPT, heads.q, heads.dim, device=DEVICE, dtype=torch.bfloat16)
    kernel = graphed_us(lambda: prefill(q, cache, [PROMPT], heads))
    slots = cache.tables[0].long().repeat_interleave(BLOCK_SIZE)[:PROMPT] * BLOCK_SIZE + torch.arange(
        PROMPT, device=DEVICE) % BLOCK_SIZE
    queries = q.transpose(0, 1)[None]  # [1, Hq, T, D]
    keys, values = (c[slots].transpose(0, 1)[None].repeat_interleave(heads.q // heads.kv, 1) for c in (cache.k, cache.v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = graphed_us(lambda: F.scaled_dot_product_attention(queries, keys, values, is_causal=True))
    mask = torch.ones(PROMPT, PROMPT, dtype=torch.bool, device=DEVICE).tril()
    by_block = cache.k.view(-1, BLOCK_SIZE, heads.kv, heads.dim), cache.v.view(-1, BLOCK_SIZE, heads.kv, heads.dim)
    used = cache.tables[0, : PROMPT // BLOCK_SIZE].long()

    def gathered() -> torch.Tensor:  # model._gathered_attention's shape of work
        k, v = (c.index_select(0, used).view(1, -1, heads.kv, heads.dim).transpose(1, 2) for c in by_block)
        return F.scaled_dot_product_attention(queries, k, v, attn_mask=mask, enable_gqa=True)

    return [(f"prefill {PROMPT} tokens, B=1", "SDPA flash, contiguous K/V", flash, kernel),
            (f"prefill {PROMPT} tokens, B=1", "gather + SDPA(mask)", graphed_us(gathered), kernel)]


def sweep(max_model_len: int) -> None:
    """Time other tile sizes and warp counts (the modules' constants, set for the duration)."""
    inputs = [decode_args(batch, context, max_model_len) for batch, context in DECODE_CASES]
    saved = {name: getattr(paged_attention, name) for name in
             ("DECODE_TILE", "DECODE_SUB_TILE", "DECODE_WARPS_SMALL_HEAD", "DECODE_WARPS_LARGE_HEAD")}
    print(f"\n{'decode sweep (tile, sub-tile, warps)':<40}" + "".join(f"{f'B={b} ctx={c}':>16}" for b, c in DECODE_CASES))
    for tile, sub, warps in DECODE_SWEEP:
        paged_attention.DECODE_TILE, paged_attention.DECODE_SUB_TILE = tile, sub
        paged_attention.DECODE_WARPS_SMALL_HEAD = paged_attention.DECODE_WARPS_LARGE_HEAD = warps
        times = [graphed_us(lambda args=args: paged_attention.paged_decode_attention(*args)) for args in inputs]
        print(f"{(tile, sub, warps)!s:<40}" + "".join(f"{us:>16.1f}" for us in times))
    for name, value in saved.items():
        setattr(paged_attention, name, value)
    saved = {name: getattr(paged_prefill, name) for name in ("PREFILL_CONFIG_SMALL_HEAD", "PREFILL_CONFIG_LARGE_HEAD")}
    print(f"\n{'prefill sweep (block_m, block_n, warps)':<40}{f'{PROMPT} tokens':>16}")
    heads = LLAMA_8B
    cache = wide_cache([PROMPT], heads, max_model_len)
    q = torch.randn(PROMPT, heads.q, heads.dim, device=DEVICE, dtype=torch.bfloat16)
    for config in PREFILL_SWEEP:
        paged_prefill.PREFILL_CONFIG_SMALL_HEAD = paged_prefill.PREFILL_CONFIG_LARGE_HEAD = config
        try:
            print(f"{config!s:<40}{graphed_us(lambda: prefill(q, cache, [PROMPT], heads)):>16.1f}")
        except Exception as error:  # noqa: BLE001 - a config may not fit in shared memory; report, go on
            print(f"{config!s:<40}{type(error).__name__:>16}")
    for name, value in saved.items():
        setattr(paged_prefill, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true", help="CPU, Triton's interpreter: accuracy only")
    parser.add_argument("--sweep", action="store_true", help="also time other tile sizes and warp counts")
    parser.add_argument("--max-model-len", type=int, default=8192, help="block table width, in tokens")
    args = parser.parse_args()
    worst = check_accuracy(args.interpret)
    if not args.interpret:
        print(f"{LLAMA_8B} bf16, tables for {args.max_model_len} tokens; GPU us per call (CUDA graph replays)")
        print(f"{'case':<28}{'baseline':<30}{'baseline us':>12}{'kernel us':>12}{'speedup':>9}")
        for case, baseline, old, new in time_decode(args.max_model_len) + time_prefill(args.max_model_len):
            print(f"{case:<28}{baseline:<30}{old:>12.1f}{new:>12.1f}{old / new:>8.2f}x")
        if args.sweep:
            sweep(args.max_model_len)
    print("worst |error| against fp32 SDPA:", {k: float(f"{e:.2e}") for k, e in worst.items()})
    print("paged attention check: ok")


if __name__ == "__main__":
    main()
