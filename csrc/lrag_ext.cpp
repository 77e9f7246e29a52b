// The compiled module lrag_ext._C: every op schema (one TORCH_LIBRARY block) and the host-side objects
// exposed with pybind11. Kernels register their implementations in csrc/cpu/*.cpp and csrc/cuda/*.cu.
// The CMake build (a plain C++ library for C++ consumers) defines LRAG_NO_PYTHON and keeps only the schemas.
#include <torch/library.h>
#ifndef LRAG_NO_PYTHON
#include <torch/extension.h>
#endif

#include "op_schemas.h"
#include "slot_allocator.h"

#ifndef LRAG_TORCH_VERSION
#define LRAG_TORCH_VERSION "unknown"
#endif
#ifndef LRAG_CUDA_VERSION
#define LRAG_CUDA_VERSION ""
#endif
#ifndef LRAG_CUDA_ARCHS
#define LRAG_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(lrag_ext, m) { lrag::define_op_schemas(m); }

#ifndef LRAG_NO_PYTHON
namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = LRAG_TORCH_VERSION;
#ifdef LRAG_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = LRAG_CUDA_VERSION;
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
  std::vector<std::string> archs;
  std::string all = LRAG_CUDA_ARCHS, cur;
  for (char c : all + ";") {
    if (c == ';' || c == ' ') {
      if (!cur.empty()) archs.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  info["cuda_archs"] = archs;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lrag_ext compiled kernels (ops are registered under torch.ops.lrag_ext)";
  m.def("build_info", &build_info,
        "Build facts: torch_version it was compiled against, cuda (bool), cuda_version, cuda_archs, openmp.");
  lrag::bind_slot_allocator(m);
}
#endif  // LRAG_NO_PYTHON
