// The CUDA half of build_info(): reports the nvcc that compiled this translation unit.
#include <string>

#include "build_info.h"

namespace fastdiff {

std::string nvcc_version() {
  return std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__) + "." +
         std::to_string(__CUDACC_VER_BUILD__);
}

}  // namespace fastdiff
