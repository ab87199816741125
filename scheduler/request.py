"""A request as the scheduler sees it: token ids, progress through the KV cache, its blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from inflight.v1 import common_pb2

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from scheduler.slot_columns import SlotColumns


RequestKey = tuple[str, str]  # (tenant, request id): request ids are scoped by tenant


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_new_tokens: int
    sampling: common_pb2.SamplingParams
    stop_token_ids: frozenset[int]
    arrival_order: int
    priority: int = 0
    tenant: str = ""
    cache_salt: str = ""               # with the tenant, the prefix-cache namespace
    output_token_ids: list[int] = field(default_factory=list)  # PREVIOUS_TOKEN at the end: planned, in flight
    status: RequestStatus = RequestStatus.WAITING
    # Progress while it holds no slot (a slot's SlotColumns keep it otherwise; the properties below read either).
    _num_computed_tokens: int = 0      # tokens whose K/V are in the cache, or written by a step in flight
    _num_confirmed_tokens: int = 0     # tokens whose K/V a returned step wrote (what the prefix cache may index)
    _columns: SlotColumns | None = None
    block_ids: list[int] = field(default_factory=list)
    num_blocks_on_worker: int = 0      # prefix of block_ids the worker's block table already holds
    block_hashes: list[int] = field(default_factory=list)  # chained prefix-cache keys of full blocks
    num_indexed_blocks: int = 0        # prefix of block_ids registered in the prefix cache
    fair_tag: float = 0.0              # virtual finish time under weighted fair sharing
    arrived_at: float = 0.0            # time.monotonic() at arrival
    first_scheduled_at: float = 0.0
    logprobs: bool = False             # return each token's log-probability
    slot_id: int | None = None
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    num_cached_prompt_tokens: int = 0
    num_preemptions: int = 0
    span: Span | None = None           # its Submit call's span, while traced and unfinished (scheduler/tracing.py)
    max_num_tokens: int = 0            # prompt and outputs at which it ends (max_new_tokens, or the context length)
    num_prompt_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.prompt_token_ids)

    @property
    def num_computed_tokens(self) -> int:
        columns = self._columns
        return self._num_computed_tokens if columns is None else int(columns.num_computed[self.slot_id])

    @num_computed_tokens.setter
    def num_computed_tokens(self, value: int) -> None:
        if self._columns is None:
            self._num_computed_tokens = value
        else:
            self._columns.num_computed[self.slot_id] = value

    @property
    def num_confirmed_tokens(self) -> int:
        columns = self._columns
        return self._num_confirmed_tokens if columns is None else int(columns.num_confirmed[self.slot_id])

    @num_confirmed_tokens.setter
    def num_confirmed_tokens(self, value: int) -> None:
        if self._columns is None:
            self._num_confirmed_tokens = value
        else:
            self._columns.num_confirmed[self.slot_id] = value

    def attach(self, columns: SlotColumns) -> None:
        """Its progress now lives in columns, at its slot (SlotColumns.hold has copied it there)."""
        self._columns = columns

    def detach(self) -> None:
        """Its progress comes back from its slot's columns."""
        columns, slot = self._columns, self.slot_id
        if columns is not None:
            self._num_computed_tokens = int(columns.num_computed[slot])
            self._num_confirmed_tokens = int(columns.num_confirmed[slot])
        self._columns = None

    @property
    def key(self) -> RequestKey:
        return (self.tenant, self.request_id)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids in [start, end) of prompt followed by output."""
        prompt_len = self.num_prompt_tokens
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len : end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - prompt_len]

    def new_block_ids(self) -> list[int]:
        """Blocks the worker has not been told about yet; marks them as told."""
        new = self.block_ids[self.num_blocks_on_worker :]
        self.num_blocks_on_worker = len(self.block_ids)
        return new
