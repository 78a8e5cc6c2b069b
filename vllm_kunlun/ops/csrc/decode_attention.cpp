// Decode attention over the paged KV cache, compiled for the emulated device (host CPU).
//
// Same contract as vllm_kunlun.ops.reference.attention.decode_attention, which is its
// specification and its test oracle: one new token per request, query/out [R, H, D], caches
// [num_blocks, Hkv, block_size, D] (rows of D contiguous; blocks and heads at any stride, so
// the interleaved K/V views work), block_table [R, width] int32, seq_lens [R] int32 including
// the new token. Scores, softmax and the weighted sum of V are float32 whatever the cache dtype.
//
// The reference gathers each request's pages into dense copies and hands them to torch's
// attention; this kernel reads every page in place, once, so memory traffic is K and V once.
// Work is split over (request, kv head) pairs. Each page is widened to float32 into a small
// tile that the group's query heads then sweep (scores four keys at a time, then the weighted
// V sum with the accumulator in registers for the common head sizes), and the next page is
// prefetched while this one is used. With one thread and a cold cache (how vLLM's CPU worker
// runs it) it takes about 1.2x the time of vLLM's own CPU decode kernel (docs/benchmarks.md).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "vector_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = vector_math::to_float(src[i]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// Asks for rows [0, rows) of a page ahead of use: pages are a few KB at scattered places, too
// short for the hardware prefetcher to get going on its own.
template <typename T>
inline void prefetch_rows(const T* page, int64_t rows, int64_t row_stride, int64_t head_size) {
  const auto* bytes = reinterpret_cast<const char*>(page);
  const int64_t row_bytes = head_size * static_cast<int64_t>(sizeof(T));
  const int64_t stride_bytes = row_stride * static_cast<int64_t>(sizeof(T));
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(bytes + j * stride_bytes + b);
  }
}

template <typename T, int64_t kHeadSize>
void decode(torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& key_cache,
            const torch::Tensor& value_cache, const torch::Tensor& block_table,
            const torch::Tensor& seq_lens, double scale, int64_t sliding_window, double softcap) {
  const int64_t requests = query.size(0), heads = query.size(1);
  const int64_t head_size = kHeadSize > 0 ? kHeadSize : query.size(2);
  const int64_t kv_heads = key_cache.size(1), block_size = key_cache.size(2);
  const int64_t group = heads / kv_heads;
  const T* q = query.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const T* keys = key_cache.data_ptr<T>();
  const T* values = value_cache.data_ptr<T>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t table_stride = block_table.stride(0);
  const int64_t q_request = query.stride(0), q_head = query.stride(1);
  const int64_t o_request = out.stride(0), o_head = out.stride(1);
  const int64_t k_block = key_cache.stride(0), k_head = key_cache.stride(1);
  const int64_t k_row = key_cache.stride(2);
  const int64_t v_block = value_cache.stride(0), v_head = value_cache.stride(1);
  const int64_t v_row = value_cache.stride(2);
  const float fscale = static_cast<float>(scale), cap = static_cast<float>(softcap);

  at::parallel_for(0, requests * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_size), acc(group * head_size);
    std::vector<float> scores, inv_total(group), tile(block_size * head_size);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t r = job / kv_heads, h = job % kv_heads;
      const int64_t len = lens[r];
      const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, len - sliding_window) : 0;
      const int64_t n = len - first;
      if (n <= 0) continue;
      scores.resize(group * n);
      for (int64_t g = 0; g < group; ++g) {
        float* qg = &qf[g * head_size];
        to_float(q + r * q_request + (h * group + g) * q_head, qg, head_size);
        if (cap <= 0.f) {
#pragma omp simd
          for (int64_t d = 0; d < head_size; ++d) qg[d] *= fscale;
        }
      }
      const int32_t* blocks = table + r * table_stride;
      // Pass 1: scores, page by page. A page's rows for one head are adjacent; they are widened
      // to float32 once, then each query head of the group sweeps them.
      for (int64_t t = first; t < len;) {
        const int64_t in_block = t % block_size;
        const int64_t rows = std::min(len, t - in_block + block_size) - t;
        const T* page = keys + blocks[t / block_size] * k_block + h * k_head + in_block * k_row;
        const int64_t next = t + rows;
        if (next < len) {
          prefetch_rows(keys + blocks[next / block_size] * k_block + h * k_head,
                        std::min(block_size, len - next), k_row, head_size);
        } else {
          prefetch_rows(values + blocks[first / block_size] * v_block + h * v_head
                            + (first % block_size) * v_row,
                        std::min(block_size - first % block_size, len - first), v_row, head_size);
        }
        for (int64_t j = 0; j < rows; ++j) {
          to_float(page + j * k_row, &tile[j * head_size], head_size);
        }
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = &qf[g * head_size];
          float* sg = &scores[g * n + (t - first)];
          int64_t j = 0;
          for (; j + 4 <= rows; j += 4) {  // four keys at once: independent sums overlap
            const float* k0 = &tile[j * head_size];
            const float *k1 = k0 + head_size, *k2 = k1 + head_size, *k3 = k2 + head_size;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t d = 0; d < head_size; ++d) {
              s0 += qg[d] * k0[d];
              s1 += qg[d] * k1[d];
              s2 += qg[d] * k2[d];
              s3 += qg[d] * k3[d];
            }
            sg[j] = s0, sg[j + 1] = s1, sg[j + 2] = s2, sg[j + 3] = s3;
          }
          for (; j < rows; ++j) sg[j] = dot(qg, &tile[j * head_size], head_size);
        }
        t += rows;
      }
      // Softmax per query head, in float32.
      for (int64_t g = 0; g < group; ++g) {
        float* sg = &scores[g * n];
        if (cap > 0.f) {
          for (int64_t i = 0; i < n; ++i) sg[i] = cap * std::tanh(sg[i] * fscale / cap);
        }
        float top = sg[0];
#pragma omp simd reduction(max : top)
        for (int64_t i = 0; i < n; ++i) top = std::max(top, sg[i]);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t i = 0; i < n; ++i) {
          sg[i] = vector_math::exp(sg[i] - top);
          total += sg[i];
        }
        inv_total[g] = 1.f / total;
      }
      // Pass 2: the probability-weighted sum of V, page by page, one query head at a time so
      // that its accumulator stays in registers.
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = first; t < len;) {
        const int64_t in_block = t % block_size;
        const int64_t rows = std::min(len, t - in_block + block_size) - t;
        const T* page = values + blocks[t / block_size] * v_block + h * v_head + in_block * v_row;
        if (t + rows < len) {
          prefetch_rows(values + blocks[(t + rows) / block_size] * v_block + h * v_head,
                        std::min(block_size, len - t - rows), v_row, head_size);
        }
        for (int64_t j = 0; j < rows; ++j) {
          to_float(page + j * v_row, &tile[j * head_size], head_size);
        }
        for (int64_t g = 0; g < group; ++g) {
          const float* pg = &scores[g * n + (t - first)];
          float* ag = &acc[g * head_size];
          float local[kHeadSize > 0 ? kHeadSize : 1];
          float* sum = kHeadSize > 0 ? local : ag;
          if (kHeadSize > 0) std::copy(ag, ag + head_size, sum);
          for (int64_t j = 0; j < rows; ++j) {
            const float p = pg[j];
            const float* vj = &tile[j * head_size];
#pragma omp simd
            for (int64_t d = 0; d < head_size; ++d) sum[d] += p * vj[d];
          }
          if (kHeadSize > 0) std::copy(sum, sum + head_size, ag);
        }
        t += rows;
      }
      for (int64_t g = 0; g < group; ++g) {
        T* og = o + r * o_request + (h * group + g) * o_head;
        for (int64_t d = 0; d < head_size; ++d) {
          og[d] = vector_math::from_float<T>(acc[g * head_size + d] * inv_total[g]);
        }
      }
    }
  });
}

void decode_attention(torch::Tensor out, torch::Tensor query, torch::Tensor key_cache,
                      torch::Tensor value_cache, torch::Tensor block_table,
                      torch::Tensor seq_lens, double scale, int64_t sliding_window,
                      double softcap) {
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes(), "query/out must be [R, H, D]");
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(),
              "caches must be [num_blocks, kv_heads, block_size, head_size]");
  TORCH_CHECK(query.size(1) % key_cache.size(1) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(query.size(2) == key_cache.size(3), "query and cache head sizes differ");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1 && key_cache.stride(3) == 1 &&
                  value_cache.stride(3) == 1,
              "head_size must be the contiguous dimension");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "block_table and seq_lens must be int32");
  TORCH_CHECK(seq_lens.is_contiguous(), "seq_lens must be contiguous");
  TORCH_CHECK(block_table.stride(1) == 1, "block_table rows must be contiguous");
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type() &&
                  value_cache.scalar_type() == query.scalar_type() &&
                  out.scalar_type() == query.scalar_type(),
              "query, out and caches must share a dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "decode", [&] {
    switch (query.size(2)) {
      case 64:
        decode<scalar_t, 64>(out, query, key_cache, value_cache, block_table, seq_lens, scale,
                             sliding_window, softcap);
        break;
      case 128:
        decode<scalar_t, 128>(out, query, key_cache, value_cache, block_table, seq_lens, scale,
                              sliding_window, softcap);
        break;
      default:
        decode<scalar_t, 0>(out, query, key_cache, value_cache, block_table, seq_lens, scale,
                            sliding_window, softcap);
    }
  });
}

}  // namespace

void register_rotary(pybind11::module& m);       // rotary_embedding.cpp
void register_elementwise(pybind11::module& m);  // elementwise.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "Paged decode attention (see the file header)");
  register_rotary(m);
  register_elementwise(m);
}
