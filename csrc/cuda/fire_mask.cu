// fire_mask on CUDA: one thread per cell, Philox from the shared header.
#include "fastnca/bindings.h"
#include "fastnca/device_cuda.cuh"
#include "fastnca/philox.h"

namespace fastnca {
namespace {

__global__ void fire_mask_kernel(bool* __restrict__ out, int64_t numel, uint64_t seed,
                                 uint64_t step, uint32_t threshold) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < numel) out[i] = fire(seed, static_cast<uint64_t>(i), step, threshold);
}

void fire_mask_cuda(std::uintptr_t out, int64_t numel, uint64_t seed, uint64_t step,
                    uint32_t threshold, std::uintptr_t stream) {
  if (numel == 0) return;
  constexpr int kThreads = 256;
  launch("fire_mask", fire_mask_kernel, grid_1d(ceil_div(numel, kThreads), "fire_mask (cuda)"), dim3(kThreads), 0,
         as_stream(stream), ptr<bool>(out), numel, seed, step, threshold);
}

}  // namespace
}  // namespace fastnca

FASTNCA_BINDINGS(m) {
  using namespace pybind11::literals;
  m.def("fire_mask", &fastnca::fire_mask_cuda, "out_ptr"_a, "numel"_a, "seed"_a, "step"_a,
        "threshold"_a, "stream"_a);
}
