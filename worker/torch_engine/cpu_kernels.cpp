// The CPU kernels as one Python module (cpu_kernels.py builds it).

#include "cpu_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache (float32 or bfloat16)");
  m.def("add_rms_norm", &add_rms_norm, "residual += x, then Llama's RMSNorm of it (bfloat16)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a [rows, 2 * width] gate-up projection (bfloat16)");
}
