"""Fixed-layout encoding of the commands rank 0 broadcasts to the other ranks.

A command is a header of int64s [kind, payload length] and an int64 payload: no pickles
on the per-step path, and a decode step costs a few words per sequence.
"""

from __future__ import annotations

import enum

import numpy as np

from worker.step import Admission, ScheduledChunk, Step

HEADER_WORDS = 2


class Command(enum.IntEnum):
    STEP = 1
    WARMUP = 2
    RELEASE_ALL = 3
    SHUTDOWN = 4


def _float_bits(value: float) -> int:
    return int(np.array(value, dtype=np.float64).view(np.int64))


def _bits_float(word: int) -> float:
    return float(np.array(word, dtype=np.int64).view(np.float64))


def encode_step(step: Step) -> np.ndarray:
    words: list[int] = [step.step_id, len(step.released_slot_ids), len(step.admissions), len(step.chunks)]
    words += step.released_slot_ids
    for a in step.admissions:
        words += [a.slot_id, a.top_k, int(np.uint64(a.seed).view(np.int64)), a.min_tokens, a.top_logprobs,
                  a.num_prompt_tokens, len(a.stop_token_ids), len(a.context_token_ids)]
        words += [_float_bits(x) for x in (a.temperature, a.top_p, a.min_p, a.repetition_penalty,
                                            a.presence_penalty, a.frequency_penalty)]
        words += a.stop_token_ids
        words += a.context_token_ids
    for c in step.chunks:
        words += [c.slot_id, c.num_computed_tokens, len(c.token_ids), len(c.new_block_ids), int(c.sample)]
    for c in step.chunks:
        words += c.token_ids
        words += c.new_block_ids
    return np.array(words, dtype=np.int64)


def decode_step(payload: np.ndarray) -> Step:
    words: list[int] = payload.tolist()  # one conversion; Python list slices are cheap
    step_id, num_released, num_admissions, num_chunks = words[:4]
    at = 4
    released = words[at : at + num_released]
    at += num_released
    admissions = []
    for _ in range(num_admissions):
        slot, top_k, seed, min_tokens, top_logprobs, num_prompt, num_stop, num_context = words[at : at + 8]
        floats = [_bits_float(w) for w in words[at + 8 : at + 14]]
        at += 14
        stop_ids = words[at : at + num_stop]
        context = words[at + num_stop : at + num_stop + num_context]
        at += num_stop + num_context
        temperature, top_p, min_p, repetition, presence, frequency = floats
        admissions.append(Admission("", slot, temperature, top_p, top_k, int(np.int64(seed).view(np.uint64)),
                                    min_p, repetition, presence, frequency, min_tokens, top_logprobs, num_prompt,
                                    stop_ids, context))
    heads = words[at : at + 5 * num_chunks]
    at += 5 * num_chunks
    chunks = []
    for i in range(0, 5 * num_chunks, 5):
        slot, computed, num_tokens, num_blocks, sample = heads[i : i + 5]
        chunks.append(ScheduledChunk(slot, words[at : at + num_tokens], computed,
                                     words[at + num_tokens : at + num_tokens + num_blocks], bool(sample)))
        at += num_tokens + num_blocks
    return Step(step_id, released, admissions, chunks)
