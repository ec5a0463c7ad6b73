// nca_step on CUDA: the fused forward and the recompute backward (DESIGN.md, Op 2).
//
// Assumptions (python/fastnca/kernels/cuda/nca_step.py checks every one):
//   * state, out, grad_out, d_state: [B, C, H, W] of T in {float, __half, __nv_bfloat16}
//     with any non-negative element strides; out does not alias state; d_state does not
//     alias state but may be grad_out itself (same strides): only the main kernel reads
//     grad_out and only the last one writes d_state, in stream order.
//   * a call may cover a batch chunk of a larger state (pointers at its first item): the
//     fire mask of local cell n is that of global cell cell0 + n.
//   * weights fp32, contiguous, arranged by the launcher (layouts in `Weights`); every
//     arranged weight starts 16-byte aligned (fresh torch allocations).
//   * groups in {1, C}; reflect padding only with H, W >= 2; 1 <= F; depthwise F <= 25.
//   * sizes fit in int except B*H*W and offsets, which use int64.
//
// Forward: one thread per cell (two on the fast path, CPT = 2). A block owns a tile of
// consecutive cells (b, y, x order), copies the ones that do not fire, and runs the MLP on a
// compacted list of the firing ones only (about update_prob of the work, list_firing). Per-cell vectors that do not fit in registers live in
// shared memory as one column per cell ([row][cell], conflict-free for thread-per-cell
// access): the perception P ([K][S]) and the fc2 accumulator ([Cu][S]). Outputs are
// computed kChunk = 32 at a time in registers, so any C and hidden size work; weights are
// staged through one shared buffer of `nstage` floats and read as warp-wide broadcasts.
//
// Backward (recompute, deterministic, no float atomics), three kernels + reductions:
//   1. main: per tile (firing cells only, compacted as in the forward), recompute P and z; per hidden chunk dh, dz, accumulate
//      dP = dz @ w1 in shared memory, and add the tile's dz^T [P|1] and gd^T [h|1] into the
//      block's own slice of a partial buffer (persistent grid, fixed tile order). Writes
//      ws = [g + dP[:C] ; dQ] channel-major [K][N] (fp32 workspace).
//   2. conv_grad: d_pw, d_pb = dQ^T [patch | 1], a split-K GEMM over cells; each
//      (weight tile, cell range) block writes its own partial.
//   3. state_grad: d_state = ws[:C] + the adjoint of the padded 3x3 conv, as a gather:
//      each source cell finds the (output cell, tap) pairs that read it with
//      perception_readers (pad_index) and sums dQ(output) . pw(tap).
//   4. reduce_parts: sums the partials over blocks in a fixed order.
// The launcher runs 1-4 per batch chunk to bound the workspace (cell0 offsets the mask)
// and adds the chunks' weight gradients in chunk order.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <pybind11/stl.h>

#include "fastnca/bindings.h"
#include "fastnca/borders.h"
#include "fastnca/device_cuda.cuh"
#include "fastnca/nca_step_cuda.cuh"
#include "fastnca/philox.h"

namespace fastnca {
namespace {

constexpr int kChunk = 32;        // outputs per register pass (weights padded to it)
constexpr int kThreads = 128;     // threads of the thread-per-cell kernels (at most)
constexpr int kStageFloats = 4608;  // shared weight staging buffer: 18 KB
constexpr int kGemmThreads = 256;   // conv_grad kernels
constexpr int kTileO = 64, kTileJ = 64, kTileS = 32;  // conv_grad (groups=1) tile
constexpr int kDwMaxF = 25;         // depthwise conv_grad: one thread per (o, tap)

struct Dims {
  int B, C, H, W;
  int F, FC, K;     // filters per channel, F*C, (F+1)*C
  int HD, HDP;      // hidden size, rounded up to kChunk
  int frozen, Cu;   // frozen channels, C - frozen
  int depthwise;    // groups == C (else groups == 1)
  int padding;      // Padding code (borders.h)
  int64_t N;        // B*H*W cells
};

struct Weights {    // fp32, contiguous, arranged by the launcher
  const float* pw;   // groups=1: [ceil(FC/32)][C][9][32], pw[oc][c][t][i] = W[oc*32+i][c][t]
                     // depthwise: [FC][9]
  const float* pb;   // [ceil(FC/32)*32], zero padded
  const float* w1;   // [HDP/32][K][32], w1[jc][k][i] = fc1_weight[jc*32+i][k]
  const float* b1;   // [HDP], zero padded
  const float* w2;   // [HDP/32][Cu][32], w2[jc][c][i] = fc2_weight[c][jc*32+i]
  const float* b2;   // [Cu]
  const float* pwt;  // backward, groups=1: [ceil(C/32)][9][FC][32],
                     // pwt[cc][t][o][i] = W[o][cc*32+i][t]; depthwise: [FC][9]
};

struct Strides4 {
  int64_t b, c, h, w;
};

struct Rng {
  uint64_t seed, step;
  uint32_t threshold;
  uint64_t cell0;  // fire-mask index of cell 0 (a batch chunk's first cell; 0 for a whole call)
};

// A cell's coordinates and the offsets of its padded 3x3 neighbourhood in one tensor.
struct Nb {
  int64_t cell;             // (b*H + y)*W + x, or -1 for an idle slot
  int b, y, x;
  int64_t base;             // b * stride_b
  int64_t row[3], col[3];   // offsets of padded rows y-1..y+1 / cols x-1..x+1, -1: zero read
};

FASTNCA_DEVICE Nb make_nb(int64_t cell, const Dims& d, const Strides4& s) {
  Nb nb;
  if (cell < d.N) {
    nb.cell = cell;
    nb.x = static_cast<int>(cell % d.W);
    const int64_t t = cell / d.W;
    nb.y = static_cast<int>(t % d.H);
    nb.b = static_cast<int>(t / d.H);
    nb.base = nb.b * s.b;
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      const int yy = pad_index(nb.y + i - 1, d.H, d.padding);
      const int xx = pad_index(nb.x + i - 1, d.W, d.padding);
      nb.row[i] = yy < 0 ? -1 : yy * s.h;
      nb.col[i] = xx < 0 ? -1 : xx * s.w;
    }
  } else {
    nb.cell = -1;
    nb.b = nb.y = nb.x = 0;
    nb.base = 0;
#pragma unroll
    for (int i = 0; i < 3; ++i) nb.row[i] = nb.col[i] = -1;
  }
  return nb;
}

FASTNCA_DEVICE int64_t offset_of(const Strides4& s, int b, int c, int y, int x) {
  return b * s.b + c * s.c + y * s.h + x * s.w;
}

// The 3x3 padded neighbourhood of channel offset `coff` (= c * stride_c), taps row-major.
template <typename T>
FASTNCA_DEVICE void gather9(const T* __restrict__ x, const Nb& nb, int64_t coff, float v[9]) {
#pragma unroll
  for (int i = 0; i < 3; ++i)
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      const bool inside = nb.row[i] >= 0 && nb.col[j] >= 0;
      v[i * 3 + j] = inside ? load(x + nb.base + coff + nb.row[i] + nb.col[j]) : 0.f;
    }
}

// acc[r][0..32) += w[0..32) * v[r]; w in shared memory (broadcast float4 reads).
template <int CPT>
FASTNCA_DEVICE void axpy_chunk(float (&acc)[CPT][kChunk], const float* w, const float (&v)[CPT]) {
  const float4* w4 = reinterpret_cast<const float4*>(w);
#pragma unroll
  for (int i = 0; i < kChunk / 4; ++i) {
    const float4 q = w4[i];
#pragma unroll
    for (int r = 0; r < CPT; ++r) {
      acc[r][4 * i + 0] = fmaf(q.x, v[r], acc[r][4 * i + 0]);
      acc[r][4 * i + 1] = fmaf(q.y, v[r], acc[r][4 * i + 1]);
      acc[r][4 * i + 2] = fmaf(q.z, v[r], acc[r][4 * i + 2]);
      acc[r][4 * i + 3] = fmaf(q.w, v[r], acc[r][4 * i + 3]);
    }
  }
}

// <w[0..32), h[0..32)> with four partial sums (fixed order).
FASTNCA_DEVICE float dot_chunk(const float* w, const float (&h)[kChunk]) {
  const float4* w4 = reinterpret_cast<const float4*>(w);
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma unroll
  for (int i = 0; i < kChunk / 4; ++i) {
    const float4 q = w4[i];
    s0 = fmaf(q.x, h[4 * i + 0], s0);
    s1 = fmaf(q.y, h[4 * i + 1], s1);
    s2 = fmaf(q.z, h[4 * i + 2], s2);
    s3 = fmaf(q.w, h[4 * i + 3], s3);
  }
  return (s0 + s1) + (s2 + s3);
}

// P[k][slot] for k < K: the state (k < C) and the 3x3 perception conv (k >= C) of each cell
// of the tile. Slot of the r-th cell of a thread: r * blockDim.x + threadIdx.x.
template <typename T, int CPT>
FASTNCA_DEVICE void perceive(const T* __restrict__ x, const Strides4& xs, const Dims& d,
                             const Weights& w, const Nb (&nb)[CPT], float* P, int ld, float* stage,
                             int nstage) {
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int c = 0; c < d.C; ++c)
#pragma unroll
    for (int r = 0; r < CPT; ++r)
      P[c * ld + r * nt + tid] =
          nb[r].cell >= 0 ? load(x + nb[r].base + c * xs.c + nb[r].row[1] + nb[r].col[1]) : 0.f;

  if (!d.depthwise) {
    // Q[o] = pb[o] + sum_{c, t} W[o][c][t] * x[c](tap t): 32 outputs in registers, input
    // channels streamed through the staging buffer `cpc` at a time.
    const int cpc = nstage / (9 * kChunk);
    const int nchunks = (d.FC + kChunk - 1) / kChunk;
    for (int oc = 0; oc < nchunks; ++oc) {
      float acc[CPT][kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const float bias = w.pb[oc * kChunk + i];
#pragma unroll
        for (int r = 0; r < CPT; ++r) acc[r][i] = bias;
      }
      for (int c0 = 0; c0 < d.C; c0 += cpc) {
        const int cn = min(cpc, d.C - c0);
        __syncthreads();
        stage_copy(stage, w.pw + (static_cast<int64_t>(oc) * d.C + c0) * 9 * kChunk, cn * 9 * kChunk);
        __syncthreads();
        for (int cl = 0; cl < cn; ++cl) {
          float v[CPT][9];
#pragma unroll
          for (int r = 0; r < CPT; ++r) gather9(x, nb[r], (c0 + cl) * xs.c, v[r]);
#pragma unroll
          for (int t = 0; t < 9; ++t) {
            float vt[CPT];
#pragma unroll
            for (int r = 0; r < CPT; ++r) vt[r] = v[r][t];
            axpy_chunk<CPT>(acc, stage + (cl * 9 + t) * kChunk, vt);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const int o = oc * kChunk + i;
        if (o < d.FC)
#pragma unroll
          for (int r = 0; r < CPT; ++r) P[(d.C + o) * ld + r * nt + tid] = acc[r][i];
      }
    }
  } else {
    // Depthwise: Q[c*F + f] = pb + sum_t W[c*F+f][t] * x[c](tap t).
    const int per = d.F * 9;
    const int cpc = max(1, nstage / per);
    for (int c0 = 0; c0 < d.C; c0 += cpc) {
      const int cn = min(cpc, d.C - c0);
      __syncthreads();
      stage_copy(stage, w.pw + static_cast<int64_t>(c0) * per, cn * per);
      __syncthreads();
      for (int cl = 0; cl < cn; ++cl) {
        const int c = c0 + cl;
        float v[CPT][9];
#pragma unroll
        for (int r = 0; r < CPT; ++r) gather9(x, nb[r], c * xs.c, v[r]);
        for (int f = 0; f < d.F; ++f) {
          const int o = c * d.F + f;
          const float* wo = stage + (cl * d.F + f) * 9;
          const float bias = w.pb[o];
#pragma unroll
          for (int r = 0; r < CPT; ++r) {
            float q = bias;
#pragma unroll
            for (int t = 0; t < 9; ++t) q = fmaf(wo[t], v[r][t], q);
            P[(d.C + o) * ld + r * nt + tid] = q;
          }
        }
      }
    }
  }
}

// z[r][i] = b1[jc*32 + i] + sum_k w1[jc*32 + i][k] * P[k][slot_r]  (pre-activation chunk).
template <int CPT>
FASTNCA_DEVICE void fc1_chunk(const Dims& d, const Weights& w, int jc, const float* P, int ld,
                              float* stage, int nstage, float (&z)[CPT][kChunk]) {
  const int tid = threadIdx.x, nt = blockDim.x;
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const float bias = w.b1[jc * kChunk + i];
#pragma unroll
    for (int r = 0; r < CPT; ++r) z[r][i] = bias;
  }
  const int kpc = nstage / kChunk;
  for (int k0 = 0; k0 < d.K; k0 += kpc) {
    const int kn = min(kpc, d.K - k0);
    __syncthreads();
    stage_copy(stage, w.w1 + (static_cast<int64_t>(jc) * d.K + k0) * kChunk, kn * kChunk);
    __syncthreads();
    for (int kl = 0; kl < kn; ++kl) {
      float p[CPT];
#pragma unroll
      for (int r = 0; r < CPT; ++r) p[r] = P[(k0 + kl) * ld + r * nt + tid];
      axpy_chunk<CPT>(z, stage + kl * kChunk, p);
    }
  }
}

// ---- firing-cell compaction ------------------------------------------------------------------
// Only firing cells run the MLP (about update_prob of them): a block takes a candidate tile
// of T cells, lists its firing ones, and processes the list in passes of S = threads * CPT
// slots; T is chosen on the host so that one pass usually holds them all (plan_tile).

constexpr int kMaxCandidatesPerThread = 32;  // T <= 32 * threads (one bit each)
constexpr int kMaxTileFactor = 8;            // T <= kMaxTileFactor * slots (plan_tile)
static_assert(kMaxTileFactor * 2 <= kMaxCandidatesPerThread, "candidates of a thread must fit the bit mask");

struct Firing {
  uint32_t bits;  // bit i: candidate tid + i*threads fires
  int count;      // firing cells of the tile
};

// list[0..count) = offsets from c0 of the tile's firing cells, in a fixed order (thread-major,
// from a block-wide scan: deterministic). `scan` holds blockDim.x ints, `list` T ints.
FASTNCA_DEVICE Firing list_firing(int64_t c0, int T, const Dims& d, const Rng& rng, int* scan, int* list) {
  const int tid = threadIdx.x, nt = blockDim.x;
  Firing f{0u, 0};
  int mine = 0;
  for (int i = 0; tid + i * nt < T; ++i) {
    const int64_t cell = c0 + tid + i * nt;
    if (cell < d.N && fire(rng.seed, rng.cell0 + static_cast<uint64_t>(cell), rng.step, rng.threshold)) {
      f.bits |= 1u << i;
      ++mine;
    }
  }
  scan[tid] = mine;
  __syncthreads();
  for (int off = 1; off < nt; off <<= 1) {  // inclusive Hillis-Steele scan
    const int v = tid >= off ? scan[tid - off] : 0;
    __syncthreads();
    scan[tid] += v;
    __syncthreads();
  }
  int pos = scan[tid] - mine;
  f.count = scan[nt - 1];
  for (int i = 0; tid + i * nt < T; ++i)
    if (f.bits >> i & 1u) list[pos++] = tid + i * nt;
  __syncthreads();  // list complete; scan free for the next tile
  return f;
}

// ---- forward ----------------------------------------------------------------------------

template <typename T, int CPT>
__global__ void __launch_bounds__(kThreads)
nca_forward_kernel(const T* __restrict__ x, Strides4 xs, T* __restrict__ out, Strides4 os, Dims d,
                   Weights w, Rng rng, int nstage, int tile) {
  FASTNCA_DYNAMIC_SMEM(smem4);
  float* stage = reinterpret_cast<float*>(smem4);
  const int tid = threadIdx.x, nt = blockDim.x, ld = nt * CPT;
  float* P = stage + nstage;                       // [K][ld]
  float* D = P + static_cast<int64_t>(d.K) * ld;   // [Cu][ld]: fc2 output (delta)
  int* scan = reinterpret_cast<int*>(D + static_cast<int64_t>(d.Cu) * ld);  // [nt]
  int* list = scan + nt;                                                    // [tile]
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * tile;

  const Firing f = list_firing(c0, tile, d, rng, scan, list);
  for (int i = 0; tid + i * nt < tile; ++i) {  // cells that do not fire keep their state
    const int64_t cell = c0 + tid + i * nt;
    if (cell >= d.N || (f.bits >> i & 1u)) continue;
    const Nb nb = make_nb(cell, d, xs);
    for (int c = 0; c < d.C; ++c)
      store(out + offset_of(os, nb.b, c, nb.y, nb.x),
            load(x + nb.base + c * xs.c + nb.row[1] + nb.col[1]));
  }

  for (int base = 0; base < f.count; base += ld) {
    Nb nb[CPT];
#pragma unroll
    for (int r = 0; r < CPT; ++r) {
      const int s = base + r * nt + tid;
      nb[r] = make_nb(s < f.count ? c0 + list[s] : d.N, d, xs);  // d.N: an idle slot
    }
    __syncthreads();  // the previous pass's readers of P and D are done
    perceive<T, CPT>(x, xs, d, w, nb, P, ld, stage, nstage);
    for (int c = 0; c < d.Cu; ++c) {
      const float bias = w.b2[c];
#pragma unroll
      for (int r = 0; r < CPT; ++r) D[c * ld + r * nt + tid] = bias;
    }
    const int cpc = nstage / kChunk;
    for (int jc = 0; jc < d.HDP / kChunk; ++jc) {
      float h[CPT][kChunk];
      fc1_chunk<CPT>(d, w, jc, P, ld, stage, nstage, h);
#pragma unroll
      for (int r = 0; r < CPT; ++r)
#pragma unroll
        for (int i = 0; i < kChunk; ++i) h[r][i] = h[r][i] < 0.f ? 0.f : h[r][i];  // ReLU keeping NaN (fmaxf drops it)
      for (int k0 = 0; k0 < d.Cu; k0 += cpc) {
        const int cn = min(cpc, d.Cu - k0);
        __syncthreads();
        stage_copy(stage, w.w2 + (static_cast<int64_t>(jc) * d.Cu + k0) * kChunk, cn * kChunk);
        __syncthreads();
        for (int cl = 0; cl < cn; ++cl)
#pragma unroll
          for (int r = 0; r < CPT; ++r)
            D[(k0 + cl) * ld + r * nt + tid] += dot_chunk(stage + cl * kChunk, h[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < CPT; ++r) {
      if (nb[r].cell < 0) continue;
      const int slot = r * nt + tid;
      for (int c = 0; c < d.C; ++c) {
        float v = P[c * ld + slot];
        if (c >= d.frozen) v += D[(c - d.frozen) * ld + slot];
        store(out + offset_of(os, nb[r].b, c, nb[r].y, nb[r].x), v);
      }
    }
  }
}

// ---- backward 1: recompute, dP, fc weight partials ----------------------------------------

// part[a*ldp + b] += sum_{s < S} A[a*ld + s] * B[b*ld + s] for a < na, b < nb: the tile's
// contribution to a weight gradient, in a fixed order. Thread t owns a 4x4 set of
// elements strided by (ma, mb), so a warp reads 32 different rows of B at one column
// (conflict-free: ld = S + 1 with S a multiple of 32) and a few broadcast rows of A.
FASTNCA_DEVICE void accumulate_outer(float* __restrict__ part, int ldp, const float* A, int na,
                                     const float* B, int nb, int ld, int S) {
  constexpr int RA = 4, RB = 4;
  const int ma = (na + RA - 1) / RA, mb = (nb + RB - 1) / RB;
  for (int t = threadIdx.x; t < ma * mb; t += blockDim.x) {
    const int ia = t / mb, ib = t % mb;
    const float* arow[RA];
    const float* brow[RB];
#pragma unroll
    for (int u = 0; u < RA; ++u) arow[u] = A + min(ia + u * ma, na - 1) * ld;
#pragma unroll
    for (int v = 0; v < RB; ++v) brow[v] = B + min(ib + v * mb, nb - 1) * ld;
    float acc[RA][RB] = {};
    for (int s = 0; s < S; ++s) {
      float av[RA], bv[RB];
#pragma unroll
      for (int u = 0; u < RA; ++u) av[u] = arow[u][s];
#pragma unroll
      for (int v = 0; v < RB; ++v) bv[v] = brow[v][s];
#pragma unroll
      for (int u = 0; u < RA; ++u)
#pragma unroll
        for (int v = 0; v < RB; ++v) acc[u][v] = fmaf(av[u], bv[v], acc[u][v]);
    }
#pragma unroll
    for (int u = 0; u < RA; ++u)
#pragma unroll
      for (int v = 0; v < RB; ++v) {
        const int a = ia + u * ma, b = ib + v * mb;
        if (a < na && b < nb) part[a * ldp + b] += acc[u][v];
      }
  }
}

// Partial layout per block: [HD][K+1] (d_w1 | d_b1) then [Cu][HD+1] (d_w2 | d_b2).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
nca_backward_main_kernel(const T* __restrict__ g, Strides4 gs, const T* __restrict__ x, Strides4 xs,
                         Dims d, Weights w, Rng rng, int nstage, int tile, float* __restrict__ ws,
                         float* __restrict__ part, int64_t part_stride) {
  FASTNCA_DYNAMIC_SMEM(smem4);
  float* stage = reinterpret_cast<float*>(smem4);
  const int tid = threadIdx.x, nt = blockDim.x, S = nt, ld = S + 1;
  float* P = stage + nstage;                            // [K+1][ld], row K = 1 (bias grads)
  float* G = P + static_cast<int64_t>(d.K + 1) * ld;    // [Cu][ld]: grad of updated channels
  float* dP = G + static_cast<int64_t>(d.Cu) * ld;      // [K][ld]
  float* Hc = dP + static_cast<int64_t>(d.K) * ld;      // [32][ld]: h of the hidden chunk
  float* Zc = Hc + kChunk * ld;                         // [32][ld]: dz of the hidden chunk
  int* scan = reinterpret_cast<int*>(Zc + kChunk * ld); // [nt]
  int* list = scan + nt;                                // [tile]
  float* part_w1 = part + blockIdx.x * part_stride;
  float* part_w2 = part_w1 + static_cast<int64_t>(d.HD) * (d.K + 1);
  const int cpc = nstage / kChunk;
  const int64_t ntiles = (d.N + tile - 1) / tile;

  for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
    const int64_t c0 = t * tile;
    const Firing f = list_firing(c0, tile, d, rng, scan, list);
    // Cells that do not fire: dP = 0, so ws = [g ; 0].
    for (int i = 0; tid + i * nt < tile; ++i) {
      const int64_t cell = c0 + tid + i * nt;
      if (cell >= d.N || (f.bits >> i & 1u)) continue;
      const Nb nb = make_nb(cell, d, xs);
      for (int k = 0; k < d.K; ++k)
        ws[k * d.N + cell] = k < d.C ? load(g + offset_of(gs, nb.b, k, nb.y, nb.x)) : 0.f;
    }

    for (int base = 0; base < f.count; base += S) {
      const int64_t cell = base + tid < f.count ? c0 + list[base + tid] : d.N;  // d.N: idle slot
      Nb nb[1] = {make_nb(cell, d, xs)};
      const bool valid = nb[0].cell >= 0;  // every listed cell fires
      __syncthreads();  // the previous pass's readers of P, G, Hc, Zc are done
      perceive<T, 1>(x, xs, d, w, nb, P, ld, stage, nstage);
      P[d.K * ld + tid] = valid ? 1.f : 0.f;
      for (int c = 0; c < d.Cu; ++c)
        G[c * ld + tid] = valid ? load(g + offset_of(gs, nb[0].b, d.frozen + c, nb[0].y, nb[0].x)) : 0.f;
      for (int k = 0; k < d.K; ++k) dP[k * ld + tid] = 0.f;

      for (int jc = 0; jc < d.HDP / kChunk; ++jc) {
        const int jn = min(kChunk, d.HD - jc * kChunk);
        float z[1][kChunk];
        fc1_chunk<1>(d, w, jc, P, ld, stage, nstage, z);
        float dh[1][kChunk];  // dh = gd @ w2 (this chunk's columns)
#pragma unroll
        for (int i = 0; i < kChunk; ++i) dh[0][i] = 0.f;
        for (int k0 = 0; k0 < d.Cu; k0 += cpc) {
          const int cn = min(cpc, d.Cu - k0);
          __syncthreads();
          stage_copy(stage, w.w2 + (static_cast<int64_t>(jc) * d.Cu + k0) * kChunk, cn * kChunk);
          __syncthreads();
          for (int cl = 0; cl < cn; ++cl) {
            const float gv[1] = {G[(k0 + cl) * ld + tid]};
            axpy_chunk<1>(dh, stage + cl * kChunk, gv);
          }
        }
        // h = relu(z) into z (NaN kept, as torch), dz = dh * (z > 0) into dh
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          dh[0][i] = z[0][i] > 0.f ? dh[0][i] : 0.f;
          z[0][i] = z[0][i] < 0.f ? 0.f : z[0][i];
        }
        // dP[k] += sum_i w1[jc*32 + i][k] * dz[i]
        for (int k0 = 0; k0 < d.K; k0 += cpc) {
          const int kn = min(cpc, d.K - k0);
          __syncthreads();
          stage_copy(stage, w.w1 + (static_cast<int64_t>(jc) * d.K + k0) * kChunk, kn * kChunk);
          __syncthreads();
          for (int kl = 0; kl < kn; ++kl) dP[(k0 + kl) * ld + tid] += dot_chunk(stage + kl * kChunk, dh[0]);
        }
#pragma unroll
        for (int i = 0; i < kChunk; ++i)
          if (i < jn) {
            Hc[i * ld + tid] = z[0][i];
            Zc[i * ld + tid] = dh[0][i];
          }
        __syncthreads();
        accumulate_outer(part_w1 + jc * kChunk * (d.K + 1), d.K + 1, Zc, jn, P, d.K + 1, ld, S);
        accumulate_outer(part_w2 + jc * kChunk, d.HD + 1, G, d.Cu, Hc, jn, ld, S);
        __syncthreads();
      }
      accumulate_outer(part_w2 + d.HD, d.HD + 1, G, d.Cu, P + d.K * ld, 1, ld, S);  // d_b2

      if (valid)
        for (int k = 0; k < d.K; ++k) {
          float v = dP[k * ld + tid];
          if (k < d.C) v += load(g + offset_of(gs, nb[0].b, k, nb[0].y, nb[0].x));
          ws[k * d.N + cell] = v;
        }
    }
  }
}

// ---- backward 2: perception weight gradients ------------------------------------------------

// Cell coordinates of a conv_grad tile, shared by the loaders.
struct TileCells {
  int64_t base[kTileS];  // b * stride_b, or -1 past the cell range or where the cell does not fire
  int y[kTileS], x[kTileS];
};

// A cell that does not fire takes no part in the perception weight's gradient: its dQ row is
// zero, and its patch is left out rather than multiplied by that zero (a NaN or inf that only
// idle cells read must not reach d_pw, as in the other backends).
FASTNCA_DEVICE void load_tile_cells(TileCells* tc, int64_t c0, int64_t cend, const Dims& d,
                                    const Strides4& xs, const Rng& rng) {
  const int s = threadIdx.x;
  if (s < kTileS) {
    const int64_t cell = c0 + s;
    if (cell < cend && fire(rng.seed, rng.cell0 + static_cast<uint64_t>(cell), rng.step, rng.threshold)) {
      tc->x[s] = static_cast<int>(cell % d.W);
      const int64_t t = cell / d.W;
      tc->y[s] = static_cast<int>(t % d.H);
      tc->base[s] = (t / d.H) * xs.b;
    } else {
      tc->base[s] = -1;
      tc->y[s] = tc->x[s] = 0;
    }
  }
}

// Input of tap t (row-major 3x3) of channel c for tile cell s, or 0 for a zero read.
template <typename T>
FASTNCA_DEVICE float tap_value(const T* __restrict__ x, const Strides4& xs, const Dims& d,
                               const TileCells* tc, int s, int c, int t) {
  if (tc->base[s] < 0) return 0.f;
  const int yy = pad_index(tc->y[s] + t / 3 - 1, d.H, d.padding);
  const int xx = pad_index(tc->x[s] + t % 3 - 1, d.W, d.padding);
  if (yy < 0 || xx < 0) return 0.f;
  return load(x + tc->base[s] + c * xs.c + yy * xs.h + xx * xs.w);
}

// groups=1: partial[part][o][j], j = c*9 + t (weight) or 9C (bias), over cells
// [blockIdx.y * cells_per_part, +cells_per_part). 16x16 threads, 4x4 outputs each.
template <typename T>
__global__ void __launch_bounds__(kGemmThreads)
nca_conv_grad_kernel(const T* __restrict__ x, Strides4 xs, Dims d, Rng rng, const float* __restrict__ ws,
                     float* __restrict__ part, int64_t cells_per_part) {
  FASTNCA_DYNAMIC_SMEM(smem4);
  constexpr int LDA = kTileO + 4, LDB = kTileJ + 4;  // rows stay 16-byte aligned
  float* As = reinterpret_cast<float*>(smem4);       // [kTileS][LDA]: dQ
  float* Bs = As + kTileS * LDA;                     // [kTileS][LDB]: patches
  TileCells* tc = reinterpret_cast<TileCells*>(Bs + kTileS * LDB);
  const int tid = threadIdx.x, nt = blockDim.x;
  const int NJ = 9 * d.C + 1;
  const int jtiles = (NJ + kTileJ - 1) / kTileJ;
  const int o0 = (blockIdx.x / jtiles) * kTileO, j0 = (blockIdx.x % jtiles) * kTileJ;
  const int64_t cbeg = static_cast<int64_t>(blockIdx.y) * cells_per_part;
  const int64_t cend = min(d.N, cbeg + cells_per_part);
  const int ta = tid / 16, tb = tid % 16;
  float acc[4][4] = {};

  for (int64_t c0 = cbeg; c0 < cend; c0 += kTileS) {
    __syncthreads();
    load_tile_cells(tc, c0, cend, d, xs, rng);
    __syncthreads();
    for (int i = tid; i < kTileO * kTileS; i += nt) {
      const int ol = i / kTileS, s = i % kTileS, o = o0 + ol;
      As[s * LDA + ol] = (o < d.FC && tc->base[s] >= 0) ? ws[(d.C + o) * d.N + c0 + s] : 0.f;
    }
    for (int i = tid; i < kTileJ * kTileS; i += nt) {
      const int jl = i / kTileS, s = i % kTileS, j = j0 + jl;
      float v = 0.f;
      if (j < NJ - 1) v = tap_value(x, xs, d, tc, s, j / 9, j % 9);
      else if (j == NJ - 1) v = tc->base[s] >= 0 ? 1.f : 0.f;
      Bs[s * LDB + jl] = v;
    }
    __syncthreads();
    for (int s = 0; s < kTileS; ++s) {
      const float4 a = *reinterpret_cast<const float4*>(As + s * LDA + ta * 4);
      const float4 b = *reinterpret_cast<const float4*>(Bs + s * LDB + tb * 4);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] = fmaf(av[u], bv[v], acc[u][v]);
    }
  }
  float* out = part + static_cast<int64_t>(blockIdx.y) * d.FC * NJ;
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int o = o0 + ta * 4 + u, j = j0 + tb * 4 + v;
      if (o < d.FC && j < NJ) out[static_cast<int64_t>(o) * NJ + j] = acc[u][v];
    }
}

// Depthwise: partial[part][o][10] (taps, then bias), one thread per (o, t) of a block of
// `cpb` channels (cpb * F * 10 <= threads).
template <typename T>
__global__ void __launch_bounds__(kGemmThreads)
nca_conv_grad_dw_kernel(const T* __restrict__ x, Strides4 xs, Dims d, Rng rng, const float* __restrict__ ws,
                        float* __restrict__ part, int64_t cells_per_part, int cpb) {
  FASTNCA_DYNAMIC_SMEM(smem4);
  constexpr int LD = kTileS + 1;
  const int rows_a = cpb * d.F;
  float* As = reinterpret_cast<float*>(smem4);  // [cpb*F][LD]: dQ
  float* Xs = As + rows_a * LD;                 // [cpb*10][LD]: taps and ones
  TileCells* tc = reinterpret_cast<TileCells*>(
      (reinterpret_cast<std::uintptr_t>(Xs + cpb * 10 * LD) + 15) & ~std::uintptr_t(15));
  const int tid = threadIdx.x, nt = blockDim.x;
  const int cb0 = blockIdx.x * cpb;
  const int64_t cbeg = static_cast<int64_t>(blockIdx.y) * cells_per_part;
  const int64_t cend = min(d.N, cbeg + cells_per_part);
  const int e = tid, ol = e / 10, t = e % 10, cl = ol / max(d.F, 1);
  const bool owner = e < rows_a * 10 && cb0 + cl < d.C;
  float acc = 0.f;

  for (int64_t c0 = cbeg; c0 < cend; c0 += kTileS) {
    __syncthreads();
    load_tile_cells(tc, c0, cend, d, xs, rng);
    __syncthreads();
    for (int i = tid; i < rows_a * kTileS; i += nt) {
      const int r = i / kTileS, s = i % kTileS, o = cb0 * d.F + r;
      As[r * LD + s] = (o < d.FC && tc->base[s] >= 0) ? ws[(d.C + o) * d.N + c0 + s] : 0.f;
    }
    for (int i = tid; i < cpb * 10 * kTileS; i += nt) {
      const int r = i / kTileS, s = i % kTileS, c = cb0 + r / 10, tt = r % 10;
      float v = 0.f;
      if (c < d.C) v = tt < 9 ? tap_value(x, xs, d, tc, s, c, tt) : (tc->base[s] >= 0 ? 1.f : 0.f);
      Xs[r * LD + s] = v;
    }
    __syncthreads();
    if (owner) {
      const float* a = As + ol * LD;
      const float* b = Xs + (cl * 10 + t) * LD;
      for (int s = 0; s < kTileS; ++s) acc = fmaf(a[s], b[s], acc);
    }
  }
  if (owner) part[(static_cast<int64_t>(blockIdx.y) * d.FC + cb0 * d.F + ol) * 10 + t] = acc;
}

// ---- backward 3: d_state gather ---------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads)
nca_state_grad_kernel(const float* __restrict__ ws, T* __restrict__ dx, Strides4 ds, Dims d,
                      Weights w, int nstage) {
  FASTNCA_DYNAMIC_SMEM(smem4);
  float* stage = reinterpret_cast<float*>(smem4);
  const int64_t cell = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool valid = cell < d.N;
  int b = 0, y = 0, xq = 0;
  if (valid) {
    xq = static_cast<int>(cell % d.W);
    const int64_t t = cell / d.W;
    y = static_cast<int>(t % d.H);
    b = static_cast<int>(t / d.H);
  }
  const int64_t img = static_cast<int64_t>(b) * d.H;
  const float* dQ = ws + static_cast<int64_t>(d.C) * d.N;  // [FC][N]

  if (!d.depthwise) {
    const int opc = nstage / kChunk;
    for (int cc = 0; cc < (d.C + kChunk - 1) / kChunk; ++cc) {
      float acc[1][kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const int c = cc * kChunk + i;
        acc[0][i] = (valid && c < d.C) ? ws[c * d.N + cell] : 0.f;
      }
      for (int t = 0; t < 9; ++t) {
        int qy[2], qx[2];
        const int ny = valid ? perception_readers(y, t / 3 - 1, d.H, d.padding, &qy[0], &qy[1]) : 0;
        const int nx = valid ? perception_readers(xq, t % 3 - 1, d.W, d.padding, &qx[0], &qx[1]) : 0;
        for (int o0 = 0; o0 < d.FC; o0 += opc) {
          const int on = min(opc, d.FC - o0);
          __syncthreads();
          stage_copy(stage, w.pwt + ((static_cast<int64_t>(cc) * 9 + t) * d.FC + o0) * kChunk, on * kChunk);
          __syncthreads();
#pragma unroll
          for (int iy = 0; iy < 2; ++iy)
#pragma unroll
            for (int ix = 0; ix < 2; ++ix) {
              if (iy >= ny || ix >= nx) continue;
              const float* src = dQ + static_cast<int64_t>(o0) * d.N + (img + qy[iy]) * d.W + qx[ix];
              for (int ol = 0; ol < on; ++ol) {
                const float q[1] = {src[ol * d.N]};
                axpy_chunk<1>(acc, stage + ol * kChunk, q);
              }
            }
        }
      }
      if (valid)
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          const int c = cc * kChunk + i;
          if (c < d.C) store(dx + offset_of(ds, b, c, y, xq), acc[0][i]);
        }
    }
  } else if (valid) {
    for (int c = 0; c < d.C; ++c) {
      float acc = ws[c * d.N + cell];
      for (int t = 0; t < 9; ++t) {
        int qy[2], qx[2];
        const int ny = perception_readers(y, t / 3 - 1, d.H, d.padding, &qy[0], &qy[1]);
        const int nx = perception_readers(xq, t % 3 - 1, d.W, d.padding, &qx[0], &qx[1]);
#pragma unroll
        for (int iy = 0; iy < 2; ++iy)
#pragma unroll
          for (int ix = 0; ix < 2; ++ix) {
            if (iy >= ny || ix >= nx) continue;
            const int64_t q = (img + qy[iy]) * d.W + qx[ix];
            for (int f = 0; f < d.F; ++f) {
              const int o = c * d.F + f;
              acc = fmaf(dQ[o * d.N + q], w.pwt[o * 9 + t], acc);
            }
          }
      }
      store(dx + offset_of(ds, b, c, y, xq), acc);
    }
  }
}

// ---- reductions ----------------------------------------------------------------------------

// out[e] = sum_{p < parts} part[p][e], p ascending: the fixed order behind determinism.
__global__ void __launch_bounds__(256)
reduce_parts_kernel(const float* __restrict__ part, int parts, int64_t E, float* __restrict__ out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= E) return;
  float s = 0.f;
  for (int p = 0; p < parts; ++p) s += part[p * E + e];
  out[e] = s;
}

// ---- host side -------------------------------------------------------------------------------

constexpr int64_t kPartBudget = int64_t(1) << 25;  // floats per partial buffer (128 MB)

Dims make_dims(int B, int C, int H, int W, int F, int HD, int frozen, bool depthwise, int padding) {
  if (B < 1 || C < 1 || H < 1 || W < 1 || F < 1 || HD < 1 || frozen < 0 || frozen > C)
    throw std::invalid_argument("fastnca nca_step (cuda): invalid sizes");
  if (padding < 0 || padding > 3) throw std::invalid_argument("fastnca nca_step (cuda): bad padding code");
  if (padding == kPadReflect && (H < 2 || W < 2))
    throw std::invalid_argument("fastnca nca_step (cuda): reflect padding needs H, W >= 2");
  if (depthwise && F > kDwMaxF)
    throw std::invalid_argument("fastnca nca_step (cuda): depthwise perception supports F <= 25");
  Dims d;
  d.B = B; d.C = C; d.H = H; d.W = W;
  d.F = F; d.FC = F * C; d.K = (F + 1) * C;
  d.HD = HD; d.HDP = (HD + kChunk - 1) / kChunk * kChunk;
  d.frozen = frozen; d.Cu = C - frozen;
  d.depthwise = depthwise ? 1 : 0;
  d.padding = padding;
  d.N = static_cast<int64_t>(B) * H * W;
  return d;
}

// Why the backward cannot take these sizes ('' when it can): its weight-gradient partials
// index one slice with int (accumulate_outer, conv chunks).
std::string backward_size_problem(const Dims& d) {
  if (static_cast<int64_t>(d.HDP) * (d.K + 1) + static_cast<int64_t>(d.Cu) * (d.HDP + 1) >= (int64_t(1) << 31))
    return "fastnca nca_step (cuda): the backward needs hidden * ((F+1)*C + 1) below 2^31";
  return "";
}

Strides4 strides4(const std::vector<int64_t>& s) {
  if (s.size() != 4) throw std::invalid_argument("fastnca nca_step (cuda): expected 4 strides");
  for (int64_t v : s)
    if (v < 0) throw std::invalid_argument("fastnca nca_step (cuda): negative stride");
  return Strides4{s[0], s[1], s[2], s[3]};
}

Weights weights_from(const std::vector<std::uintptr_t>& p) {
  if (p.size() != 7) throw std::invalid_argument("fastnca nca_step (cuda): expected 7 weight pointers");
  return Weights{ptr<const float>(p[0]), ptr<const float>(p[1]), ptr<const float>(p[2]),
                 ptr<const float>(p[3]), ptr<const float>(p[4]), ptr<const float>(p[5]),
                 ptr<const float>(p[6])};
}

// Dtype dispatch: f.template operator()<T>() for the storage type of `dtype`.
template <typename Fn>
void dispatch_dtype(int dtype, Fn&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat16: f(__half{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    case kFloat64:
      throw std::invalid_argument("fastnca nca_step (cuda): float64 is not supported by the CUDA "
                                  "kernels; use backend='reference' or 'cpu' for float64");
    default: throw std::invalid_argument("fastnca nca_step (cuda): unknown dtype code");
  }
}

// Launch shape of a thread-per-cell kernel: threads, cells per thread, staging floats, bytes.
struct CellPlan {
  int threads, cpt, nstage;
  size_t smem;
};

// Shared memory of the firing-cell list: the scan (threads ints) and the list (tile ints,
// sized for the largest tile, kMaxTileFactor * slots).

size_t list_smem(int threads, int slots) {
  return (static_cast<size_t>(threads) + static_cast<size_t>(kMaxTileFactor) * slots) * sizeof(int);
}

size_t forward_smem(const Dims& d, int threads, int cpt, int nstage) {
  return (static_cast<size_t>(nstage) + static_cast<size_t>(d.K + d.Cu) * threads * cpt) * sizeof(float) +
         list_smem(threads, threads * cpt);
}

size_t backward_main_smem(const Dims& d, int threads, int nstage) {
  const size_t rows = static_cast<size_t>(d.K + 1) + d.Cu + d.K + 2 * kChunk;
  return (static_cast<size_t>(nstage) + rows * (threads + 1)) * sizeof(float) + list_smem(threads, threads);
}

// Candidate cells per tile: about slots / update_prob, cut so that the firing count
// (binomial) exceeds one pass of `slots` only about once in a thousand tiles (mean + 3 sd
// <= slots); between slots (update_prob = 1) and kMaxTileFactor * slots (rare firing).
int plan_tile(int slots, uint32_t threshold) {
#if defined(FASTNCA_TEST_TILE_FACTOR)  // tests: force multi-pass tiles
  return FASTNCA_TEST_TILE_FACTOR * slots;
#endif
  const double p = static_cast<double>(threshold) / static_cast<double>(1u << 24);
  int tile = kMaxTileFactor * slots;
  while (tile > slots && tile * p + 3.0 * std::sqrt(tile * p * (1.0 - p)) > slots) --tile;
  return tile;
}

int staging_floats(const Dims& d, int preferred) {
  const int need = d.depthwise ? d.F * 9 : 9 * kChunk;  // one channel of pw must fit
  return std::max(preferred, (need + 3) / 4 * 4);
}

// Forward: two cells per thread when the tile's columns fit in half of what one block may
// use (so two blocks share a multiprocessor), else one, with fewer threads if needed.
// Untuned: `cpt` (1 or 2, 0 = automatic) lets benchmarks choose.
CellPlan plan_forward(const Dims& d, const DeviceInfo& info, int cpt) {
  const int stage_sizes[2] = {staging_floats(d, kStageFloats), staging_floats(d, kStageFloats / 4)};
  for (int ns : stage_sizes) {
    if (cpt != 1 && forward_smem(d, kThreads, 2, ns) <= static_cast<size_t>(info.smem_optin) / 2)
      return CellPlan{kThreads, 2, ns, forward_smem(d, kThreads, 2, ns)};
    if (cpt == 2 && forward_smem(d, kThreads, 2, ns) <= static_cast<size_t>(info.smem_optin))
      return CellPlan{kThreads, 2, ns, forward_smem(d, kThreads, 2, ns)};
    for (int threads = kThreads; threads >= 32; threads /= 2)
      if (forward_smem(d, threads, 1, ns) <= static_cast<size_t>(info.smem_optin))
        return CellPlan{threads, 1, ns, forward_smem(d, threads, 1, ns)};
  }
  throw std::invalid_argument("fastnca nca_step (cuda): channels/filters too large for shared memory "
                              "(K + C columns of 32 cells must fit); use backend='triton' or 'reference'");
}

template <typename T>
CellPlan plan_backward_main(const Dims& d, const DeviceInfo& info, int* blocks_per_sm) {
  // Most resident threads per multiprocessor; ties go to the larger block.
  CellPlan best{0, 1, 0, 0};
  int best_threads = 0;
  const int stage_sizes[2] = {staging_floats(d, kStageFloats), staging_floats(d, kStageFloats / 4)};
  for (int ns : stage_sizes) {
    for (int threads = kThreads; threads >= 32; threads /= 2) {
      const size_t smem = backward_main_smem(d, threads, ns);
      if (smem > static_cast<size_t>(info.smem_optin)) continue;
      const int per_sm = prepare_kernel(nca_backward_main_kernel<T>, threads, smem);
      if (per_sm * threads > best_threads) {
        best = CellPlan{threads, 1, ns, smem};
        best_threads = per_sm * threads;
        *blocks_per_sm = per_sm;
      }
    }
    if (best_threads > 0) return best;
  }
  throw std::invalid_argument("fastnca nca_step (cuda): channels/filters too large for the backward's "
                              "shared memory (2K + C rows of 33 floats, K = (F+1)*C); use backend='triton' "
                              "or 'reference'");
}

struct BackwardPlan {
  CellPlan main;
  int main_tile;         // candidate cells per tile of the main kernel
  int main_blocks;       // persistent grid of the main kernel = partial slices
  int64_t main_part;     // floats per slice: HD*(K+1) + Cu*(HD+1)
  int conv_slices;       // weight tiles of conv_grad (grid.x)
  int conv_parts;        // cell ranges (grid.y) = partial slices
  int64_t conv_cells;    // cells per range (multiple of kTileS)
  int64_t conv_part;     // floats per slice: FC*(9C+1) or FC*10
  int dw_cpb;            // depthwise: channels per block
  CellPlan state;
};

template <typename T>
BackwardPlan plan_backward(const Dims& d, uint32_t threshold) {
  const std::string problem = backward_size_problem(d);
  if (!problem.empty()) throw std::invalid_argument(problem);
  const DeviceInfo info = device_info();
  BackwardPlan p;
  int per_sm = 0;
  p.main = plan_backward_main<T>(d, info, &per_sm);
  p.main_part = static_cast<int64_t>(d.HD) * (d.K + 1) + static_cast<int64_t>(d.Cu) * (d.HD + 1);
  p.main_tile = plan_tile(p.main.threads, threshold);
  const int64_t tiles = (d.N + p.main_tile - 1) / p.main_tile;
  int64_t blocks = std::min<int64_t>(tiles, static_cast<int64_t>(per_sm) * info.sms);
  blocks = std::min<int64_t>(blocks, std::max<int64_t>(1, kPartBudget / p.main_part));
  p.main_blocks = static_cast<int>(std::max<int64_t>(1, blocks));

  const int64_t cell_tiles = (d.N + kTileS - 1) / kTileS;
  if (!d.depthwise) {
    const int NJ = 9 * d.C + 1;
    p.conv_slices = ((d.FC + kTileO - 1) / kTileO) * ((NJ + kTileJ - 1) / kTileJ);
    p.conv_part = static_cast<int64_t>(d.FC) * NJ;
    p.dw_cpb = 0;
  } else {
    p.dw_cpb = std::max(1, kGemmThreads / (d.F * 10));
    p.conv_slices = (d.C + p.dw_cpb - 1) / p.dw_cpb;
    p.conv_part = static_cast<int64_t>(d.FC) * 10;
  }
  // About 8 blocks per multiprocessor in all, within the partial budget.
  int64_t parts = (8LL * info.sms + p.conv_slices - 1) / p.conv_slices;
  parts = std::min(parts, std::max<int64_t>(1, kPartBudget / p.conv_part));
  parts = std::max<int64_t>(1, std::min(parts, cell_tiles));
  p.conv_cells = (cell_tiles + parts - 1) / parts * kTileS;
  p.conv_parts = static_cast<int>((d.N + p.conv_cells - 1) / p.conv_cells);

  const int ns = staging_floats(d, kStageFloats);
  p.state = CellPlan{kThreads, 1, ns, static_cast<size_t>(ns) * sizeof(float)};
  return p;
}

size_t conv_grad_smem(const BackwardPlan& p, const Dims& d) {
  if (!d.depthwise)
    return (static_cast<size_t>(kTileS) * (kTileO + 4 + kTileJ + 4)) * sizeof(float) + sizeof(TileCells);
  return static_cast<size_t>(p.dw_cpb) * (d.F + 10) * (kTileS + 1) * sizeof(float) + 16 +
         sizeof(TileCells);
}

// ---- bindings ---------------------------------------------------------------------------------

void nca_step_forward_cuda(std::uintptr_t state, const std::vector<int64_t>& state_strides,
                           std::uintptr_t out, const std::vector<int64_t>& out_strides, int B, int C,
                           int H, int W, int F, int hidden, int frozen, bool depthwise, int padding,
                           uint64_t seed, uint64_t step, uint32_t threshold,
                           const std::vector<std::uintptr_t>& weights, int dtype, std::uintptr_t stream,
                           int cpt) {
  const Dims d = make_dims(B, C, H, W, F, hidden, frozen, depthwise, padding);
  const Strides4 xs = strides4(state_strides), os = strides4(out_strides);
  const Weights w = weights_from(weights);
  const Rng rng{seed, step, threshold, 0};
  const CellPlan plan = plan_forward(d, device_info(), cpt);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int tile = plan_tile(plan.threads * plan.cpt, threshold);
    const dim3 grid = grid_1d(ceil_div(d.N, tile), "nca_step forward (cuda)");
    if (plan.cpt == 2) {
      prepare_kernel(nca_forward_kernel<T, 2>, plan.threads, plan.smem);
      launch("nca_step_forward", nca_forward_kernel<T, 2>, grid, dim3(plan.threads), plan.smem,
             as_stream(stream), ptr<const T>(state), xs, ptr<T>(out), os, d, w, rng, plan.nstage, tile);
    } else {
      prepare_kernel(nca_forward_kernel<T, 1>, plan.threads, plan.smem);
      launch("nca_step_forward", nca_forward_kernel<T, 1>, grid, dim3(plan.threads), plan.smem,
             as_stream(stream), ptr<const T>(state), xs, ptr<T>(out), os, d, w, rng, plan.nstage, tile);
    }
  });
}

// The least dynamic shared memory (bytes) of the forward and of the backward's main kernel
// for a rule (their smallest plans: 32 threads, the small staging buffer). Backend selection
// compares them with the device's opt-in limit, so that a rule whose backward cannot run is
// refused before its forward.
pybind11::tuple nca_step_smem_cuda(int C, int F, int hidden, int frozen, bool depthwise) {
  const Dims d = make_dims(1, C, 2, 2, F, hidden, frozen, depthwise, kPadZeros);
  const int ns = staging_floats(d, kStageFloats / 4);
  return pybind11::make_tuple(forward_smem(d, 32, 1, ns), backward_main_smem(d, 32, ns), backward_size_problem(d));
}

// The current device's opt-in shared memory per block (bytes): what the plans compare with.
int device_smem_optin_cuda() { return device_info().smem_optin; }

// Workspace sizes for nca_step_backward (floats): the caller allocates them with torch.
pybind11::dict nca_step_backward_plan_cuda(int B, int C, int H, int W, int F, int hidden, int frozen,
                                           bool depthwise, int padding, uint32_t threshold, int dtype) {
  const Dims d = make_dims(B, C, H, W, F, hidden, frozen, depthwise, padding);
  pybind11::dict out;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const BackwardPlan p = plan_backward<T>(d, threshold);
    out["ws"] = static_cast<int64_t>(d.K) * d.N;
    out["main_blocks"] = p.main_blocks;
    out["main_part"] = p.main_part;
    out["conv_parts"] = p.conv_parts;
    out["conv_part"] = p.conv_part;
    out["main_threads"] = p.main.threads;
  });
  return out;
}

void nca_step_backward_cuda(std::uintptr_t grad, const std::vector<int64_t>& grad_strides,
                            std::uintptr_t state, const std::vector<int64_t>& state_strides,
                            std::uintptr_t d_state, const std::vector<int64_t>& d_state_strides, int B,
                            int C, int H, int W, int F, int hidden, int frozen, bool depthwise,
                            int padding, uint64_t seed, uint64_t step, uint32_t threshold,
                            const std::vector<std::uintptr_t>& weights, std::uintptr_t ws,
                            std::uintptr_t main_part, int main_blocks, std::uintptr_t conv_part,
                            int conv_parts, std::uintptr_t d_fc, std::uintptr_t d_conv, int dtype,
                            std::uintptr_t stream, uint64_t cell0) {
  const Dims d = make_dims(B, C, H, W, F, hidden, frozen, depthwise, padding);
  const Strides4 gs = strides4(grad_strides), xs = strides4(state_strides),
                 dss = strides4(d_state_strides);
  const Weights w = weights_from(weights);
  const Rng rng{seed, step, threshold, cell0};
  const cudaStream_t s = as_stream(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const BackwardPlan p = plan_backward<T>(d, threshold);
    if (p.main_blocks != main_blocks || p.conv_parts != conv_parts)
      throw std::invalid_argument("fastnca nca_step (cuda): workspace plan changed between "
                                  "nca_step_backward_plan and nca_step_backward");
    float* wsp = ptr<float>(ws);
    // 1. recompute, dP, fc weight partials (main_part must be zeroed by the caller)
    prepare_kernel(nca_backward_main_kernel<T>, p.main.threads, p.main.smem);
    launch("nca_step_backward_main", nca_backward_main_kernel<T>, dim3(p.main_blocks),
           dim3(p.main.threads), p.main.smem, s, ptr<const T>(grad), gs, ptr<const T>(state), xs, d, w,
           rng, p.main.nstage, p.main_tile, wsp, ptr<float>(main_part), p.main_part);
    // 2. perception weight partials
    const size_t conv_smem = conv_grad_smem(p, d);
    const int64_t conv_cells = p.conv_cells;
    if (!d.depthwise) {
      prepare_kernel(nca_conv_grad_kernel<T>, kGemmThreads, conv_smem);
      launch("nca_step_backward_conv_grad", nca_conv_grad_kernel<T>, dim3(p.conv_slices, p.conv_parts),
             dim3(kGemmThreads), conv_smem, s, ptr<const T>(state), xs, d, rng,
             static_cast<const float*>(wsp), ptr<float>(conv_part), conv_cells);
    } else {
      prepare_kernel(nca_conv_grad_dw_kernel<T>, kGemmThreads, conv_smem);
      launch("nca_step_backward_conv_grad_dw", nca_conv_grad_dw_kernel<T>,
             dim3(p.conv_slices, p.conv_parts), dim3(kGemmThreads), conv_smem, s, ptr<const T>(state),
             xs, d, rng, static_cast<const float*>(wsp), ptr<float>(conv_part), conv_cells, p.dw_cpb);
    }
    // 3. d_state
    const dim3 sgrid = grid_1d(ceil_div(d.N, p.state.threads), "nca_step backward (cuda)");
    prepare_kernel(nca_state_grad_kernel<T>, p.state.threads, p.state.smem);
    launch("nca_step_backward_state_grad", nca_state_grad_kernel<T>, sgrid, dim3(p.state.threads),
           p.state.smem, s, static_cast<const float*>(wsp), ptr<T>(d_state), dss, d, w, p.state.nstage);
    // 4. fixed-order sums of the partials
    const int64_t E1 = p.main_part, E2 = p.conv_part;
    launch("nca_step_backward_reduce", reduce_parts_kernel, grid_1d(ceil_div(E1, 256), "nca_step backward (cuda)"),
           dim3(256), 0, s, static_cast<const float*>(ptr<float>(main_part)), p.main_blocks, E1,
           ptr<float>(d_fc));
    launch("nca_step_backward_reduce", reduce_parts_kernel, grid_1d(ceil_div(E2, 256), "nca_step backward (cuda)"),
           dim3(256), 0, s, static_cast<const float*>(ptr<float>(conv_part)), p.conv_parts, E2,
           ptr<float>(d_conv));
  });
}

}  // namespace
}  // namespace fastnca

FASTNCA_BINDINGS(m) {
  using namespace pybind11::literals;
  m.def("nca_step_forward", &fastnca::nca_step_forward_cuda, "state"_a, "state_strides"_a, "out"_a,
        "out_strides"_a, "B"_a, "C"_a, "H"_a, "W"_a, "F"_a, "hidden"_a, "frozen"_a, "depthwise"_a,
        "padding"_a, "seed"_a, "step"_a, "threshold"_a, "weights"_a, "dtype"_a, "stream"_a,
        "cells_per_thread"_a = 0,
        "Fused NCA step. weights: pointers to the arranged fp32 (pw, pb, w1, b1, w2, b2, pwt).");
  m.def("nca_step_smem", &fastnca::nca_step_smem_cuda, "C"_a, "F"_a, "hidden"_a, "frozen"_a, "depthwise"_a,
        "(forward, backward) least dynamic shared memory in bytes for a rule, and why the "
        "backward cannot take its sizes ('' when it can).");
  m.def("device_smem_optin", &fastnca::device_smem_optin_cuda,
        "The current device's opt-in shared memory per block, in bytes.");
  m.def("nca_step_backward_plan", &fastnca::nca_step_backward_plan_cuda, "B"_a, "C"_a, "H"_a, "W"_a,
        "F"_a, "hidden"_a, "frozen"_a, "depthwise"_a, "padding"_a, "threshold"_a, "dtype"_a,
        "Workspace sizes (floats) of nca_step_backward on the current device.");
  m.def("nca_step_backward", &fastnca::nca_step_backward_cuda, "grad"_a, "grad_strides"_a, "state"_a,
        "state_strides"_a, "d_state"_a, "d_state_strides"_a, "B"_a, "C"_a, "H"_a, "W"_a, "F"_a,
        "hidden"_a, "frozen"_a, "depthwise"_a, "padding"_a, "seed"_a, "step"_a, "threshold"_a,
        "weights"_a, "ws"_a, "main_part"_a, "main_blocks"_a, "conv_part"_a, "conv_parts"_a, "d_fc"_a,
        "d_conv"_a, "dtype"_a, "stream"_a, "cell0"_a = 0,
        "Recompute backward of nca_step over a batch chunk whose first cell has fire-mask index "
        "cell0: d_state (may alias grad), and fp32 d_fc = [HD][K+1] ++ [Cu][HD+1], "
        "d_conv = [FC][9C+1] (groups=1) or [FC][10] (depthwise).");
}
