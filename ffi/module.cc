// lsjax._ffi: exports the registered XLA FFI handlers as PyCapsules.
#include <pybind11/pybind11.h>

#include "csrc/embedding.h"
#include "ffi/registry.h"

namespace py = pybind11;

PYBIND11_MODULE(_ffi, m) {
  m.doc() = "lsjax XLA FFI handlers. targets(platform) -> {target_name: capsule}.";
#ifdef LSJAX_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
  m.def(
      "targets",
      [](const std::string& platform) {
        py::dict out;
        for (const auto& t : lsjax::ffi::Targets()) {
          if (t.platform == platform) out[py::str(t.name)] = py::capsule(t.handler);
        }
        return out;
      },
      py::arg("platform"),
      "Handlers for one platform ('cpu' or 'CUDA') as {target_name: PyCapsule}.");
  m.def(
      "embedding_sort_workspace_bytes",
      [](int64_t tokens, int64_t vocab) -> int64_t {
#ifdef LSJAX_WITH_CUDA
        return static_cast<int64_t>(lsjax::EmbeddingSortWorkspaceBytes(tokens, vocab));
#else
        return 0;
#endif
      },
      py::arg("tokens"), py::arg("vocab"),
      "Bytes of the CUDA embedding_sort_fwd workspace result (its radix sort's; 0 without CUDA).");
}
