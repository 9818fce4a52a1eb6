// Static registry of the XLA FFI handlers compiled into lsjax._ffi.
//
// Each ffi/<op>.cc registers its handlers with LSJAX_FFI_TARGET; module.cc
// exports them to Python as {target_name: capsule} per platform. Adding an op
// never touches a shared file.
#pragma once

#include <string>
#include <vector>

namespace lsjax::ffi {

struct Target {
  std::string name;      // e.g. "lsjax_layer_norm_fwd_cpu"
  std::string platform;  // "cpu" or "CUDA" (jax.ffi.register_ffi_target's platform)
  void* handler;         // XLA_FFI_Handler*
};

inline std::vector<Target>& Targets() {
  static std::vector<Target> targets;
  return targets;
}

struct Registrar {
  Registrar(const char* op, const char* platform, const char* suffix, void* handler) {
    Targets().push_back({std::string("lsjax_") + op + "_" + suffix, platform, handler});
  }
};

}  // namespace lsjax::ffi

#define LSJAX_CONCAT_INNER(a, b) a##b
#define LSJAX_CONCAT(a, b) LSJAX_CONCAT_INNER(a, b)

// LSJAX_FFI_TARGET_CPU("layer_norm_fwd", LayerNormFwdCpu) registers the handler
// symbol under the target name "lsjax_layer_norm_fwd_cpu" for platform "cpu".
#define LSJAX_FFI_TARGET_CPU(op, symbol)                                       \
  static ::lsjax::ffi::Registrar LSJAX_CONCAT(lsjax_registrar_, __COUNTER__)( \
      op, "cpu", "cpu", reinterpret_cast<void*>(symbol))
#define LSJAX_FFI_TARGET_CUDA(op, symbol)                                      \
  static ::lsjax::ffi::Registrar LSJAX_CONCAT(lsjax_registrar_, __COUNTER__)( \
      op, "CUDA", "cuda", reinterpret_cast<void*>(symbol))
