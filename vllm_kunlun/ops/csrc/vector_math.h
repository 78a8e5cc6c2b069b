// Float math in plain arithmetic, so that loops calling it vectorize (std::exp does not).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>

namespace vector_math {

// e^x = 2^i * 2^f with i = floor(x log2 e) and 2^f on [0, 1) from a degree-5 polynomial
// (relative error about 1e-7, float32's own rounding). 2^i is clamped to float32's normal range:
// below e^-87 the result is about 1e-38 rather than 0, above e^88 it stays finite.
inline float exp(float x) {
  const float t = std::min(std::max(x * 1.44269504f, -126.f), 127.f);
  const float whole = std::floor(t);
  const float f = t - whole;
  float p = 1.895107291e-3f;
  p = p * f + 8.946214666e-3f;
  p = p * f + 5.586328266e-2f;
  p = p * f + 2.401407701e-1f;
  p = p * f + 6.931546200e-1f;
  p = p * f + 9.999998958e-1f;
  const int32_t bits = (static_cast<int32_t>(whole) + 127) << 23;
  float power;
  std::memcpy(&power, &bits, sizeof power);
  return p * power;
}

// float -> T with round-to-nearest-even. For bfloat16 this is integer arithmetic on the bits,
// which vectorizes (c10's conversion does not), and gives the same result, NaN included.
template <typename T>
inline T from_float(float x) {
  return static_cast<T>(x);
}

template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint16_t out = x != x ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  return c10::BFloat16(out, c10::BFloat16::from_bits());
}

}  // namespace vector_math
