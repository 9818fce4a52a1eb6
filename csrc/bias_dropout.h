// Bias + activation + dropout (+ residual) over a [rows, cols] tensor, one
// element-wise pass with the bias broadcast along the rows. Math in float32;
// bias and dbias are float32 [cols]. Framework-free: pointers, sizes, stream.
//
// Forward:  v = act(x + bias);  y = keep(e) ? v / (1 - rate) : 0  (+ residual)
// Backward: g = keep(e) ? dy / (1 - rate) : 0  (* act'(x + bias));
//           dx = g;  dbias = sum_rows(g)  (fp32, deterministic order)
// keep(e) is the Philox stream of csrc/philox.h for the flat element index
// e = row * cols + col; with rate == 0 no random bits are drawn at all.
//
// The same code serves bias_dropout_residual (act = identity, residual),
// bias_act_dropout (act = relu/gelu/gelu_tanh, no residual) and plain dropout
// (identity, no bias, no residual).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

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

// Element-wise activations and their derivatives (float32), shared by the CPU
// twin and the CUDA kernels. kNeedsInput: the backward reads x (and bias).
struct ActIdentity {
  static constexpr bool kNeedsInput = false;
  LSJAX_ACT_HD static float F(float v) { return v; }
  LSJAX_ACT_HD static float D(float) { return 1.f; }
};

struct ActRelu {  // jax.nn.relu: gradient 0 at 0; NaN propagates
  static constexpr bool kNeedsInput = true;
  LSJAX_ACT_HD static float F(float v) { return v < 0.f ? 0.f : v; }
  LSJAX_ACT_HD static float D(float v) { return v > 0.f ? 1.f : 0.f; }
};

struct ActGelu {  // jax.nn.gelu(approximate=False): v * Phi(v), Phi by erfc (no cancellation for v < 0)
  static constexpr bool kNeedsInput = true;
  LSJAX_ACT_HD static float F(float v) { return 0.5f * v * erfcf(-v * 0.70710678118654752f); }
  LSJAX_ACT_HD static float D(float v) {
    return 0.5f * erfcf(-v * 0.70710678118654752f) + v * 0.39894228040143268f * expf(-0.5f * v * v);
  }
};

struct ActGeluTanh {  // jax.nn.gelu(approximate=True)
  static constexpr bool kNeedsInput = true;
  static constexpr float kA = 0.79788456080286536f;  // sqrt(2 / pi)
  static constexpr float kB = 0.044715f;
  LSJAX_ACT_HD static float F(float v) { return 0.5f * v * (1.f + tanhf(kA * (v + kB * v * v * v))); }
  LSJAX_ACT_HD static float D(float v) {
    const float t = tanhf(kA * (v + kB * v * v * v));
    return 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * kA * (1.f + 3.f * kB * v * v);
  }
};

// Calls f(Act{}) for the activation code; false for an unknown code.
template <typename F>
bool DispatchActivation(Activation act, F&& f) {
  switch (act) {
    case Activation::kIdentity:
      f(ActIdentity{});
      return true;
    case Activation::kRelu:
      f(ActRelu{});
      return true;
    case Activation::kGelu:
      f(ActGelu{});
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
  const float* bias;    // nullable: no bias
  const T* residual;    // nullable: no residual add
  const uint32_t* rng;  // uint32[4] {k0, k1, off_lo, off_hi}, on the kernel's device; unread when rate == 0
  T* y;
  int64_t rows;
  int64_t cols;
  float rate;  // in [0, 1)
  Activation act;
};

template <typename T>
struct BiasDropoutBwdArgs {
  const T* dy;
  const T* x;           // pre-activation input; read only for a non-identity activation
  const float* bias;    // nullable: no bias (read only for a non-identity activation)
  const uint32_t* rng;  // as in the forward
  T* dx;
  float* dbias;     // nullable: no bias gradient
  float* partials;  // with dbias, CUDA only: float32 [BiasDropoutDbiasPartials(rows), cols]
  int64_t rows;
  int64_t cols;
  float rate;
  Activation act;
};

// Rows of the dbias partial-sum workspace: one per >= 32 rows, at most 512.
inline int64_t BiasDropoutDbiasPartials(int64_t rows) {
  const int64_t parts = rows / 32;
  return parts < 1 ? 1 : (parts > 512 ? 512 : parts);
}

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
