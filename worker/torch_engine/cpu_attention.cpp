// Decode attention on the CPU, read straight from the paged KV cache (see cpu_kernels.py).
//
// One query token per sequence. Each sequence is one task: its keys are read block by block through its
// block table, every KV head of a slot at once (one contiguous row of the cache), then its values the same
// way; the next block's row is prefetched while this one is used. Scores and the softmax are float32, the
// softmax in two passes (max, then exp and sum), as an exact softmax computes them. bfloat16 queries and
// caches are widened to float32 as they are read (a shift of their 16 bits); only the output is rounded back.
//
// The tasks share torch's OpenMP threads: the parallel region names torch's thread count, and the symbols
// resolve to the libgomp that libtorch_cpu loaded. (ATen's at::parallel_for, inlined into an extension,
// slowed torch's own kernels that ran after it several times over on the CI machine.)

#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using inflight::narrow;
using inflight::widen;

void prefetch_row(const void* row, int64_t bytes) {
  const char* start = static_cast<const char*>(row);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(start + offset);
}

// Where a sequence's keys lie and how the tensors are laid out (strides in elements).
struct Layout {
  int64_t batch, heads, dim, kv_heads, block_size;
  int64_t q_seq, q_head, k_slot, v_slot, table_row;
  float scale;
};

template <typename T, int64_t DIM>
void decode_rows(const T* qp, const T* kp, const T* vp, const int64_t* tables, const int64_t* lens, T* op,
                 const Layout& layout) {
  const int64_t heads = layout.heads, dim = DIM ? DIM : layout.dim, block_size = layout.block_size;
  const int64_t kv_heads = layout.kv_heads, group = heads / kv_heads;
  const int64_t row_bytes = kv_heads * dim * static_cast<int64_t>(sizeof(T));
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> query(heads * dim), scores, acc(heads * dim), sums(heads), widened(4 * dim);
    std::vector<int64_t> slots;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < layout.batch; ++b) {
      const int64_t n = lens[b];
      const int64_t* table = tables + b * layout.table_row;
      slots.resize(n);
      for (int64_t t = 0; t < n; ++t) slots[t] = table[t / block_size] * block_size + t % block_size;
      for (int64_t j = 0; j < heads; ++j) {
        const T* qr = qp + b * layout.q_seq + j * layout.q_head;
        for (int64_t i = 0; i < dim; ++i) query[j * dim + i] = widen(qr[i]);
      }
      scores.resize(heads * n);
      for (int64_t t = 0; t < n; ++t) {
        if (t + block_size < n) prefetch_row(kp + slots[t + block_size] * layout.k_slot, row_bytes);
        const T* k_row = kp + slots[t] * layout.k_slot;
        for (int64_t h = 0; h < kv_heads; ++h) {
          const float* kr;
          if constexpr (std::is_same_v<T, float>) {
            kr = k_row + h * dim;
          } else {
            for (int64_t i = 0; i < dim; ++i) widened[i] = widen(k_row[h * dim + i]);
            kr = widened.data();
          }
          for (int64_t j = h * group; j < (h + 1) * group; ++j) {
            const float* qr = query.data() + j * dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < dim; ++i) dot += qr[i] * kr[i];
            scores[j * n + t] = dot * layout.scale;
          }
        }
      }
      for (int64_t j = 0; j < heads; ++j) {
        float* row = scores.data() + j * n;
        float max = -std::numeric_limits<float>::infinity(), sum = 0.f;
#pragma omp simd reduction(max : max)
        for (int64_t t = 0; t < n; ++t) max = std::max(max, row[t]);
        for (int64_t t = 0; t < n; ++t) {
          row[t] = std::exp(row[t] - max);
          sum += row[t];
        }
        sums[j] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      // Four keys at a time: each accumulator is loaded and stored once per four values it takes in.
      for (int64_t t = 0; t < n; t += 4) {
        const int64_t keys = std::min<int64_t>(4, n - t);
        for (int64_t u = t + block_size; u < std::min(n, t + block_size + 4); ++u)
          prefetch_row(vp + slots[u] * layout.v_slot, row_bytes);
        for (int64_t h = 0; h < kv_heads; ++h) {
          const float* v[4];
          for (int64_t u = 0; u < 4; ++u) {
            const T* v_row = vp + slots[t + std::min(u, keys - 1)] * layout.v_slot + h * dim;
            if constexpr (std::is_same_v<T, float>) {
              v[u] = v_row;
            } else {
              for (int64_t i = 0; i < dim; ++i) widened[u * dim + i] = widen(v_row[i]);
              v[u] = widened.data() + u * dim;
            }
          }
          for (int64_t j = h * group; j < (h + 1) * group; ++j) {
            const float* p = scores.data() + j * n + t;
            const float p0 = p[0], p1 = keys > 1 ? p[1] : 0.f, p2 = keys > 2 ? p[2] : 0.f, p3 = keys > 3 ? p[3] : 0.f;
            float* a = acc.data() + j * dim;
#pragma omp simd
            for (int64_t i = 0; i < dim; ++i) a[i] += p0 * v[0][i] + p1 * v[1][i] + p2 * v[2][i] + p3 * v[3][i];
          }
        }
      }
      for (int64_t j = 0; j < heads; ++j) {
        const float inv = 1.f / sums[j];
        const float* a = acc.data() + j * dim;
        T* o = op + (b * heads + j) * dim;
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) o[i] = narrow<T>(a[i] * inv);
      }
    }
  }
}

}  // namespace

// q [B, H, D]; k_cache, v_cache [slots, HKV, D] (the last dimension contiguous), all float32 or all bfloat16;
// block_tables [B, W] int64; context_lens [B] int64: keys 0..len-1 of sequence b are slots
// table[t / block_size] * block_size + t % block_size. Returns [B, H, D] in q's dtype; query head j reads KV
// head j / (H / HKV).
torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& block_tables, const torch::Tensor& context_lens, int64_t block_size,
                           double scale) {
  TORCH_CHECK((q.scalar_type() == torch::kFloat || q.scalar_type() == torch::kBFloat16) &&
              k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "paged_decode: float32 or bfloat16, the same for q and both caches");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && context_lens.scalar_type() == torch::kLong,
              "paged_decode: int64 block tables and context lengths");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() &&
              block_tables.device().is_cpu() && context_lens.device().is_cpu(), "paged_decode: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "paged_decode: q [B, H, D], caches [slots, HKV, D]");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(2) == 1 && v_cache.stride(2) == 1 && k_cache.stride(1) == q.size(2) &&
              v_cache.stride(1) == q.size(2) && block_tables.stride(1) == 1 && context_lens.is_contiguous(),
              "paged_decode: unexpected strides");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(1);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0 && k_cache.size(2) == dim, "paged_decode: head shapes");
  auto out = torch::empty({batch, heads, dim}, q.options().memory_format(torch::MemoryFormat::Contiguous));

  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  // Every key a sequence reads lies inside its table and the cache: a wrong plan raises, it never reads
  // memory that is not the cache.
  const int64_t width = block_tables.size(1), blocks = k_cache.size(0) / block_size;
  TORCH_CHECK(block_tables.size(0) == batch && context_lens.size(0) == batch && v_cache.size(0) == k_cache.size(0),
              "paged_decode: batch and cache sizes");
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= width * block_size, "paged_decode: a context longer than its block table");
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i) {
      const int64_t block = tables[b * block_tables.stride(0) + i];
      TORCH_CHECK(block >= 0 && block < blocks, "paged_decode: a block outside the cache");
    }
  }

  const Layout layout{batch, heads, dim, kv_heads, block_size, q.stride(0), q.stride(1),
                      k_cache.stride(0), v_cache.stride(0), block_tables.stride(0), static_cast<float>(scale)};
  const auto run = [&](auto element) {
    using T = decltype(element);
    const T* args[] = {q.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>()};
    T* o = out.data_ptr<T>();
    if (dim == 64) return decode_rows<T, 64>(args[0], args[1], args[2], tables, lens, o, layout);
    if (dim == 128) return decode_rows<T, 128>(args[0], args[1], args[2], tables, lens, o, layout);
    decode_rows<T, 0>(args[0], args[1], args[2], tables, lens, o, layout);
  };
  if (q.scalar_type() == torch::kFloat) run(float{});
  else run(at::BFloat16{});
  return out;
}
