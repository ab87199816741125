"""The step layout for paged attention: every token, cache slot and sampled row accounted for."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from inflight.step_contract import PREVIOUS_TOKEN
from tests.steps import Row, make_step
from worker.torch_engine.paged_step import lay_out

BLOCK = 4
NUM_SLOTS = 16


def table_rows(tables: dict[int, list[int]]) -> np.ndarray:
    """Each slot's block table as a row of one array, the way the engine keeps them."""
    rows = np.zeros((NUM_SLOTS, max(len(t) for t in tables.values())), dtype=np.int64)
    for slot, table in tables.items():
        rows[slot, : len(table)] = table
    return rows


@st.composite
def steps(draw: st.DrawFn) -> tuple[list[Row], dict[int, list[int]]]:
    slots = draw(st.lists(st.integers(0, NUM_SLOTS - 1), min_size=1, max_size=8, unique=True))
    chunks, tables, next_block = [], {}, 1
    for slot in slots:
        computed = draw(st.integers(0, 20))
        length = draw(st.integers(1, 9))
        blocks = -(-(computed + length) // BLOCK)
        tables[slot] = list(range(next_block, next_block + blocks))
        next_block += blocks
        tokens = draw(st.lists(st.integers(0, 99), min_size=length, max_size=length))
        chunks.append(Row(slot, tokens, computed, [], draw(st.booleans())))
    return chunks, tables


@settings(max_examples=200, deadline=None)
@given(steps())
def test_layout_puts_chunks_first_and_keeps_every_token(step: tuple[list[Row], dict[int, list[int]]]) -> None:
    chunks, tables = step
    layout = lay_out(make_step(1, chunks), table_rows(tables), BLOCK)
    prompts = [c for c in chunks if len(c.token_ids) > 1]
    singles = [c for c in chunks if len(c.token_ids) == 1]
    assert layout.num_tokens == sum(len(c.token_ids) for c in chunks)
    # Prompt chunks, in step order, own rows [0, Tp); single-token rows follow, one each.
    starts = layout.prefill_query_start
    assert starts[0] == 0 and len(starts) == len(prompts) + 1
    for i, chunk in enumerate(prompts):
        rows = slice(starts[i], starts[i + 1])
        assert layout.token_ids[rows].tolist() == chunk.token_ids
        assert layout.positions[rows].tolist() == list(range(chunk.num_computed_tokens,
                                                             chunk.num_computed_tokens + len(chunk.token_ids)))
        assert layout.prefill_slots[i] == chunk.slot_id
        assert layout.prefill_lens[i] == chunk.num_computed_tokens + len(chunk.token_ids)
    assert layout.decode_rows.tolist() == list(range(starts[-1], layout.num_tokens))
    for row, slot, length, chunk in zip(layout.decode_rows, layout.decode_slots, layout.decode_lens, singles):
        assert layout.token_ids[row] == chunk.token_ids[0] and slot == chunk.slot_id
        assert length == chunk.num_computed_tokens + 1
    # Each token's K/V goes to its own position's slot in its sequence's blocks.
    owners = [c for i, c in enumerate(prompts) for _ in range(starts[i], starts[i + 1])] + singles
    for row, owner in enumerate(owners):
        position = layout.positions[row]
        assert layout.slot_mapping[row] == tables[owner.slot_id][position // BLOCK] * BLOCK + position % BLOCK
    assert len(set(layout.slot_mapping.tolist())) == layout.num_tokens
    # Sampled rows are the last token of each sampled chunk, predicting the position after it.
    sampled = [c for c in prompts + singles if c.sample]
    assert layout.sampled_slots == [c.slot_id for c in sampled]
    for row, position, chunk in zip(layout.sample_rows, layout.sample_positions, sampled):
        assert layout.token_ids[row] == chunk.token_ids[-1]
        assert position == chunk.num_computed_tokens + len(chunk.token_ids)


def test_max_query_len_is_the_longest_chunk() -> None:
    chunks = [(0, [1, 2, 3], 0, [], True), (1, [4], 7, [], True), (2, [5, 6, 7, 8, 9], 2, [], False)]
    layout = lay_out(make_step(1, chunks), table_rows({0: [1], 1: [2, 3], 2: [4, 5]}), BLOCK)
    assert layout.max_query_len == 5
    assert np.array_equal(layout.prefill_query_start, [0, 3, 8])
    assert layout.decode_rows.tolist() == [8]


def test_a_previous_token_row_is_fed_from_its_slots_last_sample() -> None:
    layout = lay_out(make_step(1, [(2, [1, 2], 0, [], False), (5, [PREVIOUS_TOKEN], 4, [], True)]),
                     table_rows({2: [1], 5: [2, 3]}), BLOCK)
    assert layout.token_ids.tolist() == [1, 2, -1 - 5]  # resolve_previous reads slot 5's last token there
