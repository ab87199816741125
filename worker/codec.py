"""Conversion between the step contract's protobuf messages and the worker's dataclasses."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain

import numpy as np

from inflight.v1 import worker_pb2
from worker.step import Admission, EngineDescription, Step, StepOutput

# grpc.StatusCode numbers, without importing grpc into the step contract's codec.
_INVALID_ARGUMENT, _INTERNAL = 3, 13


def step_from_proto(plan: worker_pb2.StepPlan) -> Step:
    columns = plan.sequences
    return Step(
        step_id=plan.step_id,
        released_slot_ids=list(plan.released_slot_ids),
        admissions=[
            Admission(
                request_id=new.request_id,
                slot_id=new.slot_id,
                temperature=new.sampling.temperature,
                top_p=new.sampling.top_p,
                top_k=new.sampling.top_k,
                seed=new.sampling.seed,
                min_p=new.sampling.min_p,
                repetition_penalty=new.sampling.repetition_penalty,
                presence_penalty=new.sampling.presence_penalty,
                frequency_penalty=new.sampling.frequency_penalty,
                min_tokens=new.sampling.min_tokens,
                top_logprobs=new.sampling.top_logprobs,
                num_prompt_tokens=new.num_prompt_tokens,
                stop_token_ids=list(new.stop_token_ids),
                context_token_ids=list(new.context_token_ids),
            )
            for new in plan.new_sequences
        ],
        slot_ids=_ints(columns.slot_ids),
        num_computed_tokens=_ints(columns.num_computed_tokens),
        num_tokens=_ints(columns.num_tokens),
        token_ids=_ints(columns.token_ids),
        num_new_blocks=_ints(columns.num_new_blocks),
        new_block_ids=_ints(columns.new_block_ids),
        sample=np.array(columns.sample, dtype=bool),
    )


def _ints(column: Iterable[int]) -> np.ndarray:
    """A uint32 column as int64 (PREVIOUS_TOKEN, 2**32 - 1, fits); one copy, no Python int per entry."""
    return np.array(column, dtype=np.int64)


def output_to_proto(output: StepOutput) -> worker_pb2.StepResult:
    any_top = any(output.top_token_ids)
    return worker_pb2.StepResult(
        step_id=output.step_id,
        sampled=worker_pb2.SampledTokens(
            slot_ids=output.slot_ids, token_ids=output.token_ids, logprobs=output.logprobs,
            num_top_logprobs=[len(ids) for ids in output.top_token_ids] if any_top else [],
            top_token_ids=list(chain.from_iterable(output.top_token_ids)),
            top_logprobs=list(chain.from_iterable(output.top_logprobs))),
        forward_seconds=output.forward_seconds,
        sequence_errors=[worker_pb2.SequenceError(slot_id=f.slot_id, message=f.message,
                                                  code=_INVALID_ARGUMENT if f.invalid_argument else _INTERNAL)
                         for f in output.failures],
    )


def description_to_proto(d: EngineDescription) -> worker_pb2.WorkerDescription:
    return worker_pb2.WorkerDescription(
        model_name=d.model_name, vocab_size=d.vocab_size, eos_token_ids=list(d.eos_token_ids),
        tp_size=d.tp_size, block_size=d.block_size, num_kv_blocks=d.num_kv_blocks,
        max_num_batched_tokens=d.max_num_batched_tokens, max_num_seqs=d.max_num_seqs,
        max_model_len=d.max_model_len, device=d.device, dtype=d.dtype, engine=d.engine,
        prefix_caching=d.prefix_caching,
    )
