// Rotary position embedding in place, compiled for the emulated device (host CPU).
//
// Same contract as vllm_kunlun.ops.reference.rotary.rotary_embedding, its specification and
// test oracle, except that the caller passes each token's cache row already gathered and in
// float32: cos_sin [T, rotary_dim] = [cos | sin]. x is [T, heads, head_size] with heads and
// features contiguous (a column slice of a fused qkv tensor qualifies); the first rotary_dim
// features of every head rotate, in float32, and the rest pass through.

#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

template <typename T>
void rotate(torch::Tensor& x, const torch::Tensor& cos_sin, int64_t rotary_dim, bool is_neox) {
  const int64_t tokens = x.size(0), heads = x.size(1);
  const int64_t token_stride = x.stride(0), head_stride = x.stride(1);
  const int64_t half = rotary_dim / 2;
  T* data = x.data_ptr<T>();
  const float* table = cos_sin.data_ptr<float>();
  // NeoX pairs feature i with i + half; GPT-J pairs neighbours 2i and 2i + 1.
  const int64_t partner = is_neox ? half : 1, step = is_neox ? 1 : 2;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* cos = table + t * rotary_dim;
      const float* sin = cos + half;
      for (int64_t h = 0; h < heads; ++h) {
        T* head = data + t * token_stride + h * head_stride;
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          const float a = static_cast<float>(head[j * step]);
          const float b = static_cast<float>(head[j * step + partner]);
          head[j * step] = static_cast<T>(a * cos[j] - b * sin[j]);
          head[j * step + partner] = static_cast<T>(b * cos[j] + a * sin[j]);
        }
      }
    }
  });
}

void rotary_embedding(torch::Tensor x, torch::Tensor cos_sin, int64_t rotary_dim, bool is_neox) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be [T, heads, head_size], features contiguous");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous() &&
                  cos_sin.size(0) == x.size(0) && cos_sin.size(1) == rotary_dim,
              "cos_sin must be float32 [T, rotary_dim]");
  TORCH_CHECK(rotary_dim % 2 == 0 && rotary_dim <= x.size(2), "bad rotary_dim");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary", [&] {
    rotate<scalar_t>(x, cos_sin, rotary_dim, is_neox);
  });
}

}  // namespace

// Registered by decode_attention.cpp's module: both files build into one extension.
void register_rotary(pybind11::module& m) {
  m.def("rotary_embedding", &rotary_embedding, "Rotary embedding in place (see the file header)");
}
