// Index maps of the nca_step CUDA kernels that are plain integer logic (host and device):
// which output cells read a source cell through the padded 3x3 perception, used by the
// backward's conv-transpose gather. Built on pad_index (borders.h), so it follows every
// padding mode by construction.
#pragma once
#include "fastnca/borders.h"

namespace fastnca {

// Output coordinates q along an axis of length n whose perception tap d in {-1, 0, 1}
// reads source coordinate s, i.e. pad_index(q + d, n, mode) == s. Padded coordinates are
// q + d in [-1, n]; those in [0, n) read themselves, so the only readers are q = s - d
// (when in range) and the two border reads q = 0, d = -1 (padded -1) and q = n - 1,
// d = +1 (padded n). Writes them to *q0, *q1 and returns how many (0..2).
FASTNCA_HD int perception_readers(int s, int d, int n, int mode, int* q0, int* q1) {
  int first = -1, second = -1, count = 0;
  const int direct = s - d;
  if (direct >= 0 && direct < n) {
    first = direct;
    count = 1;
  }
  int border = -1;
  if (d < 0 && pad_index(-1, n, mode) == s) border = 0;
  if (d > 0 && pad_index(n, n, mode) == s) border = n - 1;
  if (border >= 0) {
    if (count == 0) first = border; else second = border;
    ++count;
  }
  *q0 = first;
  *q1 = second;
  return count;
}

}  // namespace fastnca
