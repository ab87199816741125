"""Fixed-layout encoding of the commands rank 0 broadcasts to the other ranks.

A command is a header of int64s [kind, payload length] and an int64 payload: no pickles
on the per-step path. A step's sequence columns travel as they are, one after another, and a
follower reads them back as views of the payload it received: a decode step costs a few words
per sequence and no Python work per sequence at either end.
"""

from __future__ import annotations

import enum

import numpy as np

from worker.step import Admission, Step

HEADER_WORDS = 2
# step_id, released, admissions, words of admissions, sequences, tokens, new blocks
_STEP_HEADER_WORDS = 7


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
    admissions = _encode_admissions(step.admissions)
    head = [step.step_id, len(step.released_slot_ids), len(step.admissions), len(admissions), step.num_sequences,
            len(step.token_ids), len(step.new_block_ids), *step.released_slot_ids, *admissions]
    return np.concatenate((np.array(head, dtype=np.int64), step.slot_ids, step.num_computed_tokens, step.num_tokens,
                           step.num_new_blocks, step.sample, step.token_ids, step.new_block_ids), dtype=np.int64)


def _encode_admissions(admissions: list[Admission]) -> list[int]:
    words: list[int] = []
    for a in admissions:
        words += [a.slot_id, a.top_k, int(np.uint64(a.seed).view(np.int64)), a.min_tokens, a.top_logprobs,
                  a.num_prompt_tokens, len(a.stop_token_ids), len(a.context_token_ids)]
        words += [_float_bits(x) for x in (a.temperature, a.top_p, a.min_p, a.repetition_penalty,
                                            a.presence_penalty, a.frequency_penalty)]
        words += a.stop_token_ids
        words += a.context_token_ids
    return words


def decode_step(payload: np.ndarray) -> Step:
    """The step encode_step wrote; its arrays are views of payload, which the caller must not reuse."""
    step_id, num_released, num_admissions, admission_words, num_seqs, num_tokens, num_blocks = \
        payload[:_STEP_HEADER_WORDS].tolist()
    at = _STEP_HEADER_WORDS
    released = payload[at : at + num_released].tolist()
    at += num_released
    admissions = _decode_admissions(payload[at : at + admission_words].tolist(), num_admissions)
    at += admission_words
    slot_ids, computed, tokens_per_seq, blocks_per_seq, sample = payload[at : at + 5 * num_seqs].reshape(5, num_seqs)
    at += 5 * num_seqs
    return Step(step_id, released, admissions, slot_ids=slot_ids, num_computed_tokens=computed,
                num_tokens=tokens_per_seq, token_ids=payload[at : at + num_tokens],
                num_new_blocks=blocks_per_seq, new_block_ids=payload[at + num_tokens : at + num_tokens + num_blocks],
                sample=sample.astype(bool))


def _decode_admissions(words: list[int], count: int) -> list[Admission]:
    admissions, at = [], 0
    for _ in range(count):
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
    return admissions
