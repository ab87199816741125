"""One forward per step over the paged cache gives the gathered path's tokens (float32).

The same steps (prompts joining while others decode, a prompt split into chunks, a prefix-cache hit
that leaves one token to compute) run through three engines: attention over gathered blocks (the
CPU path), the paged kernels eagerly, and the paged kernels through StepGraphs' padded buckets
(captured graphs on CUDA; the same padded inputs without capture elsewhere). Runs on CUDA, or on
CPU under Triton's interpreter (TRITON_INTERPRET=1); skipped where neither is available.
"""

from __future__ import annotations

import os

import pytest
import torch

from inflight.step_contract import PREVIOUS_TOKEN
from worker.config import WorkerConfig
from worker.parallel import Collectives, ShardPlan
from tests.steps import make_step
from worker.step import Admission, Step, StepOutput
from worker.torch_engine import engine as engine_module
from worker.torch_engine import paged_attention, triton_support
from worker.torch_engine.cuda_graphs import StepGraphs
from worker.torch_engine.engine import TorchEngine
from worker.torch_engine.block_tables import DeviceBlockTables
from worker.torch_engine.sampler import sample

CUDA = torch.cuda.is_available()
INTERPRETED = paged_attention.triton is not None and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(not (CUDA and paged_attention.triton is not None) and not INTERPRETED,
                                reason="needs CUDA with Triton, or TRITON_INTERPRET=1 with Triton installed")
BLOCK = 16
NEW_TOKENS = 6


def make_engine(model: str, path: str, dtype: str = "float32", pdl: bool = True) -> TorchEngine:
    config = WorkerConfig(model=f"random:{model}", listen="", device="cuda" if CUDA else "cpu", dtype=dtype,
                          block_size=BLOCK, num_kv_blocks=96, kv_cache_gb=0, max_num_batched_tokens=128,
                          max_num_seqs=8, max_model_len=0, seed=3, log_level="warning", cuda_graphs=path == "graphs",
                          pdl=pdl)
    engine = TorchEngine(config, ShardPlan(0, 1), Collectives(1))
    if path == "gathered":
        engine.tables, engine.graphs = None, None
    elif engine.tables is None:  # CPU under the interpreter: the paged path by hand
        width = -(-engine.max_model_len // BLOCK)
        engine.tables = DeviceBlockTables(config.max_num_seqs, width, engine.device)
    engine.warmup()
    if path == "graphs" and engine.graphs is None:  # uncaptured: the padded buckets' inputs, run eagerly
        engine.graphs = StepGraphs(engine.model, engine.kv_cache, engine.tables, engine.last_tokens, 64)
    assert (engine.graphs is not None) == (path == "graphs")
    return engine


def run_scenario(engine: TorchEngine, monkeypatch: pytest.MonkeyPatch, separately: bool = False
                 ) -> tuple[dict[int, list[int]], dict[int, list[torch.Tensor]]]:
    """Greedy tokens per slot, and the logits each was chosen from. separately: each chunk of a step
    runs as a step of its own (the same inputs, one row group at a time)."""
    gen = torch.Generator().manual_seed(0)
    prompt = {s: torch.randint(3, 500, (n,), generator=gen).tolist() for s, n in ((0, 23), (1, 40), (2, 5), (3, 70))}
    prompt[4] = prompt[0][:16] + [7]  # shares slot 0's first block: a prefix hit with one token left to compute
    tables = {0: [1, 2], 1: [3, 4, 5], 2: [6], 3: [7, 8, 9, 10, 11], 4: [1, 12]}
    scripted = [  # (admitted slots, prompt chunks as (slot, tokens, computed, sample)); running slots decode beside
        ([0, 1], [(0, prompt[0], 0, True), (1, prompt[1][:24], 0, False)]),
        ([2], [(1, prompt[1][24:], 24, True), (2, prompt[2], 0, True)]),
        ([3, 4], [(3, prompt[3][:50], 0, False), (4, prompt[4][16:], 16, True)]),
        ([], [(3, prompt[3][50:], 50, True)]),
    ]
    tokens: dict[int, list[int]] = {}
    logits: dict[int, list[torch.Tensor]] = {}
    recorded: list[torch.Tensor] = []  # what the sampler was given, whichever path (a graph replays its own logits)

    def recording_sample(step_logits: torch.Tensor, *args: object) -> object:
        recorded.append(step_logits.clone())
        return sample(step_logits, *args)

    monkeypatch.setattr(engine_module, "sample", recording_sample)
    given = dict.fromkeys(tables, 0)  # blocks already handed to the engine, per slot

    steps = iter(range(1, 10_000))

    def run(admissions: list[int], chunks: list[tuple[int, list[int], int, bool]]) -> None:
        if separately:
            for chunk in chunks:
                run_step([s for s in admissions if s == chunk[0]], [chunk])
        else:
            run_step(admissions, chunks)

    def run_step(admissions: list[int], chunks: list[tuple[int, list[int], int, bool]]) -> None:
        step_id = next(steps)
        scheduled = []
        for slot, chunk_tokens, computed, sampled in chunks:
            need = -(-(computed + len(chunk_tokens)) // BLOCK)
            scheduled.append((slot, chunk_tokens, computed, tables[slot][given[slot] : need], sampled))
            given[slot] = need
        admitted = [Admission(f"r{s}", s, 0.0, 1.0, 0, 0) for s in admissions]
        output = engine.step(make_step(step_id, scheduled, admissions=admitted))
        for row, (slot, token) in enumerate(zip(output.slot_ids, output.token_ids)):  # the logits' rows, in order
            tokens.setdefault(slot, []).append(token)
            logits.setdefault(slot, []).append(recorded[-1][row].cpu())

    def decodes(busy: set[int]) -> list[tuple[int, list[int], int, bool]]:
        return [(s, [t[-1]], len(prompt[s]) + len(t) - 1, True) for s, t in tokens.items()
                if s not in busy and len(t) < NEW_TOKENS]

    for admissions, chunks in scripted:
        run(admissions, chunks + decodes({c[0] for c in chunks}))
    while any(len(t) < NEW_TOKENS for t in tokens.values()):
        run([], decodes(set()))
    return tokens, logits


@pytest.mark.parametrize("model", ["tiny-gqa", "tiny-mpt"])
def test_paged_paths_give_the_gathered_tokens(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    results = {path: run_scenario(make_engine(model, path), monkeypatch) for path in ("gathered", "eager", "graphs")}
    want_tokens, want_logits = results["gathered"]
    assert sorted(want_tokens) == [0, 1, 2, 3, 4] and all(len(t) == NEW_TOKENS for t in want_tokens.values())
    for path in ("eager", "graphs"):
        got_tokens, got_logits = results[path]
        assert got_tokens == want_tokens, path
        worst = max(float((g - w).abs().max()) for s in want_logits for g, w in zip(got_logits[s], want_logits[s]))
        assert worst < 1e-4, (path, worst)


def test_a_mixed_steps_rows_get_what_they_get_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paged path, the same chunks in mixed steps and one chunk per step: the same tokens and logits."""
    mixed_tokens, mixed_logits = run_scenario(make_engine("tiny-gqa", "eager"), monkeypatch)
    alone_tokens, alone_logits = run_scenario(make_engine("tiny-gqa", "eager"), monkeypatch, separately=True)
    assert alone_tokens == mixed_tokens
    worst = max(float((a - m).abs().max()) for s in mixed_logits for a, m in zip(alone_logits[s], mixed_logits[s]))
    assert worst < 1e-4, worst


def test_dependent_launch_is_the_configured_one_and_leaves_every_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """--pdl (the default) and --no-pdl: the launches take PDL only when on (on Hopper and later), and the
    captured graphs give the same tokens and the same logits bit for bit."""
    for name in ("enabled", "max_rows"):  # restored after the test: engines set this process-wide
        monkeypatch.setattr(triton_support.DependentLaunch, name, getattr(triton_support.DependentLaunch, name))
    supported = CUDA and triton_support.gdc_wait is not None and torch.cuda.get_device_capability() >= (9, 0)
    results = {}
    for pdl in (True, False):
        engine = make_engine("tiny-gqa", "graphs", pdl=pdl)
        assert triton_support.pdl_args(engine.device, rows=1)["PDL"] == (pdl and supported)
        results[pdl] = run_scenario(engine, monkeypatch)
    assert results[True][0] == results[False][0]
    for slot, logits in results[True][1].items():
        assert all(torch.equal(a, b) for a, b in zip(logits, results[False][1][slot], strict=True)), slot


@pytest.mark.parametrize("path", ["eager", "graphs"])
def test_decodes_fed_from_the_device_give_the_tokens_of_decodes_fed_from_the_host(path: str) -> None:
    """Overlap scheduling on the paged paths: each decode step is launched with PREVIOUS_TOKEN before the
    step before it is read, and the engine feeds the token from the device (inside the graph, on that path)."""
    engine = make_engine("tiny-gqa", path)
    prompts = {slot: [(7 * slot + 3 * i) % 200 + 1 for i in range(9 + 5 * slot)] for slot in range(3)}

    def blocks(slot: int, start: int, end: int) -> list[int]:
        have, need = -(-start // BLOCK), -(-end // BLOCK)
        return [1 + slot * 8 + b for b in range(have, need)]

    def prefill(step_id: int) -> Step:
        admitted = [Admission(f"r{s}", s, 0.0, 1.0, 0, 0) for s in prompts]
        return make_step(step_id, [(s, p, 0, blocks(s, 0, len(p)), True) for s, p in prompts.items()],
                         released=list(prompts), admissions=admitted)

    def decode(step_id: int, tokens: dict[int, list[int]], fed: bool) -> Step:
        chunks = []
        for s, p in prompts.items():
            position = len(p) + step_id - 2  # the token sampled by step step_id - 1
            token = PREVIOUS_TOKEN if fed else tokens[s][-1]
            chunks.append((s, [token], position, blocks(s, position, position + 1), True))
        return make_step(step_id, chunks)

    def collect(output_tokens: dict[int, list[int]], output: StepOutput) -> None:
        for slot, token in zip(output.slot_ids, output.token_ids):
            output_tokens[slot].append(token)

    host_fed: dict[int, list[int]] = {s: [] for s in prompts}
    collect(host_fed, engine.step(prefill(1)))
    for step_id in range(2, 2 + NEW_TOKENS):
        collect(host_fed, engine.step(decode(step_id, host_fed, fed=False)))
    device_fed: dict[int, list[int]] = {s: [] for s in prompts}
    pending = engine.launch(prefill(1))
    for step_id in range(2, 2 + NEW_TOKENS):
        following = engine.launch(decode(step_id, device_fed, fed=True))
        collect(device_fed, pending.result())
        pending = following
    collect(device_fed, pending.result())
    assert device_fed == host_fed and all(len(t) == NEW_TOKENS + 1 for t in host_fed.values())
