// Bias + activation + dropout (+ residual) over a [rows, cols] tensor, one
// element-wise pass with the bias broadcast along the rows. Math in float32;
// bias and dbias are [cols], float32 or T (csrc/param_vec.h). Framework-free:
// pointers, sizes, stream.
//
// Forward:  v = act(x + bias);  y = keep(e) ? v / (1 - rate) : 0  (+ residual)
// Backward: g = keep(e) ? dy / (1 - rate) : 0  (* act'(x + bias));
//           dx = g;  dbias = sum_rows(g)  (fp32, deterministic order)
// keep(e) is the Philox stream of csrc/philox.h for the element index
// e = row * row_stride + col: row_stride == cols is the flat index of this
// tensor; a [rows, cols] block at (row0, col0) of a wider [R, row_stride]
// tensor (its last dim sharded) draws that tensor's mask when the rng offset
// is advanced by row0 * row_stride + col0. With rate == 0 no random bits are
// drawn at all.
// relu's backward reads the forward's output y instead of x: keep(e) and
// x + bias > 0 together are y > 0 (see ActRelu), so it draws no random bits.
//
// The same code serves bias_dropout_residual (act = identity, residual),
// bias_act_dropout (act = relu/gelu/gelu_tanh, no residual) and plain dropout
// (identity, no bias, no residual).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "csrc/fast_math.h"
#include "csrc/param_vec.h"

#ifdef LSJAX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#if defined(__CUDACC__)
#define LSJAX_ACT_HD __host__ __device__ __forceinline__
#else
#define LSJAX_ACT_HD inline
#endif

namespace lsjax {

// Matches the Python side's activation codes (lsjax/ops/bias_act_dropout.py).
enum class Activation : int32_t { kIdentity = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3 };

// Whether an int32 attribute names an Activation.
constexpr bool KnownActivation(int32_t code) {
  return code >= static_cast<int32_t>(Activation::kIdentity) && code <= static_cast<int32_t>(Activation::kGeluTanh);
}

// Element-wise activations and their derivatives (float32), shared by the CPU
// twin and the CUDA kernels. What the backward reads besides dy:
//   kGradFromOutput: the forward's output y, and G(y) gates the gradient;
//   else kNeedsInput: the pre-activation x (and bias), for D(x + bias);
//   else nothing.
struct ActIdentity {
  static constexpr bool kGradFromOutput = false;
  static constexpr bool kNeedsInput = false;
  LSJAX_ACT_HD static float F(float v) { return v; }
  LSJAX_ACT_HD static float D(float) { return 1.f; }
};

// jax.nn.relu: gradient 0 at 0; NaN propagates forward, gets gradient 0.
// y > 0 iff the element was kept and x + bias > 0, so dx = y > 0 ? dy * scale
// : 0 is the exact backward, except where 0 < (x + bias) * scale is below half
// the smallest subnormal of y's dtype and y rounded to 0 (float16 with a
// float32 bias: x + bias < 3e-8), where it gives 0 instead of dy * scale.
struct ActRelu {
  static constexpr bool kGradFromOutput = true;
  static constexpr bool kNeedsInput = false;
  LSJAX_ACT_HD static float F(float v) { return v < 0.f ? 0.f : v; }
  LSJAX_ACT_HD static bool G(float y) { return y > 0.f; }
};

// c[0] + c[1] t + ... + c[N-1] t^(N-1), Horner's rule (fused multiply-adds).
template <int N>
LSJAX_ACT_HD float Horner(const float (&c)[N], float t) {
  float p = c[N - 1];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = N - 2; i >= 0; --i) p = p * t + c[i];
  return p;
}

// jax.nn.gelu(approximate=False) = v * Phi(v). Phi(v) = erfc(-v / sqrt 2) / 2
// with erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), z = |v| / sqrt 2 (the
// form of Numerical Recipes' erfcc: the exponent carries the tail, so the error
// is relative for every argument, no cancellation in the lower tail), log2(e)
// and the 1/2 folded into the exponent. One rcp and one ex2 (CUDA's erfcf costs
// ~3x more instructions, and the kernels are instruction-bound on it).
// P: erfcc's Chebyshev fit of degree 9 (relative error of erfc < 1.2e-7; the
// absolute error of Phi in float32 < 3e-7) for float32 storage; kShort (16-bit
// storage): a least-squares fit of degree 5 over z in [0, 14] (relative error
// < 1.2e-5, far below bf16's 2^-9 and fp16's 2^-12 rounding), 4 fewer FMAs.
template <bool kShort>
struct ActGelu {
  static constexpr bool kGradFromOutput = false;
  static constexpr bool kNeedsInput = true;
  static constexpr double kLog2e = 1.4426950408889634;
  static constexpr float kHalfLog2e = static_cast<float>(-0.5 * kLog2e);  // exp(-v^2 / 2) = 2^(kHalfLog2e v^2)
  LSJAX_ACT_HD static float Phi(float v, float v2) {
    const float t = Rcp(1.f + 0.35355339059327376f * fabsf(v));  // 1 / (1 + |z| / 2), z = v / sqrt 2
    // P's coefficients times log2(e); the constant term also takes the -1.
    float p;
    if constexpr (kShort) {
      constexpr float kP[6] = {
          static_cast<float>(-1.26633873 * kLog2e - 1.0), static_cast<float>(1.01557574 * kLog2e),
          static_cast<float>(0.265029921 * kLog2e),       static_cast<float>(0.453389513 * kLog2e),
          static_cast<float>(-0.68960967 * kLog2e),       static_cast<float>(0.221945459 * kLog2e)};
      p = Horner(kP, t);
    } else {
      constexpr float kP[10] = {
          static_cast<float>(-1.26551223 * kLog2e - 1.0), static_cast<float>(1.00002368 * kLog2e),
          static_cast<float>(0.37409196 * kLog2e),        static_cast<float>(0.09678418 * kLog2e),
          static_cast<float>(-0.18628806 * kLog2e),       static_cast<float>(0.27886807 * kLog2e),
          static_cast<float>(-1.13520398 * kLog2e),       static_cast<float>(1.48851587 * kLog2e),
          static_cast<float>(-0.82215223 * kLog2e),       static_cast<float>(0.17087277 * kLog2e)};
      p = Horner(kP, t);
    }
    const float h = t * Exp2(kHalfLog2e * v2 + p);  // erfc(|z|) / 2
    return v < 0.f ? h : 1.f - h;
  }
  LSJAX_ACT_HD static float F(float v) { return v * Phi(v, v * v); }
  LSJAX_ACT_HD static float D(float v) {  // Phi(v) + v * phi(v), phi = exp(-v^2 / 2) / sqrt(2 pi)
    const float v2 = v * v;
    const float phi = Exp2(kHalfLog2e * v2 - 1.3257480647361593f);  // - log2(sqrt(2 pi))
    return v * phi + Phi(v, v2);
  }
};

// jax.nn.gelu(approximate=True) = v * (1 + tanh(u)) / 2, u = sqrt(2/pi) (v + 0.044715 v^3).
// (1 + tanh(u)) / 2 is the logistic sigmoid s = 1 / (1 + e), e = exp(-2u): one
// ex2 and one rcp instead of tanhf, no cancellation where s is small, and
// s' = 2 s (1 - s) u' with 1 - s = e s (none where s is near 1 either).
struct ActGeluTanh {
  static constexpr bool kGradFromOutput = false;
  static constexpr bool kNeedsInput = true;
  static constexpr float kA = 0.79788456080286536f;  // sqrt(2 / pi)
  static constexpr float kB = 0.044715f;
  // exp(-2u) = 2^(-2 log2(e) u), at most 2^125 so that e * s stays finite (1 for v -> -inf).
  LSJAX_ACT_HD static float Exp2u(float v, float v2) {
    return Exp2(fminf(-2.8853900817779268f * kA * (v + kB * v * v2), 125.f));
  }
  LSJAX_ACT_HD static float F(float v) { return v * Rcp(1.f + Exp2u(v, v * v)); }
  LSJAX_ACT_HD static float D(float v) {
    const float v2 = v * v;
    const float e = Exp2u(v, v2);
    const float s = Rcp(1.f + e);
    return s + 2.f * kA * v * s * (e * s) * (1.f + 3.f * kB * v2);
  }
};

// Calls f(Act{}) for the activation code, T the storage type (its size picks
// ActGelu's fit); false for an unknown code.
template <typename T, typename F>
bool DispatchActivation(Activation act, F&& f) {
  switch (act) {
    case Activation::kIdentity:
      f(ActIdentity{});
      return true;
    case Activation::kRelu:
      f(ActRelu{});
      return true;
    case Activation::kGelu:
      f(ActGelu<sizeof(T) == 2>{});
      return true;
    case Activation::kGeluTanh:
      f(ActGeluTanh{});
      return true;
  }
  return false;
}

template <typename T>
struct BiasDropoutFwdArgs {
  const T* x;
  ParamVec<T> bias;     // data nullable: no bias
  const T* residual;    // nullable: no residual add
  const uint32_t* rng;  // uint32[4] {k0, k1, off_lo, off_hi}, on the kernel's device; unread when rate == 0
  T* y;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;  // >= cols: Philox element index of (r, c) is r * row_stride + c
  float rate;          // in [0, 1)
  Activation act;
};

template <typename T>
struct BiasDropoutBwdArgs {
  const T* dy;
  const T* saved;       // the forward's y for relu, its input x for gelu/gelu_tanh; unread for identity
  ParamVec<T> bias;     // data nullable: no bias (read only with x)
  const uint32_t* rng;  // as in the forward
  T* dx;
  ParamGrad<T> dbias;  // data nullable: no bias gradient; the bias's dtype
  float* partials;  // with dbias, CUDA only: float32 [ColumnSumPartialRows(rows), cols]
  int64_t rows;
  int64_t cols;
  int64_t row_stride;  // as in the forward
  float rate;
  Activation act;
};


template <typename T>
void BiasDropoutFwdCpu(const BiasDropoutFwdArgs<T>& a);
template <typename T>
void BiasDropoutBwdCpu(const BiasDropoutBwdArgs<T>& a);

#ifdef LSJAX_WITH_CUDA
template <typename T>
cudaError_t BiasDropoutFwdCuda(const BiasDropoutFwdArgs<T>& a, cudaStream_t stream);
// dbias goes through per-block partial rows in a.partials (an extra XLA
// output), summed in a fixed order.
template <typename T>
cudaError_t BiasDropoutBwdCuda(const BiasDropoutBwdArgs<T>& a, cudaStream_t stream);
#endif

}  // namespace lsjax
