"""GPU check: the Triton paged decode attention against SDPA over gathered keys.

    python benchmarks/check_paged_attention.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from worker.torch_engine.mpt import alibi_slopes  # noqa: E402
from worker.torch_engine.paged_attention import paged_decode_attention  # noqa: E402


def reference(q, k_cache, v_cache, tables, lens, block_size, slopes=None):  # type: ignore[no-untyped-def]
    outs = []
    for b in range(q.shape[0]):
        positions = torch.arange(int(lens[b]), device=q.device)
        slots = tables[b, positions // block_size].long() * block_size + positions % block_size
        keys, values = k_cache[slots].transpose(0, 1), v_cache[slots].transpose(0, 1)  # [Hkv, L, D]
        bias = None if slopes is None else slopes[:, None, None] * (positions - (len(positions) - 1)).float()
        outs.append(F.scaled_dot_product_attention(q[b][:, None, :].float(), keys.float(), values.float(),
                                                   attn_mask=bias, enable_gqa=True)[:, 0, :])
    return torch.stack(outs)


def main() -> None:
    torch.manual_seed(0)
    worst = {}
    for dtype in (torch.float32, torch.bfloat16):
        for heads, kv_heads, dim, alibi in ((32, 8, 128, False), (9, 3, 64, False), (8, 8, 64, False),
                                            (32, 32, 128, True), (12, 4, 64, True)):
            block_size, num_blocks = 16, 1024
            lens = torch.tensor([1, 15, 16, 17, 300, 1000, 2047], dtype=torch.int32, device="cuda")
            tables = torch.randperm(num_blocks - 1, device="cuda")[: 7 * 128].view(7, 128).int() + 1
            k_cache = torch.randn(num_blocks * block_size, kv_heads, dim, device="cuda", dtype=dtype)
            v_cache = torch.randn_like(k_cache)
            q = torch.randn(7, heads, dim, device="cuda", dtype=dtype)
            slopes = alibi_slopes(heads, 8.0).cuda() if alibi else None
            got = paged_decode_attention(q, k_cache, v_cache, tables, lens, block_size, slopes).float()
            want = reference(q, k_cache, v_cache, tables, lens, block_size, slopes)
            worst[f"{dtype} {heads}/{kv_heads}x{dim}{' alibi' if alibi else ''}"] = (got - want).abs().max().item()
    print(worst)
    assert all(err < (1e-4 if "float32" in key else 2e-2) for key, err in worst.items()), worst


if __name__ == "__main__":
    main()
