// Index maps for the 3x3 perception padding modes and the neighbourhood-attention
// border modes. One definition for CPU and CUDA kernels (the Python reference and the
// Triton kernels implement the same maps and are tested against each other).
#pragma once
#include "fastnca/common.h"

namespace fastnca {

// v mod n in [0, n) for any int v and n >= 1, without forming v % n + n (which overflows
// int once n > 2^30).
FASTNCA_HD int wrap_index(int v, int n) {
  const int m = v % n;
  return m < 0 ? m + n : m;
}

// ---- perception padding (nca_step) -------------------------------------------------
// Codes shared with python/fastnca/_ext.py.
enum Padding : int { kPadZeros = 0, kPadReflect = 1, kPadReplicate = 2, kPadCircular = 3 };

// Source coordinate read by padded coordinate p (p in [-1, n], i.e. pad 1) along an axis
// of length n, or -1 when the read is a zero (Padding::kPadZeros outside the grid).
// Reflect needs n >= 2 (as torch.nn.functional.pad); the launcher checks it.
FASTNCA_HD int pad_index(int p, int n, int mode) {
  if (p >= 0 && p < n) return p;
  switch (mode) {
    case kPadReflect: return p < 0 ? -p : (n - 1) - (p - (n - 1));  // not 2 * (n - 1) - p: int overflow
    case kPadReplicate: return p < 0 ? 0 : n - 1;
    case kPadCircular: return wrap_index(p, n);
    default: return -1;
  }
}

// ---- attention borders (neighborhood_attention2d) ----------------------------------
enum Border : int { kBorderZeros = 0, kBorderMask = 1, kBorderCircular = 2, kBorderShift = 3 };

// Key coordinate along one axis for query coordinate i and window offset a in [-r, r],
// or -1 when the neighbour lies outside the grid (zeros: zero key with logit 0 and zero
// value; mask: left out of the softmax). Shift needs n >= 2r + 1.
FASTNCA_HD int key_index(int i, int a, int n, int r, int mode) {
  switch (mode) {
    case kBorderCircular: return wrap_index(i + a, n);
    case kBorderShift: {
      const int c = i < r ? r : (i > n - 1 - r ? n - 1 - r : i);
      return c + a;
    }
    default: {
      const int k = i + a;
      return (k >= 0 && k < n) ? k : -1;
    }
  }
}

// Queries that read key coordinate j through offset a: every query i with
// key_index(i, a, n, r, mode) == j lies in [j - 2r, j + 2r] for shift and at
// (j - a) mod n otherwise. Backward kernels gather over these (deterministic, no
// atomics); this helper returns the first and last candidate i to scan for offset a.
FASTNCA_HD void query_range(int j, int a, int n, int r, int mode, int* lo, int* hi) {
  if (mode == kBorderShift) {
    *lo = j - 2 * r < 0 ? 0 : j - 2 * r;
    *hi = j + 2 * r > n - 1 ? n - 1 : j + 2 * r;
  } else if (mode == kBorderCircular) {
    *lo = *hi = wrap_index(j - a, n);
  } else {
    *lo = *hi = j - a;  // may be outside [0, n): callers skip it
  }
}

}  // namespace fastnca
