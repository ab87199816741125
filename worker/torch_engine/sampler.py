"""Token sampling on the worker: penalties, min_tokens, greedy, temperature, top-k, top-p, min-p.

Random rows are sampled together: temperature, top-k, top-p and min-p act on all of them at
once, then each row takes the token where its cumulative probability passes one uniform number
drawn from (request seed, position of the token). A sequence's tokens therefore depend neither on
the rest of the batch nor on preemptions, and no generator is made per row or per step. Log-probabilities
are those of the model itself (log-softmax of the raw logits), as clients compare them.

A row that cannot be sampled (non-finite logits, or parameters that leave no distribution) fails
that sequence alone: it is reported in SampleResult.failures and every other row is sampled as usual.

sample() only queues the work: the tokens stay on the device for the next step to read, and
reach the host in one copy that PendingSample.result() waits for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from inflight.sampling import out_of_range
from worker.step import Admission
from worker.torch_engine.transfer import to_device

_MIX = 0x9E3779B97F4A7C15
# Below this temperature sampling is greedy: dividing logits by it would overflow float32.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SequenceSampling:
    """What sampling needs to know about one sequence: its parameters and, for penalties, its tokens."""

    params: Admission
    # Prompt then output, when a penalty needs them: the tokens before position len(history). Tokens
    # sampled by steps whose results are not read yet follow on the device, in order, in in_flight:
    # sample() appends each penalty row's token there, and the engine moves it to history when read.
    history: list[int] = field(default_factory=list)
    in_flight: list[torch.Tensor] = field(default_factory=list)


@dataclass
class RowFailure:
    invalid_argument: bool  # the sequence's parameters are at fault; else the model's output
    message: str


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]
    top_token_ids: list[list[int]]
    top_logprobs: list[list[float]]
    failures: dict[int, RowFailure] = field(default_factory=dict)  # row -> why it has no token


def draw_seed(seed: int, position: int) -> int:
    return (seed * _MIX + position * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


@dataclass
class PendingSample:
    """Tokens sampled on the device, on their way to the host."""

    tokens: torch.Tensor            # [S] int64, on the logits' device
    _host: torch.Tensor             # [S, columns] float64: token, log-probability, usable, top values, top ids
    _ready: torch.cuda.Event | None  # None: _host is complete (CPU)
    _failures: dict[int, RowFailure]
    _random_rows: list[int]
    _top_logprobs: list[int]        # per row

    def wait(self) -> None:
        """Block until the copy to the host is done (any thread)."""
        if self._ready is not None:
            self._ready.synchronize()

    def result(self) -> SampleResult:
        self.wait()
        rows = self._host.tolist()  # ids are exact in float64
        failures = self._failures
        token_ids, logprobs = [int(r[0]) for r in rows], [r[1] for r in rows]
        column = 2
        if self._random_rows:
            for row in self._random_rows:
                if not rows[row][2]:
                    failures[row] = RowFailure(True, "its sampling parameters leave nothing to sample")
            column = 3
        max_top = max(self._top_logprobs, default=0)
        top_ids = [[int(i) for i in r[column + max_top : column + max_top + k]] for r, k in zip(rows, self._top_logprobs)]
        top_values = [r[column : column + k] for r, k in zip(rows, self._top_logprobs)]
        for row, logprob in enumerate(logprobs):
            if not math.isfinite(logprob) and row not in failures:
                failures[row] = RowFailure(False, "the model produced non-finite logits")
        return SampleResult(token_ids, logprobs, top_ids, top_values, failures)


def sample(logits: torch.Tensor, sequences: list[SequenceSampling], positions: list[int]) -> PendingSample:
    """One token per row of logits [S, V] (float32). positions[i]: tokens before the one sampled.

    Rows listed in the result's failures carry no usable token.
    """
    # A row with a NaN or an infinity in its logits is failed once the tokens reach the host: its chosen
    # token's log-probability is then not finite (a NaN or an infinity makes the row's log-normaliser
    # NaN or infinite), so the check costs no extra pass and no synchronisation.
    failures = {row: RowFailure(True, problem) for row, sequence in enumerate(sequences)
                if (problem := _parameter_problem(sequence.params))}
    normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)
    adjusted = logits.clone() if any(_adjusts(s.params) for s in sequences) else logits
    for row, (sequence, position) in enumerate(zip(sequences, positions)):
        if row not in failures:
            _apply_penalties(adjusted[row], sequence, position)
    # max's indices, like argmax's, are each row's first largest column; on CPU max takes a third of
    # argmax's time (16 x 49152 float32 logits: 168 against 520 us on the 2-core VM).
    tokens = adjusted.max(dim=-1).indices
    random_rows = [row for row, sequence in enumerate(sequences)
                   if row not in failures and sequence.params.temperature >= GREEDY_TEMPERATURE
                   and sequence.params.top_k != 1]
    chosen_columns = []
    if random_rows:
        drawn, usable = _sample_rows(adjusted, random_rows, [sequences[r].params for r in random_rows],
                                     [positions[r] for r in random_rows])
        rows = to_device(random_rows, logits.device)
        tokens.index_copy_(0, rows, drawn)
        all_usable = torch.ones(len(sequences), dtype=torch.float64, device=logits.device)
        all_usable.index_copy_(0, rows, usable.to(torch.float64))
        chosen_columns.append(all_usable[:, None])
    chosen = (logits.gather(1, tokens[:, None]) - normaliser).squeeze(1)
    columns = [tokens.to(torch.float64)[:, None], chosen.to(torch.float64)[:, None], *chosen_columns]
    top_logprobs = [s.params.top_logprobs for s in sequences]
    if max(top_logprobs, default=0):
        values, ids = logits.topk(max(top_logprobs), dim=-1)
        columns += [(values - normaliser).to(torch.float64), ids.to(torch.float64)]
    for row, sequence in enumerate(sequences):
        if sequence.params.needs_history:
            sequence.in_flight.append(tokens[row : row + 1])
    packed = torch.cat(columns, dim=1)
    ready = None
    if packed.is_cuda:  # one copy to the host, waited for only when the result is read
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        packed = host
    return PendingSample(tokens, packed, ready, failures, random_rows, top_logprobs)


def _parameter_problem(params: Admission) -> str | None:
    """Why these parameters cannot be sampled with (the gateway and the scheduler refuse them; a direct
    caller of the worker may not)."""
    problem = out_of_range(params)
    return None if problem is None else "{}: {}".format(*problem)


def _adjusts(params: Admission) -> bool:
    return params.needs_history or params.min_tokens > 0


def _apply_penalties(row: torch.Tensor, sequence: SequenceSampling, position: int) -> None:
    params = sequence.params
    if params.min_tokens and position - params.num_prompt_tokens < params.min_tokens and params.stop_token_ids:
        row.index_fill_(0, to_device(params.stop_token_ids, row.device), float("-inf"))
    if not params.needs_history or not sequence.history:
        return
    history = to_device(sequence.history[:position], row.device)
    missing = position - len(sequence.history)  # sampled by steps whose results are not read yet
    if missing > 0:
        assert missing <= len(sequence.in_flight), "a penalty row lost its history"
        history = torch.cat((history, *sequence.in_flight[:missing]))
    # Token counts over the vocabulary rather than unique(): no wait on the device for the result's size.
    if params.repetition_penalty != 1.0:
        seen = _counts(history, row) > 0
        penalised = torch.where(row > 0, row / params.repetition_penalty, row * params.repetition_penalty)
        row.copy_(torch.where(seen, penalised, row))
    output = history[params.num_prompt_tokens :]
    if output.numel() and (params.presence_penalty or params.frequency_penalty):
        counts = _counts(output, row)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)


def _counts(token_ids: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """How often each vocabulary id occurs in token_ids, in row's dtype."""
    ones = torch.ones(token_ids.shape, dtype=row.dtype, device=row.device)
    return torch.zeros_like(row).index_add_(0, token_ids, ones)


def uniform_draw(seed: int, position: int) -> float:
    """A number in [0, 1) that depends only on the request's seed and the token's position."""
    z = draw_seed(seed, position)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF  # splitmix64's finaliser
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return ((z ^ (z >> 31)) >> 11) / 2**53


def _sample_rows(logits: torch.Tensor, rows: list[int], params: list[Admission],
                 positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled tokens of the given rows, and whether each row's parameters left any probability mass."""
    device, vocab = logits.device, logits.shape[-1]

    def column(values: list[float]) -> torch.Tensor:
        return to_device(values, device, torch.float32)[:, None]

    # Non-finite logits must not reach the draw; such a row is failed by sample() anyway.
    scaled = logits.index_select(0, to_device(rows, device)).nan_to_num(nan=-1e30, posinf=1e30, neginf=-1e30) / column([p.temperature for p in params])
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if min(top_k) < vocab:
        kth = torch.topk(scaled, max(top_k), dim=-1).values
        kth = kth.gather(1, to_device(top_k, device)[:, None] - 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    top_p = [p.top_p if 0 < p.top_p < 1 else 2.0 for p in params]  # 2: the mass before a token never reaches it
    if min(top_p) < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        remove = sorted_probs.cumsum(dim=-1) - sorted_probs >= column(top_p)
        probs = probs.scatter(1, order, sorted_probs.masked_fill(remove, 0.0))
    if any(p.min_p > 0 for p in params):
        min_p = column([max(p.min_p, 0.0) for p in params])
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    cumulative = probs.cumsum(dim=-1)
    total = cumulative[:, -1:]
    target = column([uniform_draw(p.seed, position) for p, position in zip(params, positions)]) * total
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cumulative, target, right=True).clamp_(max=vocab - 1)[:, 0]
    return tokens, (total[:, 0] > 0) & total[:, 0].isfinite()
