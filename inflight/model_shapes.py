"""Named real model shapes (config fields only): `random:<name>` serves one with random weights."""

from __future__ import annotations

SHAPES: dict[str, dict[str, object]] = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, eos_token_ids=(128001,)),
    "llama-3-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=True, eos_token_ids=(128001,)),
    # 80 layers of 8192 wide, 64 heads over 8 KV heads (one per rank at TP=8): 70.6 G parameters, 141 GB in bf16.
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                        rope_theta=500000.0, eos_token_ids=(128001,)),
    # The same width, 8 layers: float32 token checks across TP sizes that the whole model would not fit.
    "llama-3-70b-8-layers": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=8,
                                 num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                                 rope_theta=500000.0, eos_token_ids=(128001,)),
    # Small shapes for tensor-parallel tests on CPU: 8 heads, 2 KV heads (replicated at tp=4).
    "tiny-gqa": dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                     eos_token_ids=(1,)),
    "mixtral-8x7b": dict(architecture="MixtralForCausalLM", vocab_size=32000, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1000000.0,
                         num_experts=8, num_experts_per_tok=2, eos_token_ids=(2,)),
    "mpt-7b": dict(architecture="MptForCausalLM", vocab_size=50432, hidden_size=4096, intermediate_size=16384,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                   max_position_embeddings=2048, tie_word_embeddings=True, eos_token_ids=(0,)),
    # Tiny shapes of the other families, for CPU tests of the random-weight path.
    "tiny-mixtral": dict(architecture="MixtralForCausalLM", vocab_size=512, hidden_size=128, intermediate_size=192,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=1024, num_experts=4, num_experts_per_tok=2, eos_token_ids=(1,)),
    "tiny-mpt": dict(architecture="MptForCausalLM", vocab_size=512, hidden_size=128, intermediate_size=512,
                     num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                     tie_word_embeddings=True, eos_token_ids=(1,)),
}
