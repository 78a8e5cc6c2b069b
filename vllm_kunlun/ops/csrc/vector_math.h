// Float math in plain arithmetic, so that loops calling it vectorize (std::exp does not).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

#include <c10/util/BFloat16.h>

namespace vector_math {

// e^x = 2^i * 2^f with i = floor(x log2 e) and 2^f on [0, 1) from a degree-5 polynomial
// (relative error about 1e-7, float32's own rounding). 2^i is clamped to float32's normal range:
// below e^-87 the result is about 1e-38 rather than 0, above e^88 it stays finite.
inline float exp(float x) {
  const float t = std::min(std::max(x * 1.44269504f, -126.f), 127.f);
  // floor(t) by truncation and a correction: std::floor does not vectorize without fast-math.
  int32_t whole = static_cast<int32_t>(t);
  whole -= static_cast<int32_t>(t < static_cast<float>(whole));
  const float f = t - static_cast<float>(whole);
  float p = 1.895107291e-3f;
  p = p * f + 8.946214666e-3f;
  p = p * f + 5.586328266e-2f;
  p = p * f + 2.401407701e-1f;
  p = p * f + 6.931546200e-1f;
  p = p * f + 9.999998958e-1f;
  const int32_t bits = (whole + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

// Conversions between float32 and the tensor dtypes. For bfloat16 both are integer arithmetic
// on the bits, which vectorizes (c10's float -> bfloat16 conversion does not), with c10's
// results: widening is a shift (bfloat16 is the top half of a float32), narrowing rounds to
// nearest even and keeps NaN. (c10's half conversions do not vectorize either; the provider
// sends float16 rows to the reference kernels.)
template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

template <>
inline float to_float<c10::BFloat16>(c10::BFloat16 x) {
  return std::bit_cast<float>(static_cast<uint32_t>(x.x) << 16);
}

template <typename T>
inline T from_float(float x) {
  return static_cast<T>(x);
}

template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint16_t out = x != x ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  return c10::BFloat16(out, c10::BFloat16::from_bits());
}

}  // namespace vector_math
