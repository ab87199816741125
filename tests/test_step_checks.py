"""Rank 0's checks of a step against the contract (worker/validation.py), over the step's columns, with the
slot tables that accepted steps left: what passes, what is rejected and why, and that a rejected step
changes nothing."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from inflight.step_contract import PREVIOUS_TOKEN
from tests.steps import make_step
from worker.slot_tables import SlotTables
from worker.step import Admission, EngineDescription, Step, StepRejected
from worker.validation import check_step

LIMITS = EngineDescription(model_name="test", vocab_size=100, eos_token_ids=(2,), tp_size=1, block_size=4,
                           num_kv_blocks=64, max_num_batched_tokens=40, max_num_seqs=8, max_model_len=32,
                           device="cpu", dtype="float32", engine="test")


def admit(*slots: int) -> list[Admission]:
    return [Admission(f"r{slot}", slot, 0.0, 1.0, 0, 0) for slot in slots]


@pytest.fixture
def tables() -> SlotTables:
    """Slot 0 prefilled and sampled (blocks 1, 2); slot 1 halfway through its prompt, not sampled (block 3)."""
    tables = SlotTables(LIMITS.max_num_seqs)
    first = make_step(1, [(0, [1, 2, 3, 4, 5], 0, [1, 2], True), (1, [6, 7, 8], 0, [3], False)],
                      admissions=admit(0, 1))
    check_step(first, LIMITS, tables)
    tables.apply(first)
    return tables


def test_a_step_that_keeps_the_contract_is_accepted_and_recorded(tables: SlotTables) -> None:
    step = make_step(2, [(0, [PREVIOUS_TOKEN], 5, [], True), (1, [9, 10], 3, [4], True), (2, [11], 0, [5], True)],
                     admissions=admit(2))
    check_step(step, LIMITS, tables)
    tables.apply(step)
    assert tables.tables == {0: [1, 2], 1: [3, 4], 2: [5]}
    assert tables.num_blocks.tolist()[:4] == [2, 2, 1, -1]
    assert np.flatnonzero(tables.sampled).tolist() == [0, 1, 2]


def test_a_decode_of_every_slot_fed_from_the_device_is_accepted() -> None:
    tables = SlotTables(LIMITS.max_num_seqs)
    slots = range(LIMITS.max_num_seqs)
    prefill = make_step(1, [(s, [s + 1], 0, [s + 1], True) for s in slots], admissions=admit(*slots))
    check_step(prefill, LIMITS, tables)
    tables.apply(prefill)
    check_step(make_step(2, [(s, [PREVIOUS_TOKEN], 1, [], True) for s in slots]), LIMITS, tables)


BAD_STEPS = {
    "a slot never admitted": (make_step(2, [(5, [1], 0, [4], True)]), "slot 5 is not admitted"),
    "a slot outside the slots": (make_step(2, [(8, [1], 0, [4], True)], admissions=admit(8)), "slot 8 is outside"),
    "an admitted slot admitted again": (make_step(2, admissions=admit(0)), "slot 0 is admitted twice"),
    "a slot scheduled twice": (make_step(2, [(0, [1], 5, [], True), (0, [2], 6, [], True)]),
                               "slot 0 is scheduled twice"),
    "a sequence with no tokens": (make_step(2, [(0, [], 5, [], True)]), "slot 0 has no tokens"),
    "a token outside the vocabulary, in the second sequence": (
        make_step(2, [(0, [7], 5, [], True), (1, [8, 100], 3, [4], True)]),
        "slot 1 has a token id outside the vocabulary"),
    "a previous token in a run of several": (make_step(2, [(0, [PREVIOUS_TOKEN, 7], 5, [3], True)]), "vocabulary"),
    "a previous token the step before did not sample": (
        make_step(2, [(1, [PREVIOUS_TOKEN], 3, [], True)]), "slot 1 asks for its previous token"),
    "a previous token of a slot released and admitted again": (
        make_step(2, [(0, [PREVIOUS_TOKEN], 0, [5], True)], released=[0], admissions=admit(0)),
        "slot 0 asks for its previous token"),
    "more tokens than a step may carry": (make_step(2, [(1, [5] * 41, 3, [4] * 11, True)]), "exceed"),
    "a null block": (make_step(2, [(1, [5, 6], 3, [0], True)]), "slot 1 has a block id outside"),
    "a block outside the cache": (make_step(2, [(1, [5, 6], 3, [64], True)]), "block id"),
    "past max_model_len": (make_step(2, [(0, [5], 32, [9], True)]), "over max_model_len"),
    "too few blocks for the tokens": (make_step(2, [(0, [5, 6, 7, 8], 5, [], True)]), "2 blocks cannot hold 9 tokens"),
    "more blocks than max_model_len needs": (
        make_step(2, [(0, [5], 5, [3, 4, 5, 6, 7, 8, 9], True)]), "more than the 8 blocks of max_model_len"),
    "columns of different lengths": (
        Step(2, slot_ids=np.array([0, 1]), num_computed_tokens=np.array([5]), num_tokens=np.array([1, 1]),
             token_ids=np.array([5, 6]), num_new_blocks=np.array([0, 0]), sample=np.array([True, True])),
        "different lengths"),
    "token runs that do not add up": (
        Step(2, slot_ids=np.array([0]), num_computed_tokens=np.array([5]), num_tokens=np.array([2]),
             token_ids=np.array([5]), num_new_blocks=np.array([0]), sample=np.array([True])), "do not add up"),
}


@pytest.mark.parametrize("name", list(BAD_STEPS))
def test_a_step_that_breaks_the_contract_is_rejected_and_changes_nothing(tables: SlotTables, name: str) -> None:
    step, message = BAD_STEPS[name]
    before = copy.deepcopy(tables)
    with pytest.raises(StepRejected, match=message):
        check_step(step, LIMITS, tables)
    assert tables.tables == before.tables
    assert np.array_equal(tables.num_blocks, before.num_blocks) and np.array_equal(tables.sampled, before.sampled)


def test_releasing_a_slot_never_admitted_is_accepted(tables: SlotTables) -> None:
    step = make_step(2, released=[5, 1000])
    check_step(step, LIMITS, tables)
    tables.apply(step)
    assert tables.slots() == [0, 1]
