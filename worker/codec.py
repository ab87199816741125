"""Conversion between the step contract's protobuf messages and the worker's dataclasses."""

from __future__ import annotations

from inflight.v1 import worker_pb2
from worker.step import Admission, EngineDescription, ScheduledChunk, Step, StepOutput

# grpc.StatusCode numbers, without importing grpc into the step contract's codec.
_INVALID_ARGUMENT, _INTERNAL = 3, 13


def step_from_proto(plan: worker_pb2.StepPlan) -> Step:
    return Step(
        step_id=plan.step_id,
        released_slot_ids=list(plan.released_slot_ids),
        admissions=[
            Admission(
                request_id=new.request_id,
                slot_id=new.slot_id,
                temperature=new.sampling.temperature,
                top_p=new.sampling.top_p or 1.0,
                top_k=new.sampling.top_k,
                seed=new.sampling.seed,
                min_p=new.sampling.min_p,
                repetition_penalty=new.sampling.repetition_penalty or 1.0,
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
        chunks=_chunks(plan.sequences),
    )


def _chunks(columns: worker_pb2.ScheduledSequences) -> list[ScheduledChunk]:
    token_ids, block_ids = list(columns.token_ids), list(columns.new_block_ids)
    chunks, token_at, block_at = [], 0, 0
    for slot, computed, num_tokens, num_blocks, sample in zip(columns.slot_ids, columns.num_computed_tokens,
                                                              columns.num_tokens, columns.num_new_blocks,
                                                              columns.sample):
        chunks.append(ScheduledChunk(slot, token_ids[token_at : token_at + num_tokens], computed,
                                     block_ids[block_at : block_at + num_blocks], sample))
        token_at += num_tokens
        block_at += num_blocks
    return chunks


def output_to_proto(output: StepOutput) -> worker_pb2.StepResult:
    any_top = any(s.top_token_ids for s in output.sampled)
    return worker_pb2.StepResult(
        step_id=output.step_id,
        sampled=worker_pb2.SampledTokens(
            slot_ids=[s.slot_id for s in output.sampled], token_ids=[s.token_id for s in output.sampled],
            logprobs=[s.logprob for s in output.sampled],
            num_top_logprobs=[len(s.top_token_ids) for s in output.sampled] if any_top else [],
            top_token_ids=[i for s in output.sampled for i in s.top_token_ids],
            top_logprobs=[v for s in output.sampled for v in s.top_logprobs]),
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
