// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11)
// and the fire-mask draw of fastnca. One definition for CPU and CUDA kernels; the
// Python reference and the Triton kernel implement the same arithmetic and are tested
// against the same known-answer vectors (DESIGN.md, Op 1).
#pragma once
#include "fastnca/common.h"

namespace fastnca {

struct Philox4 {
  uint32_t v[4];
};

FASTNCA_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// Ten rounds; key = (k0, k1), counter = (c0, c1, c2, c3).
FASTNCA_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                 uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += kW0; k1 += kW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The fire mask of DESIGN.md: cell i = (b*H + y)*W + x of step `step` updates iff
// u < update_prob, with u = (out0 >> 8) * 2^-24 from key (seed lo, seed hi) and
// counter (i lo, i hi, step lo, 0). Since u = k * 2^-24 with integer k, u < p is
// exactly k < ceil(p * 2^24): callers pass that integer threshold (computed once in
// Python from the float64 update_prob), so every backend agrees bit for bit.
FASTNCA_HD uint32_t fire_bits(uint64_t seed, uint64_t cell, uint64_t step) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(cell), static_cast<uint32_t>(cell >> 32),
                                  static_cast<uint32_t>(step), 0u,
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return r.v[0] >> 8;
}

FASTNCA_HD bool fire(uint64_t seed, uint64_t cell, uint64_t step, uint32_t threshold) {
  return fire_bits(seed, cell, step) < threshold;
}

}  // namespace fastnca
