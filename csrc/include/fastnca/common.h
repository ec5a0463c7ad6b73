// Shared definitions for the CPU and CUDA kernels of fastnca.
// Everything here is usable from host and device code.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTNCA_HD __host__ __device__ __forceinline__
#else
#define FASTNCA_HD inline
#endif

namespace fastnca {

// dtype codes passed from Python (fastnca/_ext.py keeps the same table).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

}  // namespace fastnca
