// What the CPU kernels share (cpu_kernels.py builds them into one module): their entry points, and
// bfloat16 <-> float32 conversions written so that the compiler vectorises the loops around them.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace inflight {

inline float widen(float x) { return x; }

inline float widen(at::BFloat16 x) {  // a bfloat16 is the high half of a float32
  return __builtin_bit_cast(float, static_cast<uint32_t>(x.x) << 16);
}

template <typename T>
T narrow(float x);

template <>
inline float narrow<float>(float x) {
  return x;
}

// To the nearest bfloat16, ties to even, as torch rounds; a NaN stays a NaN.
template <>
inline at::BFloat16 narrow<at::BFloat16>(float x) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return at::BFloat16(static_cast<uint16_t>(x != x ? 0x7FC0u : rounded), at::BFloat16::from_bits());
}

}  // namespace inflight

torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& block_tables, const torch::Tensor& context_lens, int64_t block_size,
                           double scale);
torch::Tensor add_rms_norm(const c10::optional<torch::Tensor>& x, torch::Tensor& residual, const torch::Tensor& weight,
                           double eps);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
