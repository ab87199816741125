"""The reference engine: owns the weights, the paged KV cache and each slot's block table."""

from __future__ import annotations

import time
from collections.abc import Container
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from inflight.model_config import ModelConfig
from inflight.step_contract import PREVIOUS_TOKEN
from worker.config import WorkerConfig
from worker.parallel import Collectives, ShardPlan
from worker.step import Admission, EngineDescription, PendingStep, SequenceFailure, Step, StepOutput
from worker.torch_engine import cpu_kernels, paged_attention
from worker.torch_engine.batch import BatchInput, build_batch
from worker.torch_engine.block_tables import DeviceBlockTables, HostBlockTables
from worker.torch_engine.cuda_graphs import StepGraphs
from worker.torch_engine.model import LlamaModel
from worker.torch_engine.mpt import MptModel
from worker.torch_engine.paged_step import StepLayout, eager_attention, lay_out, resolve_previous
from worker.torch_engine.random_models import random_model
from worker.torch_engine.sampler import PendingSample, SequenceSampling, sample
from worker.torch_engine.transfer import to_device
from worker.torch_engine.triton_support import set_dependent_launch
from worker.torch_engine.weights import SafetensorsWeights, WeightSource

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NULL_BLOCK = 0
GRAPH_TOKENS = 2048  # steps of up to this many tokens (or max_num_seqs, if more) replay a CUDA graph
_T = TypeVar("_T")


def resolve_dtype(config: WorkerConfig) -> torch.dtype:
    """The model's dtype: config.dtype, with auto as float32 on CPU and bfloat16 on GPUs."""
    if config.dtype == "auto":
        return torch.float32 if config.device == "cpu" else torch.bfloat16
    return _DTYPES[config.dtype]


def load_weights(model: str, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[ModelConfig, WeightSource]:
    if model.startswith("random:"):
        return random_model(model.removeprefix("random:"), seed, device, dtype)
    folder = Path(model)
    return ModelConfig.load(folder), SafetensorsWeights(folder)


class TorchEngine:
    """One rank's engine; every rank runs the same steps on its shard."""

    name = "torch"

    def __init__(self, config: WorkerConfig, shard: ShardPlan, collectives: Collectives) -> None:
        self.config = config
        self.device = torch.device(config.device, torch.cuda.current_device()) if config.device == "cuda" else torch.device("cpu")
        self.dtype = resolve_dtype(config)
        set_dependent_launch(config.pdl, config.pdl_max_rows)  # before any kernel is compiled or captured
        if self.device.type == "cuda":
            # cuDNN's SDPA builds a new graph for every new context length: ~2 ms of CPU per layer call.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.model_config, weights = load_weights(config.model, self.device, self.dtype, config.seed)
        model_class = MptModel if self.model_config.architecture == "MptForCausalLM" else LlamaModel
        self.model = model_class(self.model_config, weights, shard, collectives, self.device, self.dtype,
                                 config.block_size)
        del weights
        self.tp_size = shard.tp_size
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        self.num_kv_blocks = config.num_kv_blocks or self._blocks_that_fit()
        self.kv_cache = self._allocate_cache(self.num_kv_blocks)
        self.sampling: dict[int, SequenceSampling] = {}
        self.keeps_history = np.zeros(config.max_num_seqs, dtype=bool)  # slots whose penalties read their tokens
        max_blocks = -(-self.max_model_len // config.block_size)
        self.host_tables = HostBlockTables(config.max_num_seqs, max_blocks)
        # The token each slot sampled last, on the device: a step's PREVIOUS_TOKEN is read from here.
        self.last_tokens = torch.zeros(config.max_num_seqs, dtype=torch.int64, device=self.device)
        # On CUDA, attention reads the paged cache (one forward per step); on CPU it gathers the blocks.
        self.tables: DeviceBlockTables | None = None
        self.graphs: StepGraphs | None = None
        if paged_attention.available(self.device) and self.model.uniform_gqa:
            self.tables = DeviceBlockTables(config.max_num_seqs, max_blocks, self.device)
            if config.cuda_graphs and self.model.graph_safe:
                max_tokens = min(config.max_num_batched_tokens, max(GRAPH_TOKENS, config.max_num_seqs))
                self.graphs = StepGraphs(self.model, self.kv_cache, self.tables, self.last_tokens, max_tokens)
        if config.batch_invariant:
            self._make_batch_invariant()

    def _make_batch_invariant(self) -> None:
        """Every projection through invariant_matmul; attention is already per row (the paged kernels)."""
        if self.tables is None:
            raise ValueError("--batch-invariant needs CUDA with Triton and a model the paged kernels serve")
        if self.model_config.num_experts:
            raise ValueError("--batch-invariant covers dense models; this one routes tokens to experts")
        for projection in self.model.projections():
            projection.batch_invariant = True

    def _block_bytes(self) -> int:
        c = self.model_config
        return (c.num_hidden_layers * 2 * self.config.block_size * self.model.num_kv_heads
                * c.head_dim * torch.tensor([], dtype=self.dtype).element_size())

    def _blocks_that_fit(self) -> int:
        if self.config.kv_cache_gb:
            budget = self.config.kv_cache_gb * 2**30
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * 0.85 - 2 * 2**30
        else:
            budget = 2**30
        return max(2, int(budget // self._block_bytes()))

    def _allocate_cache(self, num_blocks: int) -> torch.Tensor:
        c = self.model_config
        shape = (c.num_hidden_layers, 2, num_blocks * self.config.block_size, self.model.num_kv_heads, c.head_dim)
        return torch.zeros(shape, device=self.device, dtype=self.dtype)

    def describe(self) -> EngineDescription:
        return EngineDescription(
            model_name=self.model_config.name,
            vocab_size=self.model_config.vocab_size,
            eos_token_ids=self.model_config.eos_token_ids,
            tp_size=self.tp_size,
            block_size=self.config.block_size,
            num_kv_blocks=self.num_kv_blocks,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            max_num_seqs=self.config.max_num_seqs,
            max_model_len=self.max_model_len,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            engine=self.name,
            prefix_caching=True,
        )

    @torch.inference_mode()
    def warmup(self) -> int:
        """Run the largest step once (into the null block) so later steps cannot run out of memory."""
        num_tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        step = Step(0, slot_ids=np.zeros(1, dtype=np.int64), num_computed_tokens=np.zeros(1, dtype=np.int64),
                    num_tokens=np.array([num_tokens]), token_ids=np.zeros(num_tokens, dtype=np.int64),
                    num_new_blocks=np.zeros(1, dtype=np.int64), sample=np.ones(1, dtype=bool))
        null_table = np.full((1, -(-num_tokens // self.config.block_size)), _NULL_BLOCK, dtype=np.int64)
        if self.tables is not None:
            self._forward_paged(lay_out(step, null_table, self.config.block_size))
        else:
            batch = build_batch(step, null_table, self.config.block_size, self.device, self.dtype)
            self.model.logits(self.model.forward(batch, self.kv_cache)[batch.sample_index])
        if self.graphs is not None:
            self.graphs.capture()
        if self.device.type == "cpu":
            cpu_kernels.available()  # loaded now, not in the first decode step (and logged if not built)
        self.kv_cache.zero_()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.num_kv_blocks

    def release(self, slot_ids: list[int]) -> None:
        for slot in slot_ids:
            self.sampling.pop(slot, None)

    def step(self, step: Step) -> StepOutput:
        """Launch a step and wait for its output (for callers that run one step at a time)."""
        return self.launch(step).result()

    @torch.inference_mode()
    def launch(self, step: Step) -> PendingStep:
        start = time.perf_counter()
        self.release(step.released_slot_ids)
        for admission in step.admissions:
            self._admit(admission)
        if not step.num_sequences:
            return PendingStep.done(StepOutput(step.step_id))
        written = self.host_tables.append(step)
        if self.tables is not None:
            self.tables.write(*written)
        self._extend_histories(step)
        logits, positions, sampled_slots = self._forward(step)
        if logits is None:
            return PendingStep.done(StepOutput(step.step_id, forward_seconds=time.perf_counter() - start))
        sequences = [self.sampling[slot] for slot in sampled_slots]
        history_rows = np.flatnonzero(self.keeps_history[sampled_slots]).tolist()
        pending = sample(logits, sequences, positions)
        self.last_tokens.index_copy_(0, to_device(sampled_slots, self.device), pending.tokens)
        return PendingStep(lambda: self._output(step.step_id, start, pending, sampled_slots, sequences, history_rows,
                                                positions), pending.wait)

    def _admit(self, admission: Admission) -> None:
        history = list(admission.context_token_ids) if admission.needs_history else []
        self.sampling[admission.slot_id] = SequenceSampling(admission, history)
        self.keeps_history[admission.slot_id] = admission.needs_history
        self.host_tables.clear(admission.slot_id)

    def _extend_histories(self, step: Step) -> None:
        """Each penalty sequence's history grows by the step's known tokens it does not hold yet."""
        for row in np.flatnonzero(self.keeps_history[step.slot_ids]).tolist():
            tokens = step.tokens_of(row)
            if len(tokens) == 1 and tokens[0] == PREVIOUS_TOKEN:  # on the device; the history gets it when read
                continue
            history, computed = self.sampling[int(step.slot_ids[row])].history, int(step.num_computed_tokens[row])
            if len(history) >= computed and computed + len(tokens) > len(history):
                history.extend(tokens[len(history) - computed :].tolist())

    @staticmethod
    def _output(step_id: int, start: float, pending: PendingSample, sampled_slots: list[int],
                sequences: list[SequenceSampling], history_rows: list[int], positions: list[int]) -> StepOutput:
        result = pending.result()
        failed = result.failures
        for row in history_rows:  # the token leaves in_flight for the history, now that it is known
            sequence = sequences[row]
            sequence.in_flight.pop(0)
            if row not in failed and len(sequence.history) == positions[row]:
                sequence.history.append(result.token_ids[row])
        failures = [SequenceFailure(sampled_slots[row], f.invalid_argument, f.message) for row, f in failed.items()]
        return StepOutput(step_id, _without(failed, sampled_slots), _without(failed, result.token_ids),
                          _without(failed, result.logprobs), _without(failed, result.top_token_ids),
                          _without(failed, result.top_logprobs), time.perf_counter() - start, failures)

    def _forward(self, step: Step) -> tuple[torch.Tensor | None, list[int], list[int]]:
        """Logits, sample positions and slots of the sampled sequences (rows matched by slot, not step order)."""
        if self.tables is None:
            return self._forward_eager(step)
        layout = lay_out(step, self.host_tables.tables, self.config.block_size)
        if self.graphs is not None and layout.num_tokens <= self.graphs.max_tokens:
            logits = self.graphs.run(layout)
        else:
            logits = self._forward_paged(layout)
        if not layout.sampled_slots:
            return None, [], []
        return logits, layout.sample_positions, layout.sampled_slots

    def _forward_paged(self, layout: StepLayout) -> torch.Tensor:
        assert self.tables is not None
        device = self.device
        batch = BatchInput(token_ids=resolve_previous(to_device(layout.token_ids, device), self.last_tokens),
                           positions=to_device(layout.positions, device),
                           slot_mapping=to_device(layout.slot_mapping, device),
                           sample_index=to_device(layout.sample_rows, device), sample_positions=layout.sample_positions,
                           paged=eager_attention(layout, self.tables))
        return self.model.logits(self.model.forward(batch, self.kv_cache)[batch.sample_index])

    def _forward_eager(self, step: Step) -> tuple[torch.Tensor | None, list[int], list[int]]:
        """Attention over blocks gathered from the cache (CPU, or CUDA without Triton)."""
        batch = build_batch(step, self.host_tables.tables, self.config.block_size, self.device, self.dtype)
        batch.token_ids = resolve_previous(batch.token_ids, self.last_tokens)
        hidden = self.model.forward(batch, self.kv_cache)
        if not batch.sample_positions:
            return None, [], []
        sampled_slots = step.slot_ids[step.sample].tolist()
        return self.model.logits(hidden[batch.sample_index]), batch.sample_positions, sampled_slots

    def shutdown(self) -> None:
        self.sampling.clear()


def _without(rows: Container[int], column: list[_T]) -> list[_T]:
    """column without the entries of these rows (a failed sequence has no entry in a step's output)."""
    return [value for row, value in enumerate(column) if row not in rows] if rows else column
