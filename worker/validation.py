"""The invariants a worker checks before it touches anything for a step."""

from __future__ import annotations

from inflight.step_contract import PREVIOUS_TOKEN
from worker.slot_tables import SlotTables
from worker.step import EngineDescription, Step, StepRejected


def check_step(step: Step, limits: EngineDescription, slot_tables: SlotTables) -> None:
    """Raise StepRejected if step breaks the contract, given the slots as the accepted steps left them."""
    live = {slot: len(table) for slot, table in slot_tables.tables.items()}
    fed = slot_tables.sampled - set(step.released_slot_ids)  # slots whose PREVIOUS_TOKEN the device holds
    for slot in step.released_slot_ids:
        # Idempotent: after a rejected plan the scheduler releases slots this worker never admitted.
        live.pop(slot, None)
    for admission in step.admissions:
        _check_slot(admission.slot_id, limits)
        if admission.slot_id in live:
            raise StepRejected(f"slot {admission.slot_id} is admitted twice")
        live[admission.slot_id] = 0
    if step.num_tokens > limits.max_num_batched_tokens:
        raise StepRejected(f"{step.num_tokens} tokens exceed the step maximum {limits.max_num_batched_tokens}")
    seen: set[int] = set()
    for chunk in step.chunks:
        _check_chunk(chunk, limits, live, seen, fed)


def _check_slot(slot: int, limits: EngineDescription) -> None:
    if not 0 <= slot < limits.max_num_seqs:
        raise StepRejected(f"slot {slot} is outside [0, {limits.max_num_seqs})")


def _check_chunk(chunk, limits: EngineDescription, live: dict[int, int], seen: set[int],  # type: ignore[no-untyped-def]
                 fed: set[int]) -> None:
    slot = chunk.slot_id
    if slot in seen:
        raise StepRejected(f"slot {slot} is scheduled twice in one step")
    seen.add(slot)
    if slot not in live:
        raise StepRejected(f"slot {slot} is not admitted")
    if not chunk.token_ids:
        raise StepRejected(f"slot {slot} has no tokens to process")
    if chunk.token_ids == [PREVIOUS_TOKEN]:
        if slot not in fed:
            raise StepRejected(f"slot {slot} asks for its previous token, but the step before did not sample it")
    elif any(not 0 <= t < limits.vocab_size for t in chunk.token_ids):
        raise StepRejected(f"slot {slot} has a token id outside the vocabulary")
    if any(not 1 <= b < limits.num_kv_blocks for b in chunk.new_block_ids):
        raise StepRejected(f"slot {slot} has a block id outside [1, {limits.num_kv_blocks})")
    end = chunk.num_computed_tokens + len(chunk.token_ids)
    if end > limits.max_model_len:
        raise StepRejected(f"slot {slot} reaches {end} tokens, over max_model_len {limits.max_model_len}")
    blocks = live[slot] + len(chunk.new_block_ids)
    if blocks * limits.block_size < end:
        raise StepRejected(f"slot {slot}: {blocks} blocks cannot hold {end} tokens")
    live[slot] = blocks
