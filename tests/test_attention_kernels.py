"""The Triton paged attention kernels against SDPA over keys gathered from the block table (fp32).

They run on a CUDA GPU, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, with a
smaller set of cases); without triton, or with neither, every test skips. Cache slots that no
sequence has written hold NaN, so a kernel that reads past a context (or a wrong block) shows NaN.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from worker.torch_engine.mpt import alibi_slopes
from worker.torch_engine.paged_attention import (
    DECODE_TILE,
    paged_decode_attention,
    paged_prefill_attention,
)

try:
    import triton
except ImportError:
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ON_GPU = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if ON_GPU else "cpu"

if triton is None:
    _skip = "triton is not installed"
elif not ON_GPU and not INTERPRET:
    _skip = "needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernels on CPU in Triton's interpreter"
else:
    _skip = ""
pytestmark = pytest.mark.skipif(bool(_skip), reason=_skip)

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Heads:
    q: int
    kv: int
    dim: int
    alibi: bool = False
    scale: float | None = None

    def __str__(self) -> str:
        return f"{self.q}/{self.kv}x{self.dim}{'-alibi' if self.alibi else ''}{'-scaled' if self.scale else ''}"


HEADS = [
    Heads(32, 8, 128),
    Heads(9, 3, 64),  # SmolLM2
    Heads(8, 8, 64, scale=0.05),
    Heads(12, 4, 64, alibi=True),
    Heads(32, 32, 128, alibi=True),
    Heads(4, 2, 80),  # a head size that is not a power of two
]
DTYPES = [torch.float32, torch.bfloat16]
# Around the 16-token paged blocks and the 256-token decode splits, and past several splits.
DECODE_LENS = [1, 15, 16, 17, 255, 256, 257, 300, 1030]
# (new queries, cached tokens before them): prompts, prefix hits, chunks, and single-query rows.
PREFILL_SEQS = [(1, 0), (17, 0), (5, 40), (1, 300), (64, 200), (33, 15), (130, 1000)]
if ON_GPU:
    PREFILL_SEQS += [(300, 0), (257, 700), (1, 1100), (1000, 30)]
else:  # the interpreter runs every program in numpy: fewer and smaller cases
    PREFILL_SEQS = [(1, 0), (17, 0), (5, 40), (1, 300), (40, 230), (70, 300)]
AT_LEAST_ONE_SPLIT_BOUNDARY = max(DECODE_LENS) > DECODE_TILE


@dataclass
class PagedCache:
    k: torch.Tensor  # [slots, Hkv, D]
    v: torch.Tensor
    tables: torch.Tensor  # [B, max_blocks] int32
    lens: torch.Tensor  # [B] int32, tokens cached per sequence


def paged_cache(lens: list[int], heads: Heads, dtype: torch.dtype, spare_columns: int = 2) -> PagedCache:
    """Random K/V for each sequence's first lens[b] positions, scattered over shuffled blocks; NaN elsewhere."""
    blocks_per_seq = [triton_cdiv(n, BLOCK_SIZE) for n in lens]
    num_blocks = sum(blocks_per_seq) + 4
    order = torch.randperm(num_blocks)
    width = max(blocks_per_seq) + spare_columns
    tables = torch.full((len(lens), width), num_blocks - 1, dtype=torch.int32)  # spare entries: a NaN block
    k = torch.full((num_blocks * BLOCK_SIZE, heads.kv, heads.dim), float("nan"), dtype=dtype)
    v = k.clone()
    used = 0
    for b, (n, count) in enumerate(zip(lens, blocks_per_seq)):
        tables[b, :count] = order[used : used + count]
        used += count
        slots = slots_of(tables[b], n)
        k[slots] = torch.randn(n, heads.kv, heads.dim).to(dtype)
        v[slots] = torch.randn(n, heads.kv, heads.dim).to(dtype)
    return PagedCache(k.to(DEVICE), v.to(DEVICE), tables.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def slots_of(table: torch.Tensor, length: int) -> torch.Tensor:
    positions = torch.arange(length, device=table.device)
    return table[positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE


def reference(q: torch.Tensor, cache: PagedCache, query_lens: list[int], heads: Heads) -> torch.Tensor:
    """fp32 SDPA per sequence over its gathered keys: causal from each query's position, plus ALiBi."""
    slopes = alibi_slopes(heads.q, 8.0).to(q.dtype).float().to(DEVICE) if heads.alibi else None
    outs, start = [], 0
    for b, q_len in enumerate(query_lens):
        length = int(cache.lens[b])
        slots = slots_of(cache.tables[b], length)
        keys, values = (c[slots].float().transpose(0, 1) for c in (cache.k, cache.v))  # [Hkv, L, D]
        positions = torch.arange(length, device=DEVICE)
        query_pos = length - q_len + torch.arange(q_len, device=DEVICE)
        distance = (positions[None, :] - query_pos[:, None]).float()  # [q_len, L]
        bias = torch.zeros_like(distance).masked_fill(distance > 0, float("-inf"))
        if slopes is not None:
            bias = bias + slopes[:, None, None] * distance
        queries = q[start : start + q_len].float().transpose(0, 1)  # [Hq, q_len, D]
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=bias, scale=heads.scale, enable_gqa=True)
        outs.append(out.transpose(0, 1))
        start += q_len
    return torch.cat(outs)


# Device tensors made once per argument (the first call comes before any CUDA-graph capture, where a copy
# from the host is not allowed).
@cache
def device_slopes(heads: Heads, dtype: torch.dtype) -> torch.Tensor | None:
    return alibi_slopes(heads.q, 8.0).to(dtype).to(DEVICE) if heads.alibi else None


@cache
def query_start(query_lens: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def decode(q: torch.Tensor, cache: PagedCache, heads: Heads) -> torch.Tensor:
    return paged_decode_attention(q, cache.k, cache.v, cache.tables, cache.lens, BLOCK_SIZE,
                                  device_slopes(heads, q.dtype), heads.scale)


def prefill(q: torch.Tensor, cache: PagedCache, query_lens: list[int], heads: Heads) -> torch.Tensor:
    return paged_prefill_attention(q, cache.k, cache.v, cache.tables, query_start(tuple(query_lens)), cache.lens,
                                   BLOCK_SIZE, max(query_lens), device_slopes(heads, q.dtype), heads.scale)


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert torch.isfinite(got).all(), "non-finite output: a kernel read a slot outside a sequence's context"
    # bf16: probabilities enter the PV product as bf16 and the output is rounded to bf16.
    tolerance = 1e-4 if got.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_kv_decode_matches_sdpa_across_block_and_split_boundaries(heads: Heads, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    assert AT_LEAST_ONE_SPLIT_BOUNDARY
    cache = paged_cache(DECODE_LENS, heads, dtype)
    q = torch.randn(len(DECODE_LENS), heads.q, heads.dim).to(dtype).to(DEVICE)
    assert_matches(decode(q, cache, heads), reference(q, cache, [1] * len(DECODE_LENS), heads))


@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_matches_sdpa_for_prompts_prefix_hits_chunks_and_single_queries(heads: Heads,
                                                                                  dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    query_lens = [q_len for q_len, _ in PREFILL_SEQS]
    cache = paged_cache([q_len + cached for q_len, cached in PREFILL_SEQS], heads, dtype)
    q = torch.randn(sum(query_lens), heads.q, heads.dim).to(dtype).to(DEVICE)
    assert_matches(prefill(q, cache, query_lens, heads), reference(q, cache, query_lens, heads))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_of_decode_rows_only_matches_sdpa(dtype: torch.dtype) -> None:
    """max_query_len 1 narrows the query tile to one token: rows are then just the group's heads."""
    torch.manual_seed(2)
    heads = Heads(12, 4, 64, alibi=True)
    cache = paged_cache(DECODE_LENS, heads, dtype)
    q = torch.randn(len(DECODE_LENS), heads.q, heads.dim).to(dtype).to(DEVICE)
    assert_matches(prefill(q, cache, [1] * len(DECODE_LENS), heads), reference(q, cache, [1] * len(DECODE_LENS), heads))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_output_is_bitwise_identical_alone_and_inside_a_batch(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    heads = Heads(9, 3, 64)
    lens = [DECODE_TILE + 44, 3, 2 * DECODE_TILE + 1, 120, DECODE_TILE]
    cache = paged_cache(lens, heads, dtype, spare_columns=5)
    q = torch.randn(len(lens), heads.q, heads.dim).to(dtype).to(DEVICE)
    batched = decode(q, cache, heads)
    for b in range(len(lens)):
        used_columns = triton_cdiv(lens[b], BLOCK_SIZE)
        for columns in (cache.tables.shape[1], used_columns):  # wider tables mean more (idle) splits in the grid
            alone = PagedCache(cache.k, cache.v, cache.tables[b : b + 1, :columns].contiguous(), cache.lens[b : b + 1])
            assert torch.equal(decode(q[b : b + 1], alone, heads), batched[b : b + 1]), (b, columns)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_both_kernels_replay_in_a_cuda_graph_with_new_lengths() -> None:
    torch.manual_seed(4)
    heads = Heads(32, 8, 128)
    query_lens = [40, 30, 1]
    cache = paged_cache([1000, 31, 257], heads, torch.bfloat16, spare_columns=40)
    cache.lens.copy_(torch.tensor([700, 30, 256], dtype=torch.int32))
    q_decode = torch.randn(len(query_lens), heads.q, heads.dim, device=DEVICE, dtype=torch.bfloat16)
    q_prefill = torch.randn(sum(query_lens), heads.q, heads.dim, device=DEVICE, dtype=torch.bfloat16)
    prefill(q_prefill, cache, query_lens, heads), decode(q_decode, cache, heads)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = (decode(q_decode, cache, heads), prefill(q_prefill, cache, query_lens, heads))
    cache.lens.copy_(torch.tensor([1000, 31, 257], dtype=torch.int32))  # longer contexts, more splits
    graph.replay()
    assert torch.equal(graphed[0], decode(q_decode, cache, heads))
    assert torch.equal(graphed[1], prefill(q_prefill, cache, query_lens, heads))
