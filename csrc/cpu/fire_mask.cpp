// fire_mask on the CPU, plus the test hooks that expose the shared headers
// (philox.h, borders.h) to the Python tests.
#include "fastnca/bindings.h"
#include "fastnca/borders.h"
#include "fastnca/philox.h"

#include <pybind11/stl.h>

namespace fastnca {
namespace {

// out: contiguous bool [B, H, W]; cell index i = (b*H + y)*W + x is the flat index.
void fire_mask_cpu(std::uintptr_t out, int64_t numel, uint64_t seed, uint64_t step,
                   uint32_t threshold) {
  bool* o = ptr<bool>(out);
#ifdef FASTNCA_OPENMP
#pragma omp parallel for schedule(static) if (numel > 16384)
#endif
  for (int64_t i = 0; i < numel; ++i) o[i] = fire(seed, static_cast<uint64_t>(i), step, threshold);
}

}  // namespace
}  // namespace fastnca

FASTNCA_BINDINGS(m) {
  using namespace fastnca;
  using namespace pybind11::literals;
  m.def("fire_mask", &fire_mask_cpu, "out_ptr"_a, "numel"_a, "seed"_a, "step"_a, "threshold"_a);
  m.def("philox4x32_10",
        [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
          const Philox4 r = philox4x32_10(c0, c1, c2, c3, k0, k1);
          return std::vector<uint32_t>{r.v[0], r.v[1], r.v[2], r.v[3]};
        });
  // the 24 fire bits of any cell index (philox.h, shared by the CPU and CUDA kernels), for
  // tests of cells past 2^32 that no test-sized mask reaches
  m.def("fire_bits", [](uint64_t seed, uint64_t cell, uint64_t step) { return fire_bits(seed, cell, step); },
        "seed"_a, "cell"_a, "step"_a);
  m.def("pad_index", &pad_index, "p"_a, "n"_a, "mode"_a);
  m.def("key_index", &key_index, "i"_a, "a"_a, "n"_a, "r"_a, "mode"_a);
  m.def("query_range", [](int j, int a, int n, int r, int mode) {
    int lo, hi;
    query_range(j, a, n, r, mode, &lo, &hi);
    return std::make_pair(lo, hi);
  });
}
