// Decode attention on the CPU, read straight from the paged KV cache (see cpu_attention.py).
//
// One query token per sequence. Each sequence is one task: its keys are read block by block through its
// block table, every KV head of a slot at once (one contiguous row of the cache), then its values the same
// way; the next block's row is prefetched while this one is used. Scores and the softmax are float32, the
// softmax in two passes (max, then exp and sum), as an exact softmax computes them.
//
// The tasks share torch's OpenMP threads: the parallel region names torch's thread count, and the symbols
// resolve to the libgomp that libtorch_cpu loaded. (ATen's at::parallel_for, inlined into an extension,
// slowed torch's own kernels that ran after it several times over on the CI machine.)

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

void prefetch_row(const float* row, int64_t bytes) {
  const char* start = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(start + offset);
}

}  // namespace

// q [B, H, D]; k_cache, v_cache [slots, HKV, D] (the last dimension contiguous); block_tables [B, W] int64;
// context_lens [B] int64: keys 0..len-1 of sequence b are slots table[t / block_size] * block_size + t % block_size.
// Returns [B, H, D] float32; query head j reads KV head j / (H / HKV).
torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& block_tables, const torch::Tensor& context_lens, int64_t block_size,
                           double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k_cache.scalar_type() == torch::kFloat &&
              v_cache.scalar_type() == torch::kFloat, "paged_decode: float32 only");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && context_lens.scalar_type() == torch::kLong,
              "paged_decode: int64 block tables and context lengths");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "paged_decode: q [B, H, D], caches [slots, HKV, D]");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(2) == 1 && v_cache.stride(2) == 1 && k_cache.stride(1) == q.size(2) &&
              v_cache.stride(1) == q.size(2) && block_tables.stride(1) == 1 && context_lens.is_contiguous(),
              "paged_decode: unexpected strides");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k_cache.size(1);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0 && k_cache.size(2) == dim, "paged_decode: head shapes");
  const int64_t group = heads / kv_heads;
  auto out = torch::empty({batch, heads, dim}, q.options().memory_format(torch::MemoryFormat::Contiguous));

  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t q_seq = q.stride(0), q_head = q.stride(1), k_slot = k_cache.stride(0), v_slot = v_cache.stride(0);
  const int64_t table_row = block_tables.stride(0), row_bytes = kv_heads * dim * static_cast<int64_t>(sizeof(float));
  const float softmax_scale = static_cast<float>(scale);
  // Every key a sequence reads lies inside its table and the cache: a wrong plan raises, it never reads
  // memory that is not the cache.
  const int64_t width = block_tables.size(1), blocks = k_cache.size(0) / block_size;
  TORCH_CHECK(block_tables.size(0) == batch && context_lens.size(0) == batch && v_cache.size(0) == k_cache.size(0),
              "paged_decode: batch and cache sizes");
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= width * block_size, "paged_decode: a context longer than its block table");
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i) {
      const int64_t block = tables[b * table_row + i];
      TORCH_CHECK(block >= 0 && block < blocks, "paged_decode: a block outside the cache");
    }
  }

#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> scores, acc(heads * dim), maxes(heads), sums(heads);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t n = lens[b];
      const int64_t* table = tables + b * table_row;
      const float* qb = qp + b * q_seq;
      auto slot_of = [&](int64_t t) { return table[t / block_size] * block_size + t % block_size; };
      scores.resize(heads * n);
      std::fill(maxes.begin(), maxes.end(), -std::numeric_limits<float>::infinity());
      for (int64_t t = 0; t < n; ++t) {
        if (t + block_size < n) prefetch_row(kp + slot_of(t + block_size) * k_slot, row_bytes);
        const float* k_row = kp + slot_of(t) * k_slot;
        for (int64_t j = 0; j < heads; ++j) {
          const float* qr = qb + j * q_head;
          const float* kr = k_row + (j / group) * dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < dim; ++i) dot += qr[i] * kr[i];
          dot *= softmax_scale;
          scores[j * n + t] = dot;
          if (dot > maxes[j]) maxes[j] = dot;
        }
      }
      for (int64_t j = 0; j < heads; ++j) {
        float* row = scores.data() + j * n;
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) {
          row[t] = std::exp(row[t] - maxes[j]);
          sum += row[t];
        }
        sums[j] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {
        if (t + block_size < n) prefetch_row(vp + slot_of(t + block_size) * v_slot, row_bytes);
        const float* v_row = vp + slot_of(t) * v_slot;
        for (int64_t j = 0; j < heads; ++j) {
          const float p = scores[j * n + t];
          const float* vr = v_row + (j / group) * dim;
          float* a = acc.data() + j * dim;
#pragma omp simd
          for (int64_t i = 0; i < dim; ++i) a[i] += p * vr[i];
        }
      }
      for (int64_t j = 0; j < heads; ++j) {
        const float inv = 1.f / sums[j];
        const float* a = acc.data() + j * dim;
        float* o = op + (b * heads + j) * dim;
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) o[i] = a[i] * inv;
      }
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache (float32, CPU)");
}
