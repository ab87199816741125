"""Proof that the reference decoder computes the engine's model: greedy tokens and logits, CPU, float32.

    python benchmarks/reference_decoder.py --check

The engine runs as benchmarks/tp_decode.py drives it (one prompt joins per step while the others
decode, so its steps mix prefill and decode over the paged cache); the reference prefills each
prompt into its own cache row and then decodes all rows together, each at its own position.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from benchmarks.reference_decoder import ReferenceLlama, load_reference
from benchmarks.tp_decode import Driver
from worker.config import WorkerConfig
from worker.parallel import Collectives, ShardPlan
from worker.step import Admission
from worker.torch_engine.engine import TorchEngine
from worker.torch_engine.random_models import save_random_model

PROMPT_LENGTHS = (5, 16, 23, 40)  # on and off the engine's 16-token block boundaries
NEW_TOKENS = 8
TOLERANCE = 1e-4  # float32 logits; the two compute in different orders (fused q/k/v, paged gathers)
# Llama 3.1's rope scaling, its original context shrunk so that it changes most of a tiny model's frequencies.
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
CPU = torch.device("cpu")


@dataclass
class Greedy:
    tokens: list[list[int]]     # per prompt, its generated tokens
    logits: list[torch.Tensor]  # per prompt, [new tokens, vocab] float32: what each token was chosen from


@dataclass
class CheckResult:
    model: str
    reference_tokens: list[list[int]]
    engine_tokens: list[list[int]]
    max_abs_logit_diff: float

    @property
    def passed(self) -> bool:
        return self.reference_tokens == self.engine_tokens and self.max_abs_logit_diff <= TOLERANCE


def check_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def engine_greedy(model: str, prompts: list[list[int]], new_tokens: int, seed: int = 0) -> Greedy:
    """The torch engine's greedy tokens, with the logits its sampler saw (recorded at LlamaModel.logits)."""
    config = WorkerConfig(model=model, listen="", device="cpu", dtype="float32", block_size=16, num_kv_blocks=64,
                          kv_cache_gb=0, max_num_batched_tokens=512, max_num_seqs=len(prompts), max_model_len=0,
                          seed=seed, log_level="warning", cuda_graphs=False)
    engine = TorchEngine(config, ShardPlan(0, 1), Collectives(1))
    driver = Driver(engine)
    tokens: list[list[int]] = [[] for _ in prompts]
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    step_logits: list[torch.Tensor] = []
    compute_logits = engine.model.logits

    def recorded(hidden: torch.Tensor) -> torch.Tensor:
        step_logits.append(compute_logits(hidden))
        return step_logits[-1]

    with mock.patch.object(engine.model, "logits", side_effect=recorded):
        admitted = 0
        while any(len(out) < new_tokens for out in tokens):
            admissions, inputs = [], {}
            if admitted < len(prompts):
                admissions.append(Admission(f"p{admitted}", admitted, 0.0, 1.0, 0, 0))
                inputs[admitted] = prompts[admitted]
                admitted += 1
            inputs.update({slot: [out[-1]] for slot, out in enumerate(tokens) if 0 < len(out) < new_tokens})
            sampled = driver.run(admissions, inputs)
            assert len(sampled) == step_logits[-1].shape[0]  # rows come in the order of the sampled slots
            for row, (slot, token) in enumerate(sampled.items()):
                tokens[slot].append(token)
                rows[slot].append(step_logits[-1][row])
    engine.shutdown()
    return Greedy(tokens, [torch.stack(r) for r in rows])


@torch.inference_mode()
def reference_greedy(reference: ReferenceLlama, prompts: list[list[int]], new_tokens: int) -> Greedy:
    """Greedy tokens of the eager reference: prompt b prefilled into cache row b, then batched decodes."""
    logits = [[reference.prefill(torch.tensor([prompt]), first_row=row)[0]] for row, prompt in enumerate(prompts)]
    positions = torch.tensor([len(prompt) for prompt in prompts])
    for _ in range(new_tokens - 1):
        step = reference.decode(torch.stack([rows[-1].argmax() for rows in logits]), positions)
        positions = positions + 1
        for rows, row_logits in zip(logits, step):
            rows.append(row_logits)
    stacked = [torch.stack(rows) for rows in logits]
    return Greedy([rows.argmax(dim=-1).tolist() for rows in stacked], stacked)


def max_abs_diff(a: Greedy, b: Greedy) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.logits, b.logits))


def compare(model: str, seed: int = 0) -> CheckResult:
    """Greedy decoding of check_prompts by the reference and by the engine, on the same weights."""
    reference = load_reference(model, seed, CPU, torch.float32, len(PROMPT_LENGTHS), max(PROMPT_LENGTHS) + NEW_TOKENS)
    prompts = check_prompts(reference.config.vocab_size, seed)
    ours = reference_greedy(reference, prompts, NEW_TOKENS)
    engine = engine_greedy(model, prompts, NEW_TOKENS, seed)
    return CheckResult(model, ours.tokens, engine.tokens, max_abs_diff(ours, engine))


def save_scaled_tied_model(folder: Path, seed: int = 0) -> str:
    """A tiny Llama folder with Llama 3 rope scaling, rope_theta 500000 and a tied head; returns its path."""
    save_random_model("tiny-gqa", folder, seed, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING,
                      tie_word_embeddings=True)
    return str(folder)


def run_check() -> bool:
    """Prints one JSON line per model; whether every one passed."""
    with tempfile.TemporaryDirectory() as folder:
        results = {"random:tiny-gqa": compare("random:tiny-gqa"),
                   "tiny-gqa, llama3 rope scaling, tied head": compare(save_scaled_tied_model(Path(folder)))}
    for label, result in results.items():
        print(json.dumps({"model": label, "passed": result.passed, "tokens_equal":
                          result.reference_tokens == result.engine_tokens,
                          "max_abs_logit_diff": result.max_abs_logit_diff, "tokens": result.reference_tokens}))
    return all(result.passed for result in results.values())
