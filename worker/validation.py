"""The invariants a worker checks before it touches anything for a step.

Each check runs over all of a step's sequences at once (numpy over the step's columns), so a step's
cost does not grow with a Python loop per sequence; a failed check names the first sequence it finds.
"""

from __future__ import annotations

import numpy as np

from inflight.step_contract import PREVIOUS_TOKEN
from worker.slot_tables import NOT_ADMITTED, SlotTables
from worker.step import EngineDescription, Step, StepRejected


def check_step(step: Step, limits: EngineDescription, slot_tables: SlotTables) -> None:
    """Raise StepRejected if step breaks the contract, given the slots as the accepted steps left them."""
    _check_columns(step)
    held = slot_tables.num_blocks.copy()  # blocks per slot once the step's releases and admissions are applied
    fed = slot_tables.sampled.copy()      # slots whose PREVIOUS_TOKEN the device holds
    released = np.array(step.released_slot_ids, dtype=np.int64)
    # Idempotent: after a rejected plan the scheduler releases slots this worker never admitted.
    released = released[(released >= 0) & (released < slot_tables.num_slots)]
    held[released], fed[released] = NOT_ADMITTED, False
    for admission in step.admissions:
        _check_slot(admission.slot_id, limits)
        if held[admission.slot_id] != NOT_ADMITTED:
            raise StepRejected(f"slot {admission.slot_id} is admitted twice")
        held[admission.slot_id] = 0
    if step.total_tokens > limits.max_num_batched_tokens:
        raise StepRejected(f"{step.total_tokens} tokens exceed the step maximum {limits.max_num_batched_tokens}")
    _check_slots(step, held)
    _check_tokens(step, limits, fed)
    _check_blocks(step, limits, held)


def _check_columns(step: Step) -> None:
    """Every per-sequence column has one entry per sequence, and the runs add up to their arrays."""
    columns = (step.num_computed_tokens, step.num_tokens, step.num_new_blocks, step.sample)
    if any(len(column) != step.num_sequences for column in columns):
        raise StepRejected("the step's sequence columns have different lengths")
    if int(step.num_tokens.sum()) != step.total_tokens or int(step.num_new_blocks.sum()) != len(step.new_block_ids):
        raise StepRejected("the step's token or block runs do not add up to its token_ids or new_block_ids")
    if (step.num_computed_tokens < 0).any() or (step.num_new_blocks < 0).any():
        raise StepRejected("the step has a negative token or block count")


def _check_slot(slot: int, limits: EngineDescription) -> None:
    if not 0 <= slot < limits.max_num_seqs:
        raise StepRejected(f"slot {slot} is outside [0, {limits.max_num_seqs})")


def _check_slots(step: Step, held: np.ndarray) -> None:
    """Each sequence's slot is admitted, once, and runs at least one token."""
    ordered = np.sort(step.slot_ids)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(repeated):
        raise StepRejected(f"slot {repeated[0]} is scheduled twice in one step")
    in_range = (step.slot_ids >= 0) & (step.slot_ids < len(held))
    admitted = in_range & (held[np.where(in_range, step.slot_ids, 0)] != NOT_ADMITTED)
    _reject_first(~admitted, step.slot_ids, "slot {} is not admitted")
    _reject_first(step.num_tokens < 1, step.slot_ids, "slot {} has no tokens to process")


def _check_tokens(step: Step, limits: EngineDescription, fed: np.ndarray) -> None:
    """Token ids are in the vocabulary, but for PREVIOUS_TOKEN as the one token of a slot the last step sampled."""
    firsts = step.token_ids[step.token_starts[:-1]]  # every run has a token (checked before)
    previous = (step.num_tokens == 1) & (firsts == PREVIOUS_TOKEN)
    _reject_first(previous & ~fed[step.slot_ids], step.slot_ids,
                  "slot {} asks for its previous token, but the step before did not sample it")
    outside = (step.token_ids < 0) | (step.token_ids >= limits.vocab_size)
    if outside.any():
        in_rows = np.logical_or.reduceat(outside, step.token_starts[:-1]) & ~previous
        _reject_first(in_rows, step.slot_ids, "slot {} has a token id outside the vocabulary")


def _check_blocks(step: Step, limits: EngineDescription, held: np.ndarray) -> None:
    """New block ids are real blocks, and each table holds every position its sequence reaches, but no more
    blocks than max_model_len needs (an engine's table has a row of that width per slot)."""
    outside = (step.new_block_ids < 1) | (step.new_block_ids >= limits.num_kv_blocks)
    if outside.any():
        row = int(np.searchsorted(step.block_starts, np.argmax(outside), side="right")) - 1
        raise StepRejected(f"slot {step.slot_ids[row]} has a block id outside [1, {limits.num_kv_blocks})")
    ends = step.num_computed_tokens + step.num_tokens
    over = ends > limits.max_model_len
    if over.any():
        row = np.argmax(over)
        raise StepRejected(f"slot {step.slot_ids[row]} reaches {ends[row]} tokens, "
                           f"over max_model_len {limits.max_model_len}")
    blocks = held[step.slot_ids] + step.num_new_blocks
    short = blocks * limits.block_size < ends
    if short.any():
        row = np.argmax(short)
        raise StepRejected(f"slot {step.slot_ids[row]}: {blocks[row]} blocks cannot hold {ends[row]} tokens")
    most = -(-limits.max_model_len // limits.block_size)
    _reject_first(blocks > most, step.slot_ids, f"slot {{}} would hold more than the {most} blocks of max_model_len")


def _reject_first(faulty: np.ndarray, slot_ids: np.ndarray, message: str) -> None:
    """StepRejected naming the slot of the first faulty sequence, if there is one."""
    if faulty.any():
        raise StepRejected(message.format(slot_ids[np.argmax(faulty)]))
