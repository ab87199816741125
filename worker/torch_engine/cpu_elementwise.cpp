// A decoder layer's elementwise steps in bfloat16 on the CPU, one pass each (see cpu_kernels.py).
//
// Eager PyTorch makes several passes for each (Llama's RMSNorm alone is six ops: upcast, square, mean,
// rsqrt, scale and round, weight) over memory it has just written. Each kernel here rounds to bfloat16
// wherever the eager ops round, so their results differ from eager ones only in the order of a row's sum of
// squares and in the last bit of a float32 exp; almost every element comes out the same.
//
// Rows are split over torch's OpenMP threads (a plain parallel region, as in cpu_attention.cpp). On x86, GCC
// is asked for 512-bit vectors where the CPU has them: these loops are arithmetic-bound, and run 25% faster
// so on the CI machine (the attention kernel, bound by its reductions, runs slower so and keeps 256).

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("prefer-vector-width=512")
#endif

#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace {

using bf16 = at::BFloat16;
using inflight::narrow;
using inflight::widen;

// e^x as 2^k e^r with x = k ln2 + r (ln2 in two parts, so r is exact), e^r by its Taylor series to r^7
// (|r| <= ln2 / 2, error below 1e-8 relative), 2^k from the exponent bits. Written without branches or calls,
// so that loops around it vectorise. Above 88.72 it is infinite, as e^x in float32 is; below -87 it stays at
// e^-87 (1.6e-38), which only ever meets 1 + e^x here.
inline float exp_vectorisable(float x) {
  x = std::min(std::max(x, -87.0f), 89.0f);  // k in [-125, 128]
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = std::fma(-k, 0.693145751953125f, x);
  r = std::fma(-k, 1.428606765330187e-06f, r);
  float p = 1.f / 5040;
  p = std::fma(p, r, 1.f / 720);
  p = std::fma(p, r, 1.f / 120);
  p = std::fma(p, r, 1.f / 24);
  p = std::fma(p, r, 1.f / 6);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.f);
  p = std::fma(p, r, 1.f);
  // 2 e^r 2^(k-1): 2^128 has no float32, but e^x below float32's largest (x < 88.72) may still need k = 128.
  return (2.f * p) * __builtin_bit_cast(float, (static_cast<int32_t>(k) + 126) << 23);
}

void check_rows(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kBFloat16 && t.dim() == 2 && t.stride(1) == 1, what,
              ": a CPU bfloat16 [rows, columns] tensor with contiguous rows");
}

}  // namespace

// residual += x (rounded to bfloat16, in place; skipped without x), then Hugging Face's LlamaRMSNorm of it:
// normalised in float32, rounded, then times the weight and rounded again.
torch::Tensor add_rms_norm(const c10::optional<torch::Tensor>& x, torch::Tensor& residual, const torch::Tensor& weight,
                           double eps) {
  check_rows(residual, "add_rms_norm: residual");
  const int64_t rows = residual.size(0), hidden = residual.size(1);
  if (x) {
    check_rows(*x, "add_rms_norm: x");
    TORCH_CHECK(x->sizes() == residual.sizes(), "add_rms_norm: x and residual differ in shape");
  }
  TORCH_CHECK(weight.scalar_type() == torch::kBFloat16 && weight.dim() == 1 && weight.size(0) == hidden &&
              weight.is_contiguous(), "add_rms_norm: a contiguous bfloat16 weight of the hidden size");
  auto out = torch::empty({rows, hidden}, residual.options());
  const bf16* xp = x ? x->data_ptr<bf16>() : nullptr;
  const int64_t x_row = x ? x->stride(0) : 0, residual_row = residual.stride(0);
  bf16* rp = residual.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const bf16* wp = weight.data_ptr<bf16>();
  const float epsilon = static_cast<float>(eps);
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    bf16* res = rp + r * residual_row;
    if (xp) {
      const bf16* xr = xp + r * x_row;
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) res[i] = narrow<bf16>(widen(res[i]) + widen(xr[i]));
    }
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < hidden; ++i) squares += widen(res[i]) * widen(res[i]);
    const float scale = 1.f / std::sqrt(squares / static_cast<float>(hidden) + epsilon);
    bf16* o = op + r * hidden;
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i) o[i] = narrow<bf16>(widen(wp[i]) * widen(narrow<bf16>(widen(res[i]) * scale)));
  }
  return out;
}

// silu(gate) * up for gate_up = [gate | up] ([rows, 2 * width]): SiLU rounded to bfloat16, then the product.
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_rows(gate_up, "silu_mul: gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_mul: gate_up has an odd width");
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2, in_row = gate_up.stride(0);
  auto out = torch::empty({rows, width}, gate_up.options());
  const bf16* gp = gate_up.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
#pragma omp parallel for num_threads(at::get_num_threads()) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const bf16* gate = gp + r * in_row;
    const bf16* up = gate + width;
    bf16* o = op + r * width;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      const float g = widen(gate[i]);
      o[i] = narrow<bf16>(widen(narrow<bf16>(g / (1.f + exp_vectorisable(-g)))) * widen(up[i]));
    }
  }
  return out;
}
