// lsjax._ffi: exports the registered XLA FFI handlers as PyCapsules.
#include <pybind11/pybind11.h>

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
}
