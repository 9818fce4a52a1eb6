// Philox4x32-10 counter-based RNG (Salmon et al., SC'11) for dropout, shared
// by the CUDA kernels and the CPU twins; lsjax/ops/_philox.py implements the
// same function in jnp so masks are bit-identical on every backend.
//
// Mask convention (every op that drops elements):
//   rng = uint32[4] {k0, k1, off_lo, off_hi} (from a JAX PRNG key + offset)
//   element e = offset + r * row_stride + c for element (r, c) of the op's
//     [rows, cols] view (row_stride == cols: the flat row-major index; a larger
//     row_stride and an advanced offset: a block of a wider tensor's mask)
//   g     = Philox(counter = {b_lo, b_hi, 0, 0}, key = {k0, k1}), b = e / 8
//   bits  = 16-bit chunk e % 8 of g: (g[(e % 8) / 2] >> (16 * (e % 2))) & 0xFFFF
//   keep  = bits >= threshold,  threshold = floor(rate * 2^16)
//   out   = keep ? v / (1 - rate) : 0
// 16 bits per element (8 elements per Philox call) halve the RNG instructions
// of 32-bit words; the rate resolution is 2^-16 (0.1 drops with probability
// 6553 / 65536 = 0.09999), while the scale stays exactly 1 / (1 - rate).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LSJAX_HD __host__ __device__ __forceinline__
#else
#define LSJAX_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define LSJAX_UNROLL _Pragma("unroll")
#define LSJAX_NO_UNROLL _Pragma("unroll 1")
#else
#define LSJAX_UNROLL
#define LSJAX_NO_UNROLL
#endif

namespace lsjax {

struct PhiloxOut {
  uint32_t w[4];
};

LSJAX_HD uint32_t MulHi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Four 32-bit words for counter (c0, c1, 0, 0) under key (k0, k1).
LSJAX_HD PhiloxOut Philox4x32(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint32_t x0 = c0, x1 = c1, x2 = 0u, x3 = 0u;
  LSJAX_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = MulHi32(kM0, x0), lo0 = kM0 * x0;
    const uint32_t hi1 = MulHi32(kM1, x2), lo1 = kM1 * x2;
    const uint32_t y0 = hi1 ^ x1 ^ k0, y2 = hi0 ^ x3 ^ k1;
    x0 = y0;
    x1 = lo1;
    x2 = y2;
    x3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return PhiloxOut{{x0, x1, x2, x3}};
}

// The dropout RNG state an op receives: key words and a 64-bit element offset.
struct DropoutRng {
  uint32_t k0, k1;
  uint64_t offset;
  uint32_t threshold;  // floor(rate * 2^16); keep iff the element's 16 bits >= threshold
  float scale;         // 1 / (1 - rate)

  // Random bits of the 8-aligned group holding stream index i (offset included).
  LSJAX_HD PhiloxOut Group(uint64_t i) const {
    const uint64_t b = i >> 3;
    return Philox4x32(static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32), k0, k1);
  }
  LSJAX_HD bool Keep(uint64_t e) const;
};

// Word i (0 <= i < 4) of a Philox output, by selects (no dynamically indexed
// local array on the GPU).
LSJAX_HD uint32_t Word(const PhiloxOut& g, uint32_t i) {
  uint32_t w = g.w[0];
  w = i == 1 ? g.w[1] : w;
  w = i == 2 ? g.w[2] : w;
  w = i == 3 ? g.w[3] : w;
  return w;
}

// Whether 16-bit chunk k (0: low, 1: high) of word w is >= threshold (< 2^16),
// compared in the high half: one compare for the high chunk, shift + compare
// for the low one.
LSJAX_HD bool ChunkKeeps(uint32_t w, uint32_t k, uint32_t threshold) {
  return (k != 0 ? w : w << 16) >= threshold << 16;
}

LSJAX_HD bool DropoutRng::Keep(uint64_t e) const {
  const uint64_t i = e + offset;
  return ChunkKeeps(Word(Group(i), (i >> 1) & 3u), i & 1u, threshold);
}

// Keep bitmask of the VEC (<= 32) elements from element index e: bit k is
// keep(e + k). It needs no data, so kernels call it between issuing their
// loads and using the values: the Philox work hides the load latency. When
// e + offset is a multiple of G (8 for VEC % 8 == 0, 4 for VEC % 4 == 0; always
// so for the row strides and offsets lsjax's ops pass) one Philox call serves G
// elements; otherwise each element makes its own call, one at a time, so that
// the rare path adds no live registers.
template <int VEC>
LSJAX_HD uint32_t DropoutKeepBits(const DropoutRng& rng, uint64_t e) {
  static_assert(VEC >= 1 && VEC <= 32, "one uint32 of keep bits");
  constexpr int G = VEC % 8 == 0 ? 8 : (VEC % 4 == 0 ? 4 : 1);
  const uint64_t i = e + rng.offset;
  uint32_t keep = 0;
  if (G > 1 && i % G == 0) {
    LSJAX_UNROLL
    for (int j = 0; j < VEC / G; ++j) {
      const uint64_t ij = i + static_cast<uint64_t>(G * j);
      const PhiloxOut g = rng.Group(ij);
      const uint32_t w0 = G == 8 ? 0u : static_cast<uint32_t>(ij >> 1) & 2u;  // G == 4: words 0-1 or 2-3
      LSJAX_UNROLL
      for (int k = 0; k < G; ++k) {
        const uint32_t w = G == 8 ? g.w[k / 2] : Word(g, w0 + k / 2);
        keep |= static_cast<uint32_t>(ChunkKeeps(w, k & 1, rng.threshold)) << (G * j + k);
      }
    }
  } else {
    LSJAX_NO_UNROLL
    for (int k = 0; k < VEC; ++k) keep |= static_cast<uint32_t>(rng.Keep(e + k)) << k;
  }
  return keep;
}

// v[k] = bit k of keep ? v[k] * scale : 0 (scale: 1 / (1 - rate), possibly
// folded with another factor by the caller).
template <int VEC>
LSJAX_HD void ApplyKeepBits(uint32_t keep, float scale, float (&v)[VEC]) {
  LSJAX_UNROLL
  for (int k = 0; k < VEC; ++k) v[k] = (keep >> k) & 1u ? v[k] * scale : 0.f;
}

// 1 / (1 - rate), the scale of kept elements (1 without dropout).
LSJAX_HD float DropoutScale(float rate) { return rate > 0.f ? 1.f / (1.f - rate) : 1.f; }

// rng: {k0, k1, off_lo, off_hi}; rate in [0, 1).
LSJAX_HD DropoutRng MakeDropoutRng(const uint32_t* rng, float rate) {
  DropoutRng r;
  r.k0 = rng[0];
  r.k1 = rng[1];
  r.offset = static_cast<uint64_t>(rng[2]) | (static_cast<uint64_t>(rng[3]) << 32);
  const double t = static_cast<double>(rate) * 65536.0;
  r.threshold = t >= 65535.0 ? 0xFFFFu : static_cast<uint32_t>(t);
  r.scale = DropoutScale(rate);
  return r;
}

}  // namespace lsjax
