"""The running requests' per-step numbers as numpy columns indexed by slot: what a decode step reads and
writes in bulk, instead of touching each request.

A request that holds a slot keeps its progress (tokens computed, tokens confirmed) here and nowhere else
(Request's properties read it). The other columns mirror fields of the request that the planner changes in
known places, and check_invariants compares them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from inflight.step_contract import PREVIOUS_TOKEN

if TYPE_CHECKING:
    from scheduler.request import Request

NO_STOP = -1  # pads each slot's row of stop ids


class SlotColumns:
    def __init__(self, num_slots: int) -> None:
        def column() -> np.ndarray:
            return np.zeros(num_slots, dtype=np.int64)

        self.num_computed = column()      # tokens whose K/V are in the cache or written by a step in flight
        self.num_confirmed = column()     # tokens whose K/V a returned step wrote
        self.num_tokens = column()        # prompt and outputs, planned ones included
        self.num_prompt_tokens = column()
        self.max_num_tokens = column()    # where it ends
        self.num_blocks = column()        # len(block_ids)
        self.last_token = column()        # its last token: PREVIOUS_TOKEN while that is planned and not back
        self.lease = column()             # bumped at each release: a row planned under an earlier lease is stale
        self.stop_ids = np.full((num_slots, 1), NO_STOP, dtype=np.int64)

    def hold(self, slot: int, request: Request) -> None:
        """The request takes the slot; its progress moves here."""
        self.num_computed[slot] = request.num_computed_tokens
        self.num_confirmed[slot] = request.num_confirmed_tokens
        self.num_tokens[slot] = request.num_tokens
        self.num_prompt_tokens[slot] = request.num_prompt_tokens
        self.max_num_tokens[slot] = request.max_num_tokens
        self.num_blocks[slot] = len(request.block_ids)
        self.last_token[slot] = request.output_token_ids[-1] if request.output_token_ids else request.prompt_token_ids[-1]
        stops = sorted(request.stop_token_ids)
        if len(stops) > self.stop_ids.shape[1]:
            wider = np.full((len(self.stop_ids), len(stops)), NO_STOP, dtype=np.int64)
            wider[:, : self.stop_ids.shape[1]] = self.stop_ids
            self.stop_ids = wider
        self.stop_ids[slot] = NO_STOP
        self.stop_ids[slot, : len(stops)] = stops
        request.slot_id = slot
        request.attach(self)

    def release(self, request: Request) -> int:
        """The request gives its slot back (its progress goes back to it); returns the slot."""
        slot = request.slot_id
        assert slot is not None
        request.detach()
        request.slot_id = None
        self.lease[slot] += 1
        return slot

    def check(self, request: Request) -> None:
        slot = request.slot_id
        outputs = request.output_token_ids
        assert self.num_tokens[slot] == request.num_tokens, "the token count mirror disagrees"
        assert self.num_blocks[slot] == len(request.block_ids), "the block count mirror disagrees"
        assert self.max_num_tokens[slot] == request.max_num_tokens
        last = outputs[-1] if outputs else request.prompt_token_ids[-1]
        assert self.last_token[slot] == last, f"slot {slot}: last token {self.last_token[slot]}, not {last}"
        assert (last == PREVIOUS_TOKEN) == bool(outputs and outputs[-1] == PREVIOUS_TOKEN)
