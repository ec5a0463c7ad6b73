// Device-side helpers of the fastnca CUDA kernels: storage <-> float32 conversions,
// cooperative staging into shared memory, thread-group sums, launch and device queries.
//
// The same kernel sources also compile as plain C++ against a host emulation of the CUDA
// built-ins they use (FASTNCA_CUDA_EMULATION, see emulation_cuda.cuh): that is how their
// logic is tested on machines without a GPU. Kernels therefore use only the built-ins the
// emulation provides (threadIdx/blockIdx/blockDim/gridDim, __syncthreads,
// __syncthreads_or, __shfl_xor_sync) and declare dynamic shared memory through
// FASTNCA_DYNAMIC_SMEM.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include "fastnca/common.h"

#if defined(FASTNCA_CUDA_EMULATION)
#include "fastnca/emulation_cuda.cuh"
#define FASTNCA_DEVICE inline
#define FASTNCA_DYNAMIC_SMEM(name) float4* name = ::fastnca_emu::dynamic_smem()
#else
#include "fastnca/cuda_check.h"
#define FASTNCA_DEVICE __device__ __forceinline__
#define FASTNCA_DYNAMIC_SMEM(name) extern __shared__ float4 name[]
#endif

namespace fastnca {

// ---- storage types --------------------------------------------------------------------
// Kernels are templated on the storage type and compute in float32.
FASTNCA_DEVICE float to_float(float v) { return v; }
FASTNCA_DEVICE float to_float(__half v) { return __half2float(v); }
FASTNCA_DEVICE float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> FASTNCA_DEVICE T from_float(float v);
template <> FASTNCA_DEVICE float from_float<float>(float v) { return v; }
template <> FASTNCA_DEVICE __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> FASTNCA_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T> FASTNCA_DEVICE float load(const T* p) { return to_float(*p); }
template <typename T> FASTNCA_DEVICE void store(T* p, float v) { *p = from_float<T>(v); }

// ---- cooperative staging --------------------------------------------------------------
// Copy n floats from global to shared memory with the whole block (float4 when the source
// allows it; dst must be 16-byte aligned). Callers put __syncthreads() around it.
FASTNCA_DEVICE void stage_copy(float* dst, const float* __restrict__ src, int n) {
  const int tid = threadIdx.x, nt = blockDim.x;
  if ((reinterpret_cast<std::uintptr_t>(src) & 15) == 0 && (n & 3) == 0) {
    const float4* s4 = reinterpret_cast<const float4*>(src);
    float4* d4 = reinterpret_cast<float4*>(dst);
    for (int i = tid; i < (n >> 2); i += nt) d4[i] = s4[i];
  } else {
    for (int i = tid; i < n; i += nt) dst[i] = src[i];
  }
}

// ---- thread groups --------------------------------------------------------------------
// A group is G consecutive lanes of one warp (G a power of two <= 32). The mask names only
// the group's lanes, so a group may leave the kernel while others of its warp go on.
FASTNCA_DEVICE unsigned group_mask(int G) {
  if (G >= 32) return 0xffffffffu;
  const int base = static_cast<int>(threadIdx.x & 31u) & ~(G - 1);
  return ((1u << G) - 1u) << base;
}

// Butterfly sum over the group: every lane gets the total, always in the same order.
FASTNCA_DEVICE float group_sum(float v, unsigned mask, int G) {
  for (int off = G >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(mask, v, off, G);
  return v;
}

// ---- host side ------------------------------------------------------------------------
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A one-dimensional grid of `blocks` blocks (at least one), or an error naming the op past
// gridDim.x's limit of 2^31 - 1.
inline dim3 grid_1d(int64_t blocks, const char* op) {
  if (blocks > 0x7fffffff)
    throw std::invalid_argument(std::string("fastnca ") + op +
                                ": too much work for one launch (more than 2^31 - 1 blocks of threads)");
  return dim3(static_cast<unsigned>(blocks < 1 ? 1 : blocks));
}

inline void cuda_ok(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fastnca CUDA: ") + what + " failed: " +
                             cudaGetErrorString(err));
}

struct DeviceInfo {
  int sms;         // multiprocessors
  int smem_optin;  // most dynamic shared memory one block may opt in to (bytes)
};

#if !defined(FASTNCA_CUDA_EMULATION)
// The current device's properties, queried once per device.
inline DeviceInfo device_info() {
  int dev = 0;
  cuda_ok(cudaGetDevice(&dev), "cudaGetDevice");
  static std::mutex mu;
  static std::map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  DeviceInfo info{};
  cuda_ok(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev),
          "cudaDeviceGetAttribute(MultiProcessorCount)");
  cuda_ok(cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
          "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  cache.emplace(dev, info);
  return info;
}

// Return how many blocks of `threads` threads with `smem` bytes of dynamic shared memory fit
// on one multiprocessor. The first call per (kernel, device) opts the kernel in to all the
// dynamic shared memory the device allows (needed above 48 KB), once: callers launching
// with different sizes, from several threads too, never lower each other's limit.
template <typename... KArgs>
inline int prepare_kernel(void (*kernel)(KArgs...), int threads, size_t smem) {
  int dev = 0;
  cuda_ok(cudaGetDevice(&dev), "cudaGetDevice");
  const void* fn = reinterpret_cast<const void*>(kernel);
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> opted_in;
  static std::map<std::tuple<const void*, int, int, size_t>, int> occupancy;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(fn, dev, threads, smem);
  auto it = occupancy.find(key);
  if (it != occupancy.end()) return it->second;
  if (!opted_in.count({fn, dev})) {
    cudaFuncAttributes attr{};
    cuda_ok(cudaFuncGetAttributes(&attr, fn), "cudaFuncGetAttributes");
    const int limit = device_info().smem_optin - static_cast<int>(attr.sharedSizeBytes);
    cuda_ok(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, limit),
            "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
    opted_in.insert({fn, dev});
  }
  int blocks = 0;
  cuda_ok(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  occupancy.emplace(key, blocks);
  return blocks;
}

template <typename... KArgs, typename... Args>
inline void launch(const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args... args) {
  kernel<<<grid, block, smem, stream>>>(args...);
  check_launch(name);
}
#else
// Emulation: a pretend device with few multiprocessors (so that persistent grids loop),
// blocks run one after another on host threads.
inline DeviceInfo device_info() { return DeviceInfo{3, 227 * 1024}; }
template <typename... KArgs>
inline int prepare_kernel(void (*)(KArgs...), int, size_t smem) {
  return smem <= 227 * 1024 ? 1 : 0;
}
template <typename... KArgs, typename... Args>
inline void launch(const char*, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t, Args... args) {
  ::fastnca_emu::run(kernel, grid, block, smem, args...);
}
inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
#endif

}  // namespace fastnca
