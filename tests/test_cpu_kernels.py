"""The CPU kernels (worker/torch_engine/cpu_kernels.py): decode attention against SDPA, the bfloat16
elementwise kernels against the eager ops they replace, and both in the engine.

Cache slots that no sequence has written hold NaN, so an attention kernel that reads past a context (or a
wrong block) shows NaN. The kernels are built with g++ (`make setup` builds them; these tests build them if
they are not); where no C++ compiler is installed they skip, and wherever one is, the kernels must build.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.test_attention_kernels import BLOCK_SIZE, DEVICE, Heads, PagedCache, paged_cache, reference
from tests.test_paged_engine import make_engine, run_scenario
from worker.torch_engine import cpu_kernels
from worker.torch_engine.model import rms_norm

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernels with")

HEADS = [Heads(9, 3, 64), Heads(32, 8, 128), Heads(8, 8, 64, scale=0.05), Heads(4, 2, 80)]
LENS = [1, 15, 16, 17, 100, 255, 257, 1030]


def cpu_cache(lens: list[int], heads: Heads, dtype: torch.dtype) -> PagedCache:
    """test_attention_kernels' paged cache (made on the GPU where there is one), on the CPU."""
    cache = paged_cache(lens, heads, dtype)
    return PagedCache(cache.k.cpu(), cache.v.cpu(), cache.tables.cpu(), cache.lens.cpu())


def cpu_reference(q: torch.Tensor, cache: PagedCache, heads: Heads) -> torch.Tensor:
    """test_attention_kernels' SDPA reference for one query per sequence, computed where it computes."""
    on_device = PagedCache(*(t.to(DEVICE) for t in (cache.k, cache.v, cache.tables, cache.lens)))
    return reference(q.to(DEVICE), on_device, [1] * q.shape[0], heads).cpu()


def kernel(q: torch.Tensor, cache: PagedCache, heads: Heads) -> torch.Tensor:
    scale = heads.scale or heads.dim ** -0.5
    return cpu_kernels.paged_decode_attention(q, cache.k, cache.v, cache.tables.long(), cache.lens.long(), BLOCK_SIZE,
                                              scale)


def record_calls(monkeypatch: pytest.MonkeyPatch, *names: str) -> dict[str, list[torch.dtype]]:
    """Wraps cpu_kernels' functions of these names; per name, the dtype of each call's first tensor."""
    calls: dict[str, list[torch.dtype]] = {name: [] for name in names}
    for name in names:
        real = getattr(cpu_kernels, name)

        def recorded(*args: torch.Tensor | None, name: str = name, real: object = real) -> torch.Tensor:
            calls[name].append(next(a for a in args if a is not None).dtype)
            return real(*args)

        monkeypatch.setattr(cpu_kernels, name, recorded)
    return calls


@pytest.fixture(scope="module", autouse=True)
def built_kernels() -> None:
    cpu_kernels.build()
    cpu_kernels._module.cache_clear()  # an engine of another test may have looked before the build


def test_the_kernels_build_wherever_a_compiler_is() -> None:
    assert cpu_kernels.available()
    assert cpu_kernels.attention_applies(torch.zeros(1, 1, 1))
    assert cpu_kernels.attention_applies(torch.zeros(1, 1, 1, dtype=torch.bfloat16))
    assert not cpu_kernels.attention_applies(torch.zeros(1, 1, 1, dtype=torch.float16))
    assert cpu_kernels.elementwise_applies(torch.zeros(1, 1, dtype=torch.bfloat16))
    assert not cpu_kernels.elementwise_applies(torch.zeros(1, 1))  # float32 keeps torch's ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_decode_matches_sdpa_across_block_boundaries(heads: Heads, dtype: torch.dtype) -> None:
    """float32: within float32's rounding of SDPA's float32 result. bfloat16: the kernel computes in float32
    and rounds once, so its output is SDPA's float32 result (over the same bfloat16 inputs) rounded, give or
    take one bfloat16 step."""
    torch.manual_seed(0)
    cache = cpu_cache(LENS, heads, dtype)
    # q as the engine holds it: the query heads of a [tokens, q heads + kv heads, dim] rotary output
    q = torch.randn(len(LENS), heads.q + heads.kv, heads.dim, dtype=dtype)[:, : heads.q]
    got = kernel(q, cache, heads)
    assert got.dtype == dtype
    assert torch.isfinite(got).all(), "non-finite output: the kernel read a slot outside a sequence's context"
    expected = cpu_reference(q, cache, heads)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(got.float(), expected, atol=1e-5, rtol=2 ** -8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_rows_output_is_bitwise_the_same_alone_and_inside_a_batch(dtype: torch.dtype) -> None:
    heads = Heads(9, 3, 64)
    torch.manual_seed(1)
    cache = cpu_cache(LENS, heads, dtype)
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
    calls = record_calls(monkeypatch, "paged_decode_attention")
    with_kernel = run_scenario(make_engine(model, "gathered"), monkeypatch)
    assert bool(calls["paged_decode_attention"]) == (model == "tiny-gqa"), calls
    monkeypatch.setattr(cpu_kernels, "attention_applies", lambda q: False)
    without = run_scenario(make_engine(model, "gathered"), monkeypatch)
    assert with_kernel[0] == without[0]
    worst = max(float((g - w).abs().max()) for s in without[1] for g, w in zip(with_kernel[1][s], without[1][s]))
    assert worst < 1e-4, worst


@pytest.mark.skipif(torch.cuda.is_available(), reason="the engine test's CPU engine is a CUDA one where a GPU is")
def test_bfloat16_steps_through_the_kernels_stay_within_bfloat16_noise_of_float32(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In bfloat16 the kernels and torch's ops round a little differently (SDPA rounds the softmax weights to
    bfloat16, the kernel does not), so a near-tie may go either way and exact tokens are not comparable.
    What is: the logits of every step, while a sequence's tokens are still those of the float32 model, lie
    as close to float32's as the projections' own bfloat16 rounding puts them (torch's ops: 0.06 at most)."""
    calls = record_calls(monkeypatch, "paged_decode_attention", "add_rms_norm", "silu_mul")
    tokens, logits = run_scenario(make_engine("tiny-gqa", "gathered", "bfloat16"), monkeypatch)
    assert {name: set(dtypes) for name, dtypes in calls.items()} == {
        "paged_decode_attention": {torch.bfloat16}, "add_rms_norm": {torch.bfloat16}, "silu_mul": {torch.bfloat16}}
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


def assert_rounded_as_eager(got: torch.Tensor, eager: torch.Tensor) -> None:
    """The same bfloat16 values, but for a rare element one step off (a sum of squares in another order, the
    last bit of a float32 exp on a rounding boundary)."""
    assert got.dtype == eager.dtype == torch.bfloat16 and got.shape == eager.shape
    assert torch.equal(got.isnan(), eager.isnan())
    finite = ~eager.isnan()
    torch.testing.assert_close(got[finite].float(), eager[finite].float(), atol=0, rtol=2 ** -7)
    assert (got[finite] != eager[finite]).float().mean() < 1e-3


@pytest.mark.parametrize("hidden", [576, 67])
@pytest.mark.parametrize("with_x", [True, False])
def test_add_rms_norm_rounds_as_eager_llama_rms_norm(hidden: int, with_x: bool) -> None:
    torch.manual_seed(2)
    rows = 300
    residual = (torch.randn(rows, hidden) * torch.logspace(-3, 3, rows)[:, None]).bfloat16()
    wide = torch.randn(rows, hidden + 9).bfloat16()
    x = wide[:, :hidden] if with_x else None  # rows that are not contiguous with each other, as a view gives them
    weight = (torch.rand(hidden) + 0.5).bfloat16()
    expected_residual = residual + x if x is not None else residual.clone()
    expected = rms_norm(expected_residual, weight, 1e-5)
    got = cpu_kernels.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(residual, expected_residual), "the residual add rounds once, as eager's"
    assert_rounded_as_eager(got, expected)


def test_silu_mul_rounds_as_eager_silu_then_multiply() -> None:
    torch.manual_seed(3)
    rows, width = 70, 1536 + 5
    gate_up = (torch.randn(rows, 2 * width) * torch.logspace(-2, 2, rows)[:, None]).bfloat16()
    gate_up[0, 3] = 100.0
    gate_up[0, 4] = -100.0
    gate_up[1, 7] = float("nan")  # a NaN stays a NaN: the engine fails such a row by its non-finite logits
    gate, up = gate_up.chunk(2, dim=-1)
    assert_rounded_as_eager(cpu_kernels.silu_mul(gate_up), F.silu(gate).mul_(up))


def test_the_elementwise_kernels_refuse_what_they_do_not_handle() -> None:
    with pytest.raises(RuntimeError, match="bfloat16"):
        cpu_kernels.silu_mul(torch.zeros(2, 8))
    with pytest.raises(RuntimeError, match="contiguous rows"):
        cpu_kernels.silu_mul(torch.zeros(8, 2, dtype=torch.bfloat16).t())
    with pytest.raises(RuntimeError, match="weight"):
        cpu_kernels.add_rms_norm(None, torch.zeros(2, 8, dtype=torch.bfloat16), torch.ones(7, dtype=torch.bfloat16), 1e-5)


def test_a_context_past_its_table_or_a_block_past_the_cache_raises_instead_of_reading_outside() -> None:
    heads = Heads(9, 3, 64)
    cache = cpu_cache([20, 5], heads, torch.float32)
    q = torch.randn(2, heads.q, heads.dim)
    too_long = PagedCache(cache.k, cache.v, cache.tables, torch.tensor([20, cache.tables.shape[1] * BLOCK_SIZE + 1]))
    with pytest.raises(RuntimeError, match="longer than its block table"):
        kernel(q, too_long, heads)
    outside = cache.tables.clone()
    outside[0, 1] = cache.k.shape[0] // BLOCK_SIZE
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernel(q, PagedCache(cache.k, cache.v, outside, cache.lens), heads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to hand the kernels GPU tensors")
def test_gpu_tensors_are_refused_not_read_as_host_memory() -> None:
    heads = Heads(9, 3, 64)
    cache = cpu_cache([20, 5], heads, torch.float32)
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        kernel(torch.randn(2, heads.q, heads.dim, device="cuda"), cache, heads)
    with pytest.raises(RuntimeError, match="CPU bfloat16"):
        cpu_kernels.silu_mul(torch.zeros(2, 8, dtype=torch.bfloat16, device="cuda"))
