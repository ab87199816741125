"""A yardstick for the engine's decode step: a plain PyTorch Llama over a contiguous static KV cache.

    python benchmarks/reference_decoder.py --model random:llama-3-8b --device cuda --dtype bfloat16 \\
        --batches 1,8,32,64,256 --contexts 128,512,4096
    python benchmarks/reference_decoder.py --check

The decoder is gpt-fast's shape: one contiguous [layers, 2, batch, kv_heads, max_len, head_dim] cache,
each layer's K and V slices held as module buffers beside its weights, and a decode step whose every
tensor shape is fixed (attention runs over the whole cache under a mask built from positions), so
torch.compile(mode="reduce-overhead") captures one CUDA graph that serves every step. It reads its
weights from the engine's WeightSource, so for the same model and seed it is the engine's model;
--check proves that on CPU, token for token (benchmarks/reference_check.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from inflight.model_config import ModelConfig
from worker.torch_engine.engine import load_weights
from worker.torch_engine.rope import RotaryTable
from worker.torch_engine.weights import WeightSource

WARMUP_STEPS = 3  # reduce-overhead: a compile, then a warm-up run and a recording before the replays
CACHE_ALIGN = 64  # max_len is rounded up to this, so the mask's rows stay aligned for fused attention
HEADROOM_BYTES = 2 * 2**30  # beside the cache and a step's activations: CUDA graph pools, allocator slack
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm: normalize in float32, cast back, then scale."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# attend(layer, q, k, v): writes k, v into the layer's cache, returns the attention output [B, heads, T, D]
Attend = Callable[["ReferenceLayer", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ReferenceLayer(torch.nn.Module):
    """One decoder layer's weights and its slice of the KV cache, as buffers: torch.compile treats
    buffers as static inputs, which CUDA graphs neither copy nor refuse to mutate."""

    input_norm: torch.Tensor
    qkv: torch.Tensor      # [(heads + 2 * kv_heads) * head_dim, hidden]
    o: torch.Tensor        # [hidden, heads * head_dim]
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor     # [hidden, intermediate]
    keys: torch.Tensor     # [batch, kv_heads, max_len, head_dim], a view of ReferenceLlama.cache
    values: torch.Tensor

    def __init__(self, get: Callable[[str], torch.Tensor], prefix: str) -> None:
        super().__init__()
        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        tensors = {
            "input_norm": get(prefix + "input_layernorm.weight"),
            "qkv": torch.cat([get(attn + f"{p}_proj.weight") for p in "qkv"]),
            "o": get(attn + "o_proj.weight"),
            "post_norm": get(prefix + "post_attention_layernorm.weight"),
            "gate_up": torch.cat([get(mlp + "gate_proj.weight"), get(mlp + "up_proj.weight")]),
            "down": get(mlp + "down_proj.weight"),
        }
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor, persistent=False)
        self.register_buffer("keys", torch.empty(0), persistent=False)  # set by ReferenceLlama.allocate_cache
        self.register_buffer("values", torch.empty(0), persistent=False)


class ReferenceLlama(torch.nn.Module):
    """A Llama decoder (GQA, rotary positions, SiLU-gated MLP) with a contiguous static KV cache.

    Row b of the cache holds sequence b; `decode` writes each sequence's token at its own position.
    """

    embed: torch.Tensor
    norm: torch.Tensor
    head: torch.Tensor
    cos: torch.Tensor         # [max_positions, head_dim]
    signed_sin: torch.Tensor  # RotaryTable's sin, the rotation's sign folded in
    cache: torch.Tensor          # [layers, 2, batch, kv_heads, max_len, head_dim], a plain attribute
    key_positions: torch.Tensor  # [max_len]: 0, 1, ..., max_len - 1
    rows: torch.Tensor           # [batch]: 0, 1, ..., batch - 1

    def __init__(self, config: ModelConfig, weights: WeightSource, device: torch.device, dtype: torch.dtype,
                 batch: int, max_len: int) -> None:
        super().__init__()
        if config.architecture not in ("LlamaForCausalLM", "MistralForCausalLM") or config.num_experts:
            raise ValueError(f"the reference decoder is a dense Llama; {config.name} is {config.architecture}")
        self.config = config
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                    config.head_dim)

        def get(name: str) -> torch.Tensor:
            return weights.get(name).to(device=device, dtype=dtype)

        self.layers = torch.nn.ModuleList(ReferenceLayer(get, f"model.layers.{i}.")
                                          for i in range(config.num_hidden_layers))
        embed = get("model.embed_tokens.weight")
        untied = not config.tie_word_embeddings and weights.has("lm_head.weight")
        rope = RotaryTable(self.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings,
                           device, dtype)
        for name, tensor in {"embed": embed, "norm": get("model.norm.weight"),
                             "head": get("lm_head.weight") if untied else embed,
                             "cos": rope.cos, "signed_sin": rope.signed_sin}.items():
            self.register_buffer(name, tensor, persistent=False)
        self.allocate_cache(batch, max_len)

    def _layers(self) -> list[ReferenceLayer]:
        return cast(list[ReferenceLayer], self.layers)

    def allocate_cache(self, batch: int, max_len: int) -> None:
        """A zeroed cache for `batch` sequences of up to max_len tokens (the old one freed first)."""
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"max_len {max_len} > the model's {self.config.max_position_embeddings} positions")
        device, dtype = self.embed.device, self.embed.dtype
        self.cache = torch.empty(0, device=device, dtype=dtype)
        for layer in self._layers():
            layer.keys = layer.values = self.cache
        shape = (len(self.layers), 2, batch, self.kv_heads, max_len, self.head_dim)
        self.cache = torch.zeros(shape, device=device, dtype=dtype)
        # Compiled code writes each layer's own buffers in place; a write through a view of one
        # cache-wide buffer would make torch.compile copy the whole cache on every step.
        for layer, (keys, values) in zip(self._layers(), self.cache):
            layer.keys, layer.values = keys, values
        self.register_buffer("key_positions", torch.arange(max_len, device=device), persistent=False)
        self.register_buffer("rows", torch.arange(batch, device=device), persistent=False)

    def prefill(self, token_ids: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        """Logits [B, vocab] of the last token of each prompt [B, L], written to cache rows first_row.."""
        length = token_ids.shape[1]
        rows = slice(first_row, first_row + token_ids.shape[0])
        positions = self.key_positions[:length].expand(token_ids.shape[0], length)

        def attend(layer: ReferenceLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            layer.keys[rows, :, :length] = k
            layer.values[rows, :, :length] = v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads)

        return self._forward(token_ids, positions, attend)

    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of one token per sequence ([B] ids at [B] positions, rows 0..B-1).

        Attention reads the whole cache row, masked to keys at or before each position: no shape
        depends on a position, so one compiled graph serves every step. Positions must be < max_len.
        """
        batch = token_ids.shape[0]
        rows = self.rows[:batch]
        allowed = self.key_positions[None, :] <= positions[:, None]
        mask = torch.zeros(allowed.shape, dtype=self.embed.dtype, device=allowed.device)
        mask = mask.masked_fill(~allowed, float("-inf"))[:, None, None, :]  # [B, 1, 1, max_len]

        def attend(layer: ReferenceLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            layer.keys[rows, :, positions] = k[:, :, 0]
            layer.values[rows, :, positions] = v[:, :, 0]
            # The query heads sharing a KV head become that head's query rows: each key is read once.
            grouped = q.reshape(batch, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
            out = F.scaled_dot_product_attention(grouped, layer.keys[:batch], layer.values[:batch], attn_mask=mask)
            return out.reshape(batch, self.heads, 1, self.head_dim)

        return self._forward(token_ids[:, None], positions[:, None], attend)

    def _forward(self, token_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """Logits of the last of T tokens per sequence ([B, T] ids and positions)."""
        batch, tokens = token_ids.shape
        cos, sin = self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)  # [B, 1, T, D]
        eps = self.config.rms_norm_eps
        x = F.embedding(token_ids, self.embed)
        for layer in self._layers():
            qkv = F.linear(rms_norm(x, layer.input_norm, eps), layer.qkv)
            qkv = qkv.view(batch, tokens, -1, self.head_dim).transpose(1, 2)  # [B, heads, T, D]
            qk = RotaryTable.apply(qkv[:, : self.heads + self.kv_heads], cos, sin)
            q, k, v = qk[:, : self.heads], qk[:, self.heads :], qkv[:, self.heads + self.kv_heads :]
            out = attend(layer, q, k, v).transpose(1, 2).reshape(batch, tokens, -1)
            x = x + F.linear(out, layer.o)
            gate, up = F.linear(rms_norm(x, layer.post_norm, eps), layer.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down)
        return F.linear(rms_norm(x[:, -1], self.norm, eps), self.head).float()


def load_reference(model: str, seed: int, device: torch.device, dtype: torch.dtype, batch: int,
                   max_len: int) -> ReferenceLlama:
    """The reference for a model the engine loads (random:<shape> or a folder), with the engine's weights."""
    config, weights = load_weights(model, device, dtype, seed)
    return ReferenceLlama(config, weights, device, dtype, batch, max_len)


def time_decode(model: ReferenceLlama, batch: int, context: int, steps: int, sync: Callable[[], None],
                compile_mode: str | None = "reduce-overhead", fullgraph: bool = True) -> float:
    """Median ms of a decode step of `batch` sequences at positions context, context + 1, ...

    The cache is taken as holding `context` tokens per sequence (a step's speed does not depend on
    the cached values). Each step feeds back the previous step's greedy tokens, on the device; the
    first WARMUP_STEPS (compile, CUDA graph recording) are not timed. compile_mode None: eager.
    """
    if batch > model.cache.shape[2] or context + WARMUP_STEPS + steps > model.cache.shape[4]:
        raise ValueError(f"batch {batch}, context {context} + {WARMUP_STEPS + steps} steps exceed the cache")
    torch._dynamo.reset()  # a new cache shape: compile afresh rather than pile up recompilations
    step = model.decode if compile_mode is None else torch.compile(model.decode, mode=compile_mode,
                                                                    fullgraph=fullgraph)
    device = model.embed.device
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(model.config.vocab_size, (batch,), generator=generator).to(device)
    positions = [torch.full((batch,), context + i, device=device) for i in range(WARMUP_STEPS + steps)]
    times = []
    with torch.inference_mode():
        for i, position in enumerate(positions):
            if compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are no longer read
            sync()
            began = time.perf_counter()
            tokens = step(tokens, position).argmax(dim=-1)
            sync()
            times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times[WARMUP_STEPS:])


def cache_bytes(config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of the contiguous KV cache."""
    element = torch.empty(0, dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * batch * config.num_key_value_heads * max_len * config.head_dim * element


def step_bytes(config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype) -> int:
    """A generous bound on a decode step's activations: logits, MLP, mask and float32 attention scores."""
    element = torch.empty(0, dtype=dtype).element_size()
    per_sequence = (config.vocab_size * (element + 4 + 8) + 3 * config.intermediate_size * element
                    + max_len * (element + 4 * config.num_attention_heads))
    return 2 * batch * per_sequence


def free_bytes(device: torch.device) -> int:
    """Memory free on the device (for CPU: available RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return int(psutil.virtual_memory().available)


def _release_cache(model: ReferenceLlama) -> None:
    """Shrink the cache and drop compiled graphs (their memory pools too) before sizing the next one."""
    model.allocate_cache(1, CACHE_ALIGN)
    torch._dynamo.reset()
    if model.embed.device.type == "cuda":
        torch.cuda.empty_cache()


def benchmark(args: argparse.Namespace) -> None:
    """One JSON line per (batch, context): ms per decode step, or why the combination was skipped."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    began = time.perf_counter()
    model = load_reference(args.model, args.seed, device, dtype, 1, CACHE_ALIGN)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(json.dumps({"model": args.model, "torch": torch.__version__, "gpu": gpu,
                      "load_seconds": round(time.perf_counter() - began, 1)}), file=sys.stderr)
    compile_mode = None if args.compile == "none" else args.compile
    common = {"model": args.model, "device": args.device, "dtype": args.dtype, "compile": args.compile}
    for context in (int(c) for c in args.contexts.split(",")):
        max_len = -(-(context + WARMUP_STEPS + args.steps) // CACHE_ALIGN) * CACHE_ALIGN
        for batch in (int(b) for b in args.batches.split(",")):
            line = {**common, "batch": batch, "context": context, "max_len": max_len}
            _release_cache(model)
            cache = cache_bytes(model.config, batch, max_len, dtype)
            step = step_bytes(model.config, batch, max_len, dtype)
            available = free_bytes(device)
            if cache + step + HEADROOM_BYTES > available:
                line["skipped"] = (f"needs ~{(cache + step + HEADROOM_BYTES) / 2**30:.1f} GiB (KV cache "
                                   f"{cache / 2**30:.1f} + step {step / 2**30:.1f} + headroom "
                                   f"{HEADROOM_BYTES / 2**30:.0f}), {available / 2**30:.1f} GiB free")
                print(json.dumps(line), flush=True)
                continue
            model.allocate_cache(batch, max_len)
            began = time.perf_counter()
            ms = time_decode(model, batch, context, args.steps, sync, compile_mode, args.fullgraph)
            line.update(ms_per_step=round(ms, 3), tokens_per_s=round(batch * 1000 / ms, 1),
                        cache_gib=round(cache / 2**30, 2), seconds=round(time.perf_counter() - began, 1))
            print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:llama-3-8b", help="random:<shape> or a model folder")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--seed", type=int, default=0, help="of random weights: the engine's --seed")
    parser.add_argument("--batches", default="1,8,32,64,256")
    parser.add_argument("--contexts", default="128,512,4096")
    parser.add_argument("--steps", type=int, default=50, help="timed decode steps per (batch, context)")
    parser.add_argument("--compile", default="reduce-overhead", choices=["reduce-overhead", "default", "none"])
    parser.add_argument("--fullgraph", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--check", action="store_true",
                        help="instead: greedy tokens and logits against the engine's, tiny models, CPU float32")
    args = parser.parse_args()
    if args.check:
        # Imported here: the check needs the engine (and mpi4py), the benchmark does not.
        from benchmarks.reference_check import run_check

        sys.exit(0 if run_check() else 1)
    benchmark(args)


if __name__ == "__main__":
    main()
