"""The PyTorch reference engine: Llama-family models over a paged KV cache, CPU or CUDA."""
