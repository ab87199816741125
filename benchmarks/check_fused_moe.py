"""Check (and time) the Triton fused experts against the reference MixtureOfExperts loop.

    python benchmarks/check_fused_moe.py              # CUDA: accuracy, timings, CUDA-graph replay; one JSON line
    python benchmarks/check_fused_moe.py --interpret  # CPU, TRITON_INTERPRET=1: small shapes, accuracy only
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

if "--interpret" in sys.argv:  # must be set before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from worker.torch_engine.fused_moe import align_by_expert, fused_experts
from worker.torch_engine.mlp import MixtureOfExperts, loop_experts


def route(x: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing MixtureOfExperts computes: fp32 softmax, top_k, weights renormalised."""
    probs = torch.softmax(F.linear(x, router).float(), dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def dense_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """Every expert on every token (batched GEMMs, no sync), mixed with a dense [T, E] weight matrix."""
    num_experts = gate_up.shape[0]
    mix = torch.zeros(x.shape[0], num_experts, dtype=torch.float32, device=x.device)
    mix.scatter_(1, topk_ids.long(), topk_weights)
    h = torch.bmm(x.expand(num_experts, *x.shape), gate_up.transpose(1, 2))  # [E, T, 2I]
    gate, up = h.chunk(2, dim=-1)
    y = torch.bmm(F.silu(gate) * up, down.transpose(1, 2))  # [E, T, H]
    return torch.einsum("eth,te->th", y.float(), mix).to(x.dtype)


def make_weights(hidden: int, inter: int, experts: int, dtype: torch.dtype, device: str,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    return {"router": randn(experts, hidden, scale=hidden**-0.5),
            "gate_up": randn(experts, 2 * inter, hidden, scale=hidden**-0.5),
            "down": randn(experts, hidden, inter, scale=inter**-0.5)}


def make_case(weights: dict[str, torch.Tensor], tokens: int, top_k: int, seed: int) -> dict[str, torch.Tensor]:
    """Random activations for `tokens` tokens, routed the way MixtureOfExperts routes them."""
    router = weights["router"]
    gen = torch.Generator(device=router.device).manual_seed(seed)
    x = torch.randn(tokens, router.shape[1], generator=gen, device=router.device).to(router.dtype)
    topk_weights, topk_ids = route(x, router, top_k)
    return {**weights, "x": x, "topk_weights": topk_weights, "topk_ids": topk_ids}


def check_case(case: dict[str, torch.Tensor], top_k: int, rel_tol: float) -> tuple[float, float, float]:
    """fused_experts against MixtureOfExperts itself.

    Returns (max abs error, that over max |reference|, and for scale the reference's own max error against
    the same computation in fp32, over max |reference|).
    """
    args = (case["x"], case["gate_up"], case["down"], case["topk_weights"], case["topk_ids"])
    want = MixtureOfExperts(case["router"], case["gate_up"], case["down"], top_k)(case["x"]).float()
    got = fused_experts(*args)
    assert got.shape == want.shape and got.dtype == case["x"].dtype
    scale = max(want.abs().max().item(), 1e-30)
    err = (got.float() - want).abs().max().item()
    exact = loop_experts(*(t.float() for t in args[:4]), case["topk_ids"])
    ref_rel = (want - exact).abs().max().item() / scale
    assert err / scale < rel_tol, (err, err / scale)
    return err, err / scale, ref_rel


def check_alignment() -> None:
    """align_by_expert against a stable sort: each expert's pairs, in order, at the start of its padded run."""
    gen = torch.Generator().manual_seed(1)
    for tokens, experts, top_k, block_m in ((1, 8, 2, 16), (37, 8, 2, 16), (100, 64, 8, 16), (300, 5, 3, 64),
                                             (3, 2, 1, 128)):
        ids = torch.randint(0, experts, (tokens, top_k), generator=gen)
        pairs, block_expert, padded_total = align_by_expert(ids, experts, block_m)
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=experts).tolist()
        row = start = 0
        for expert, count in enumerate(counts):
            padded = -(-count // block_m) * block_m
            assert torch.equal(pairs[row : row + count].long(), order[start : start + count]), expert
            assert (pairs[row + count : row + padded] == flat.numel()).all(), expert
            assert (block_expert[row // block_m : (row + padded) // block_m] == expert).all(), expert
            row, start = row + padded, start + count
        assert padded_total.item() == row and block_expert.numel() * block_m >= row
    print("align_by_expert matches a stable sort")


def interpret_check() -> None:
    """CPU under TRITON_INTERPRET=1: small shapes with ragged edges (I=96 is not a multiple of BLOCK_N)."""
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 2e-2)):
        for tokens, experts, top_k in ((1, 4, 2), (5, 8, 2), (33, 4, 2), (33, 8, 2), (40, 8, 3), (3, 8, 8)):
            case = make_case(make_weights(64, 96, experts, dtype, "cpu", seed=experts), tokens, top_k, seed=tokens)
            err, rel, ref_rel = check_case(case, top_k, tol)
            print(f"{str(dtype)[6:]:8} T={tokens:3} E={experts} K={top_k}: max abs err {err:.2e}, rel {rel:.1e} "
                  f"(reference vs fp32: rel {ref_rel:.1e})", flush=True)
    # Every block size: T*K/E picks 16, 64 or 128 rows a block.
    for tokens in (48, 300):
        case = make_case(make_weights(64, 96, 4, torch.bfloat16, "cpu", seed=5), tokens, 2, seed=tokens)
        err, rel, ref_rel = check_case(case, 2, 2e-2)
        print(f"bfloat16 T={tokens:3} E=4 K=2: max abs err {err:.2e}, rel {rel:.1e} (reference vs fp32: rel {ref_rel:.1e})")
    check_alignment()
    # int32 ids, and two experts that get every pair (long runs, several blocks each)
    case = make_case(make_weights(64, 96, 4, torch.float32, "cpu"), 70, 2, seed=7)
    case["topk_ids"] = torch.stack([torch.zeros(70, dtype=torch.int32), torch.full((70,), 3, dtype=torch.int32)], 1)
    want = loop_experts(case["x"], case["gate_up"], case["down"], case["topk_weights"], case["topk_ids"].long())
    got = fused_experts(case["x"], case["gate_up"], case["down"], case["topk_weights"], case["topk_ids"])
    err = (got - want).abs().max().item()
    print(f"float32  T= 70 E=4 K=2 int32 ids, two experts only: max abs err {err:.2e}")
    assert err < 1e-3 * want.abs().max().item()
    print("interpret check passed")


def time_ms(fn: Callable[[], torch.Tensor], warmup: int = 5, iters: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cuda_check() -> None:
    torch.manual_seed(0)
    experts, top_k = 8, 2
    report: dict[str, object] = {"errors": {}, "timings_ms": {}}
    for dtype, (hidden, inter), tol in ((torch.float32, (1024, 3584), 1e-3), (torch.bfloat16, (4096, 14336), 2e-2)):
        weights = make_weights(hidden, inter, experts, dtype, "cuda")
        for tokens in (1, 7, 64, 300, 2048):
            err, rel, ref_rel = check_case(make_case(weights, tokens, top_k, seed=tokens), top_k, tol)
            key = f"{str(dtype)[6:]} T={tokens} H={hidden} I={inter}"
            report["errors"][key] = {"max_abs": err, "rel": rel, "reference_vs_fp32_rel": ref_rel}  # type: ignore
            print(f"{key}: max abs err {err:.3e} (rel {rel:.2e}; reference vs fp32 rel {ref_rel:.2e})", flush=True)
        del weights

    hidden, inter = 4096, 14336
    base = make_case(make_weights(hidden, inter, experts, torch.bfloat16, "cuda", seed=1), 512, top_k, seed=1)
    for tokens in (1, 32, 64, 512):
        args = (base["x"][:tokens].contiguous(), base["gate_up"], base["down"],
                base["topk_weights"][:tokens].contiguous(), base["topk_ids"][:tokens].contiguous())
        row = {name: time_ms(lambda fn=fn, args=args: fn(*args))  # type: ignore[misc]
               for name, fn in (("fused", fused_experts), ("loop", loop_experts), ("dense", dense_experts))}
        report["timings_ms"][f"T={tokens}"] = row  # type: ignore[index]
        print(f"bf16 T={tokens}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in row.items()), flush=True)

    # CUDA graph: capture at T=32, replay, then change the routing in place and replay again.
    tokens = 32
    static = [t[:tokens].clone() for t in (base["x"], base["topk_weights"], base["topk_ids"])]
    x, weights, ids = static
    eager = fused_experts(x, base["gate_up"], base["down"], weights, ids)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fused_experts(x, base["gate_up"], base["down"], weights, ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_experts(x, base["gate_up"], base["down"], weights, ids)
    graph.replay()
    torch.cuda.synchronize()
    same = torch.equal(captured, eager)
    new_ids = torch.randint(0, experts, (tokens, top_k), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    new_ids[:, 1] = (new_ids[:, 0] + 1 + new_ids[:, 1] % (experts - 1)) % experts  # distinct per token
    ids.copy_(new_ids)
    x.copy_(base["x"][100:100 + tokens])
    graph.replay()
    torch.cuda.synchronize()
    eager_new = fused_experts(x, base["gate_up"], base["down"], weights, ids)
    same_new = torch.equal(captured, eager_new)
    ref_new = loop_experts(x, base["gate_up"], base["down"], weights, ids)
    rel_new = ((captured.float() - ref_new.float()).abs().max() / ref_new.float().abs().max()).item()
    graph_time = time_ms(lambda: graph.replay() or captured)  # type: ignore[func-returns-value]
    report["cuda_graph_T32"] = {"replay_equals_eager": same, "replay_after_reroute_equals_eager": same_new,
                                "rel_err_vs_loop_after_reroute": rel_new, "replay_ms": graph_time}
    print(f"cuda graph T=32: replay == eager {same}, after reroute {same_new} (rel err vs loop {rel_new:.2e}), "
          f"replay {graph_time:.3f} ms", flush=True)
    assert same and same_new and rel_new < 2e-2
    print(json.dumps(report))


if __name__ == "__main__":
    if "--interpret" in sys.argv:
        interpret_check()
    else:
        cuda_check()
