"""The CPU decode-attention kernel (worker/torch_engine/cpu_attention.cpp) against SDPA, and in the engine.

Cache slots that no sequence has written hold NaN, so a kernel that reads past a context (or a wrong
block) shows NaN. The kernel is built with g++ (`make setup` builds it; these tests build it if it is
not); where no C++ compiler is installed they skip, and wherever one is, the kernel must build.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.test_attention_kernels import BLOCK_SIZE, Heads, PagedCache, paged_cache, reference
from tests.test_paged_engine import make_engine, run_scenario
from worker.torch_engine import cpu_attention

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernel with")

HEADS = [Heads(9, 3, 64), Heads(32, 8, 128), Heads(8, 8, 64, scale=0.05), Heads(4, 2, 80)]
LENS = [1, 15, 16, 17, 100, 255, 257, 1030]


def kernel(q: torch.Tensor, cache: PagedCache, heads: Heads) -> torch.Tensor:
    scale = heads.scale or heads.dim ** -0.5
    return cpu_attention.paged_decode_attention(q, cache.k, cache.v, cache.tables.long(), cache.lens.long(), BLOCK_SIZE,
                                                scale)


@pytest.fixture(scope="module", autouse=True)
def built_kernel() -> None:
    cpu_attention.build()
    cpu_attention._kernel.cache_clear()  # an engine of another test may have looked before the build


def test_the_kernel_builds_wherever_a_compiler_is() -> None:
    assert cpu_attention.available()
    assert cpu_attention.applies(torch.zeros(1, 1, 1))
    assert cpu_attention.applies(torch.zeros(1, 1, 1, dtype=torch.bfloat16))
    assert not cpu_attention.applies(torch.zeros(1, 1, 1, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_decode_matches_sdpa_across_block_boundaries(heads: Heads, dtype: torch.dtype) -> None:
    """float32: within float32's rounding of SDPA's float32 result. bfloat16: the kernel computes in float32
    and rounds once, so its output is SDPA's float32 result (over the same bfloat16 inputs) rounded, give or
    take one bfloat16 step."""
    torch.manual_seed(0)
    cache = paged_cache(LENS, heads, dtype)
    # q as the engine holds it: the query heads of a [tokens, q heads + kv heads, dim] rotary output
    q = torch.randn(len(LENS), heads.q + heads.kv, heads.dim, dtype=dtype)[:, : heads.q]
    got = kernel(q, cache, heads)
    assert got.dtype == dtype
    assert torch.isfinite(got).all(), "non-finite output: the kernel read a slot outside a sequence's context"
    expected = reference(q, cache, [1] * len(LENS), heads)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(got.float(), expected, atol=1e-5, rtol=2 ** -8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_rows_output_is_bitwise_the_same_alone_and_inside_a_batch(dtype: torch.dtype) -> None:
    heads = Heads(9, 3, 64)
    torch.manual_seed(1)
    cache = paged_cache(LENS, heads, dtype)
    q = torch.randn(len(LENS), heads.q, heads.dim, dtype=dtype)
    full = kernel(q, cache, heads)
    for row in range(len(LENS)):
        alone = PagedCache(cache.k, cache.v, cache.tables[row : row + 1], cache.lens[row : row + 1])
        assert torch.equal(kernel(q[row : row + 1], alone, heads), full[row : row + 1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the engine test's CPU engine is a CUDA one where a GPU is")
@pytest.mark.parametrize("model", ["tiny-gqa", "tiny-mpt"])
def test_the_engine_gives_the_tokens_of_gather_and_sdpa(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompt chunks, a prefix hit, mixed steps and decode-only steps, with the kernel and without it (MPT's
    ALiBi keeps the gather: its tokens are the same either way)."""
    calls = []
    real = cpu_attention.paged_decode_attention

    def counted(*args: object) -> torch.Tensor:
        calls.append(args[0].shape[0])
        return real(*args)

    monkeypatch.setattr(cpu_attention, "paged_decode_attention", counted)
    with_kernel = run_scenario(make_engine(model, "gathered"), monkeypatch)
    assert bool(calls) == (model == "tiny-gqa"), calls
    monkeypatch.setattr(cpu_attention, "applies", lambda q: False)
    without = run_scenario(make_engine(model, "gathered"), monkeypatch)
    assert with_kernel[0] == without[0]
    worst = max(float((g - w).abs().max()) for s in without[1] for g, w in zip(with_kernel[1][s], without[1][s]))
    assert worst < 1e-4, worst


@pytest.mark.skipif(torch.cuda.is_available(), reason="the engine test's CPU engine is a CUDA one where a GPU is")
def test_bfloat16_decodes_through_the_kernel_stay_within_bfloat16_noise_of_float32(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In bfloat16 the kernel and gather + SDPA round differently (SDPA rounds the softmax weights to
    bfloat16), so a near-tie may go either way and exact tokens are not comparable. What is: the logits of
    every step, while a sequence's tokens are still those of the float32 model, lie as close to float32's as
    the projections' own bfloat16 rounding puts them (gather + SDPA: 0.06 at most here)."""
    calls = []
    real = cpu_attention.paged_decode_attention

    def counted(*args: object) -> torch.Tensor:
        calls.append(args[0].dtype)
        return real(*args)

    monkeypatch.setattr(cpu_attention, "paged_decode_attention", counted)
    tokens, logits = run_scenario(make_engine("tiny-gqa", "gathered", "bfloat16"), monkeypatch)
    assert calls and set(calls) == {torch.bfloat16}
    exact_tokens, exact_logits = run_scenario(make_engine("tiny-gqa", "gathered", "float32"), monkeypatch)
    compared = 0
    for slot, exact in exact_tokens.items():
        for step, (token, exact_token) in enumerate(zip(tokens[slot], exact)):
            worst = float((logits[slot][step].float() - exact_logits[slot][step]).abs().max())
            assert worst < 0.15, (slot, step, worst)
            compared += 1
            if token != exact_token:
                break  # later steps follow another history
    assert compared >= 20, compared


def test_a_context_past_its_table_or_a_block_past_the_cache_raises_instead_of_reading_outside() -> None:
    heads = Heads(9, 3, 64)
    cache = paged_cache([20, 5], heads, torch.float32)
    q = torch.randn(2, heads.q, heads.dim)
    too_long = PagedCache(cache.k, cache.v, cache.tables, torch.tensor([20, cache.tables.shape[1] * BLOCK_SIZE + 1]))
    with pytest.raises(RuntimeError, match="longer than its block table"):
        kernel(q, too_long, heads)
    outside = cache.tables.clone()
    outside[0, 1] = cache.k.shape[0] // BLOCK_SIZE
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernel(q, PagedCache(cache.k, cache.v, outside, cache.lens), heads)
