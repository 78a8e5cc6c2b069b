// Rotary position embedding in place, compiled for the emulated device (host CPU).
//
// Same contract as vllm_kunlun.ops.reference.rotary.rotary_embedding, its specification and
// test oracle, for one tensor at a time: x is [T, heads, head_size] with heads and features
// contiguous (a column slice of a fused qkv tensor qualifies), positions [T] int64, and
// cos_sin_cache [max_position, rotary_dim] = [cos | sin] in float32 or in x's dtype. The first
// rotary_dim features of every head rotate, in float32, and the rest pass through. Each token's
// cos/sin row is widened to float32 once and shared by all its heads.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

#include "vector_math.h"

namespace {

// Feature pairs (first[j * step], second[j * step]) turned by the angle of (cos[j], sin[j]).
// NeoX pairs feature i with i + half (step 1); GPT-J pairs neighbours 2i and 2i + 1 (step 2).
template <typename T>
inline void rotate_pairs(T* first, T* second, int64_t step, const float* cos, const float* sin,
                         int64_t half) {
  if (step == 1) {
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      const float a = vector_math::to_float(first[j]), b = vector_math::to_float(second[j]);
      first[j] = vector_math::from_float<T>(a * cos[j] - b * sin[j]);
      second[j] = vector_math::from_float<T>(b * cos[j] + a * sin[j]);
    }
    return;
  }
  for (int64_t j = 0; j < half; ++j) {
    const float a = vector_math::to_float(first[j * step]);
    const float b = vector_math::to_float(second[j * step]);
    first[j * step] = vector_math::from_float<T>(a * cos[j] - b * sin[j]);
    second[j * step] = vector_math::from_float<T>(b * cos[j] + a * sin[j]);
  }
}

template <typename T, typename C>
void rotate(torch::Tensor& x, const torch::Tensor& positions, const torch::Tensor& cache,
            bool is_neox) {
  const int64_t tokens = x.size(0), heads = x.size(1);
  const int64_t token_stride = x.stride(0), head_stride = x.stride(1);
  const int64_t rotary_dim = cache.size(1), half = rotary_dim / 2;
  T* data = x.data_ptr<T>();
  const C* table = cache.data_ptr<C>();
  const int64_t* position = positions.data_ptr<int64_t>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> cos(half), sin(half);
    for (int64_t t = begin; t < end; ++t) {
      const C* row = table + position[t] * rotary_dim;
      for (int64_t j = 0; j < half; ++j) {
        cos[j] = vector_math::to_float(row[j]);
        sin[j] = vector_math::to_float(row[half + j]);
      }
      for (int64_t h = 0; h < heads; ++h) {
        T* head = data + t * token_stride + h * head_stride;
        if (is_neox) {  // unit-stride halves: this loop vectorizes
          rotate_pairs(head, head + half, 1, cos.data(), sin.data(), half);
        } else {
          rotate_pairs(head, head + 1, 2, cos.data(), sin.data(), half);
        }
      }
    }
  });
}

void rotary_embedding(torch::Tensor x, torch::Tensor positions, torch::Tensor cos_sin_cache,
                      bool is_neox) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1,
              "x must be [T, heads, head_size], features contiguous");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.numel() == x.size(0),
              "positions must be contiguous int64 [T]");
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.is_contiguous(),
              "cos_sin_cache must be contiguous [max_position, rotary_dim]");
  const int64_t rotary_dim = cos_sin_cache.size(1);
  TORCH_CHECK(rotary_dim % 2 == 0 && rotary_dim <= x.size(2), "bad rotary_dim");
  const bool float_cache = cos_sin_cache.scalar_type() == at::kFloat;
  TORCH_CHECK(float_cache || cos_sin_cache.scalar_type() == x.scalar_type(),
              "cos_sin_cache must be float32 or x's dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary", [&] {
    if (float_cache) {
      rotate<scalar_t, float>(x, positions, cos_sin_cache, is_neox);
    } else {
      rotate<scalar_t, scalar_t>(x, positions, cos_sin_cache, is_neox);
    }
  });
}

}  // namespace

// Registered by decode_attention.cpp's module: all files build into one extension.
void register_rotary(pybind11::module& m) {
  m.def("rotary_embedding", &rotary_embedding, "Rotary embedding in place (see the file header)");
}
