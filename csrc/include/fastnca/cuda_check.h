// Error handling for CUDA launches: a failed launch raises a Python RuntimeError that
// names the kernel, instead of surfacing later in an unrelated torch call.
#pragma once
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>

namespace fastnca {

inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fastnca CUDA kernel ") + kernel + " failed to launch: " +
                             cudaGetErrorString(err));
}

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace fastnca
