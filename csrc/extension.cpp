// The Python module densenet_fast._C.  Loading it registers the torch ops
// (torch.ops.densenet_fast.*, defined in ops/); the module itself only reports
// how it was built.  It needs pybind11 alone, not torch/extension.h (a minute
// of compile time on two cores).
#include <pybind11/pybind11.h>

namespace {

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "densenet_fast C++/CUDA extension; its ops are registered as torch.ops.densenet_fast.*";
  m.def("has_cuda", &has_cuda, "Whether the CUDA kernels were compiled into this extension.");
}
