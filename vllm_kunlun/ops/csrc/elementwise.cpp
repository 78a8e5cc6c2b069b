// RMSNorm, fused add + RMSNorm and the paged KV-cache write, compiled for the emulated device
// (host CPU).
//
// Same contracts as the reference kernels in vllm_kunlun/ops/reference/ (norm.py, kv_cache.py),
// which are their specification and test oracle, with the same roundings: statistics in
// float32, results rounded to the tensor's dtype where the reference rounds. Each is one pass
// over its rows, where the reference makes several torch calls with a temporary each. The
// Python side (compiled_provider.py) sends only layouts these kernels accept (contiguous rows,
// one dtype) and the rest to the reference.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "vector_math.h"

namespace {

using vector_math::from_float;
using vector_math::to_float;

// y = T(x / rms(x)) * w, with rms over the row in float32 (the reference rounds before * w).
template <typename T>
inline void normalize_row(const T* x, const T* weight, T* y, int64_t hidden, float eps) {
  float sum_squares = 0.f;
#pragma omp simd reduction(+ : sum_squares)
  for (int64_t i = 0; i < hidden; ++i) {
    const float v = to_float(x[i]);
    sum_squares += v * v;
  }
  const float inv_rms = 1.f / std::sqrt(sum_squares / static_cast<float>(hidden) + eps);
#pragma omp simd
  for (int64_t i = 0; i < hidden; ++i) {
    const float normalized = to_float(from_float<T>(to_float(x[i]) * inv_rms));
    y[i] = from_float<T>(normalized * to_float(weight[i]));
  }
}

// residual <- T(x + residual), then x <- rms_norm(residual) * w: one row.
template <typename T>
inline void add_and_normalize_row(T* x, T* residual, const T* weight, int64_t hidden,
                                  float eps) {
#pragma omp simd
  for (int64_t i = 0; i < hidden; ++i) {
    residual[i] = from_float<T>(to_float(x[i]) + to_float(residual[i]));
  }
  normalize_row(residual, weight, x, hidden, eps);
}

void check_rows(const torch::Tensor& x, const torch::Tensor& weight, const char* name) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), name, ": tensors must be contiguous");
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0), name,
              ": weight must be [hidden] with hidden = x.size(-1)");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), name, ": x and weight must share a dtype");
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_rows(x, weight, "rms_norm");
  auto out = torch::empty_like(x);
  const int64_t hidden = x.size(-1), rows = hidden ? x.numel() / hidden : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        normalize_row(in + r * hidden, w, y + r * hidden, hidden, static_cast<float>(eps));
      }
    });
  });
  return out;
}

// In place: residual <- T(x + residual), then x <- rms_norm(residual) * weight.
void fused_add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight,
                        double eps) {
  check_rows(x, weight, "fused_add_rms_norm");
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes() &&
                  residual.scalar_type() == x.scalar_type(),
              "fused_add_rms_norm: residual must be contiguous, with x's shape and dtype");
  const int64_t hidden = x.size(-1), rows = hidden ? x.numel() / hidden : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_norm", [&] {
    scalar_t* xs = x.data_ptr<scalar_t>();
    scalar_t* res = residual.data_ptr<scalar_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        add_and_normalize_row(xs + r * hidden, res + r * hidden, w, hidden,
                              static_cast<float>(eps));
      }
    });
  });
}

// key/value [T, Hkv, D] (token and head at any stride, D contiguous) into caches
// [num_blocks, Hkv, block_size, D] (any strides but D's) at slot = block * block_size + offset;
// negative slots are padding and skipped.
void reshape_and_cache(torch::Tensor key, torch::Tensor value, torch::Tensor key_cache,
                       torch::Tensor value_cache, torch::Tensor slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes() && key.stride(2) == 1 &&
                  value.stride(2) == 1,
              "reshape_and_cache: key/value must be [T, Hkv, D] with D contiguous");
  TORCH_CHECK(key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes() &&
                  key_cache.stride(3) == 1 && value_cache.stride(3) == 1,
              "reshape_and_cache: caches must be [num_blocks, Hkv, block_size, D], D contiguous");
  TORCH_CHECK(key_cache.size(1) == key.size(1) && key_cache.size(3) == key.size(2),
              "reshape_and_cache: cache and key heads/head size differ");
  TORCH_CHECK(key.scalar_type() == key_cache.scalar_type() &&
                  value.scalar_type() == key.scalar_type() &&
                  value_cache.scalar_type() == key.scalar_type(),
              "reshape_and_cache: key, value and caches must share a dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == key.size(0),
              "reshape_and_cache: slot_mapping must be contiguous int64 [T]");
  const int64_t tokens = key.size(0), heads = key.size(1), head_size = key.size(2);
  const int64_t block_size = key_cache.size(2);
  const int64_t bytes = head_size * key.element_size();
  const auto* slots = slot_mapping.data_ptr<int64_t>();
  const auto copy_into = [&](const torch::Tensor& source, torch::Tensor& cache) {
    const auto* src = static_cast<const char*>(source.data_ptr());
    auto* dst = static_cast<char*>(cache.data_ptr());
    const int64_t size = source.element_size();
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      const int64_t block = slot / block_size, offset = slot % block_size;
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(dst + (block * cache.stride(0) + h * cache.stride(1) +
                           offset * cache.stride(2)) * size,
                    src + (t * source.stride(0) + h * source.stride(1)) * size, bytes);
      }
    }
  };
  copy_into(key, key_cache);
  copy_into(value, value_cache);
}

}  // namespace

// Registered by decode_attention.cpp's module: all files build into one extension.
void register_elementwise(pybind11::module& m) {
  m.def("rms_norm", &rms_norm, "RMSNorm (see the file header)");
  m.def("fused_add_rms_norm", &fused_add_rms_norm, "Residual add, then RMSNorm, in place");
  m.def("reshape_and_cache", &reshape_and_cache, "Paged KV-cache write");
}
