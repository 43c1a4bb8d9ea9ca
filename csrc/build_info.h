// How this extension was built. fastdiff_build_config.h is written by setup.py into build/.
#pragma once

#include <string>

namespace fastdiff {

// Version of the nvcc that compiled the CUDA sources, e.g. "13.0.88". Defined in
// build_info_cuda.cu, so only present when FASTDIFF_WITH_CUDA is 1.
std::string nvcc_version();

}  // namespace fastdiff
