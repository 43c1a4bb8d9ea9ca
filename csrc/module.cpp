// The fastdiff._C Python module. Importing it registers the `fastdiff` torch ops; build_info()
// says how it was compiled.
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "build_info.h"
#include "fastdiff_build_config.h"

namespace py = pybind11;

namespace fastdiff {
namespace {

std::vector<std::string> registered_ops() {
  std::vector<std::string> ops;
  for (const c10::OperatorName& op : c10::Dispatcher::singleton().getAllOpNames()) {
    if (op.name.rfind("fastdiff::", 0) != 0) continue;
    ops.push_back(op.overload_name.empty() ? op.name : op.name + "." + op.overload_name);
  }
  std::sort(ops.begin(), ops.end());
  return ops;
}

py::dict build_info() {
  py::dict info;
#if defined(__clang__)
  info["compiler"] = "clang";
  info["compiler_version"] = __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc";
  info["compiler_version"] = __VERSION__;
#else
  info["compiler"] = "unknown";
  info["compiler_version"] = "unknown";
#endif
  info["cxx_standard"] = "c++" + std::to_string(__cplusplus / 100 % 100);
  info["cxx_flags"] = std::vector<std::string> FASTDIFF_CXX_FLAGS;
#if FASTDIFF_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = nvcc_version();
  info["cuda_arch_list"] = std::vector<std::string> FASTDIFF_CUDA_ARCH_LIST;
  info["nvcc_flags"] = std::vector<std::string> FASTDIFF_NVCC_FLAGS;
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_arch_list"] = py::none();
  info["nvcc_flags"] = py::none();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_max_threads"] = py::none();
#endif
  info["torch_version"] = FASTDIFF_TORCH_VERSION;
  info["ops"] = registered_ops();
  return info;
}

}  // namespace
}  // namespace fastdiff

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff's compiled kernels; the ops themselves live in torch.ops.fastdiff";
  m.def("build_info", &fastdiff::build_info,
        "How this extension was compiled: compiler, flags, CUDA, OpenMP, torch, registered ops");
}
