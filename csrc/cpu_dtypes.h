// 16-bit float storage types for the plain C++ CPU twins, with float
// conversion (round to nearest even), matching XLA's fp16/bf16 casts.
#pragma once

#include <cstdint>
#include <cstring>

#include "csrc/param_vec.h"

namespace lsjax::cpu {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float ToFloat(float v) { return v; }

inline float ToFloat(BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float ToFloat(Half v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  uint32_t exp = (v.bits >> 10) & 0x1fu;
  uint32_t mant = v.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {  // inf / nan
    u = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {  // normal
    u = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {  // zero
    u = sign;
  } else {  // subnormal: renormalise
    exp = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    u = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
T FromFloat(float f);

template <>
inline float FromFloat<float>(float f) {
  return f;
}

template <>
inline BFloat16 FromFloat<BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>(u >> 16)};
}

template <>
inline Half FromFloat<Half>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7e00u)};  // nan
  if (abs >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (abs < 0x38800000u) {  // result is subnormal or zero: scale so the ulp is 2^-24
    float a;
    std::memcpy(&a, &abs, sizeof(a));
    // Adding 0.5 (2^-1) makes the FPU round the value to a multiple of 2^-24.
    float r = a + 0.5f;
    uint32_t ru;
    std::memcpy(&ru, &r, sizeof(ru));
    return Half{static_cast<uint16_t>(sign | (ru - 0x3f000000u))};
  }
  // normal: rebias exponent, round mantissa to 10 bits (nearest even)
  uint32_t m = abs - 0x38000000u;  // exponent 127 -> 15
  m += 0xfffu + ((m >> 13) & 1u);
  return Half{static_cast<uint16_t>(sign | (m >> 13))};
}

// Element i of a parameter vector, as float32; writing a gradient element.
template <typename T>
float ParamAt(const ParamVec<T>& p, int64_t i) {
  return p.f32 ? static_cast<const float*>(p.data)[i] : ToFloat(static_cast<const T*>(p.data)[i]);
}
template <typename T>
void SetParam(const ParamGrad<T>& p, int64_t i, float v) {
  if (p.f32) {
    static_cast<float*>(p.data)[i] = v;
  } else {
    static_cast<T*>(p.data)[i] = FromFloat<T>(v);
  }
}

}  // namespace lsjax::cpu
