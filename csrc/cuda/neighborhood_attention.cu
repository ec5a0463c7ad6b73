// neighborhood_attention2d on CUDA: forward and recompute backward (DESIGN.md, Op 3).
//
// Assumptions (python/fastnca/kernels/cuda/neighborhood_attention.py checks every one):
//   * q, k, v: [B, H, W, heads, D] of T in {float, __half, __nv_bfloat16}, element strides
//     with stride(-1) == 1 (strided views of a packed QKV tensor are fine); grad_o: any
//     strides. o, dq, dk, dv contiguous in T; lse, grad_lse, the Di workspace contiguous fp32.
//   * kernel_size in {3, 5, 7} (template), border code from borders.h; shift needs
//     H, W >= kernel_size. Sizes fit in int, element offsets use int64.
//
// Mapping: a group of G lanes (G a power of two <= 32) owns one (cell, head), so a warp
// works on 32 / G of them at once and the per-query index work is shared by few lanes.
// Each lane holds lane_dims() (16; 8 at kernel sizes 5, 7) of the D features per pass, as chunks of VEC consecutive
// elements: VEC = 16 bytes / sizeof(T) when every row is 16-byte aligned (one 128-bit load
// per chunk), else VEC = 1. Chunk c of the pass starting at d0 begins at element
// d0 + (c * G + lane) * VEC, so the group reads G * VEC consecutive elements per load
// (G is at least 2 with vectors: whole 32-byte sectors). G is the smallest power of two
// whose passes cover D in one (up to 32 lanes); larger D takes several passes.
//
// Dot products: every lane sums its own elements in one fixed order (passes, chunks,
// elements), then a butterfly over the group. The backward kernels form each logit with
// the same lanes and order as the forward, so the recomputed logits are bit-identical. All
// k^2 logits of a window stay in registers, so the softmax is exact (no online rescaling).
//
// Backward, no atomics:
//   query kernel: recompute s and p = exp(s - lse), dp_j = <do, v_j>,
//     Di = sum_j p_j dp_j - dlse (the same number as <do, o> - dlse, but from the fp32
//     recomputation instead of the rounded o), ds = p (dp - Di), dq = scale sum_j ds_j k_j;
//     Di goes to a workspace.
//   key kernel: each key gathers over its inverse neighbourhood (query_range + key_index):
//     dk = scale sum_i ds_ij q_i, dv = sum_i p_ij do_i, recomputing s_ij from q_i, k_j.
#include <cstring>
#include <vector>

#include <pybind11/stl.h>

#include "fastnca/bindings.h"
#include "fastnca/borders.h"
#include "fastnca/device_cuda.cuh"

namespace fastnca {
namespace {

constexpr int kThreads = 128;
// Features a lane holds per pass (registers per held row): two or four 16-byte vectors, or
// four scalars on the unvectorised path (whose full unrolling is otherwise long to compile);
// half that at kernel sizes 5 and 7, whose 25 / 49 logits and their gradients need the
// registers (sm_90: the query kernel spilled up to 472 bytes with 16).
template <int VEC, int KS>
FASTNCA_HD constexpr int lane_dims() {
  return (VEC == 1 ? 4 : 16) / (KS >= 5 ? 2 : 1);
}

struct NaDims {
  int B, H, W, NH, D;
  int border;
  float scale;
  int G;           // lanes per (cell, head)
  int64_t groups;  // B * H * W * heads
};

struct View5 {  // element strides of a [B, H, W, heads, D] tensor
  int64_t b, h, w, n, d;
};

FASTNCA_DEVICE int64_t pixel_offset(const View5& s, int b, int y, int x, int n) {
  return b * s.b + y * s.h + x * s.w + n * s.n;
}

// The group's (b, y, x, n) from its index in [0, B*H*W*NH), heads fastest.
struct Query {
  int64_t index;  // ((b*H + y)*W + x)*NH + n
  int b, y, x, n;
};

FASTNCA_DEVICE Query decode(int64_t gid, const NaDims& d) {
  Query q;
  q.index = gid;
  if (d.groups <= 0xffffffffll) {  // 32-bit divisions (64-bit ones are a long call)
    uint32_t t = static_cast<uint32_t>(gid);
    q.n = static_cast<int>(t % static_cast<uint32_t>(d.NH));
    t /= static_cast<uint32_t>(d.NH);
    q.x = static_cast<int>(t % static_cast<uint32_t>(d.W));
    t /= static_cast<uint32_t>(d.W);
    q.y = static_cast<int>(t % static_cast<uint32_t>(d.H));
    q.b = static_cast<int>(t / static_cast<uint32_t>(d.H));
    return q;
  }
  q.n = static_cast<int>(gid % d.NH);
  int64_t t = gid / d.NH;
  q.x = static_cast<int>(t % d.W);
  t /= d.W;
  q.y = static_cast<int>(t % d.H);
  q.b = static_cast<int>(t / d.H);
  return q;
}

// ---- a lane's share of a row ----------------------------------------------------------
// L floats: chunk c (VEC elements) at element d0 + (c * G + lane) * VEC. Chunks past
// D are left out (VEC divides D when VEC > 1, so a chunk is wholly in or out).
template <int VEC>
FASTNCA_DEVICE int chunk_start(int d0, int c, int lane, const NaDims& d) {
  return d0 + (c * d.G + lane) * VEC;
}

template <typename T, int VEC>
FASTNCA_DEVICE void load_vec(const T* p, float* out) {
  if constexpr (VEC == 1) {
    out[0] = to_float(*p);
  } else {
    static_assert(VEC * sizeof(T) == 16, "chunks are 16-byte vectors");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);  // the launcher checked alignment
    T e[VEC];
    memcpy(e, &raw, sizeof(raw));
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(e[i]);
  }
}

template <typename T, int VEC>
FASTNCA_DEVICE void store_vec(T* p, const float* in, float mult) {
  if constexpr (VEC == 1) {
    *p = from_float<T>(in[0] * mult);
  } else {
    T e[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_float<T>(in[i] * mult);
    uint4 raw;
    memcpy(&raw, e, sizeof(raw));
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// Calls f(c, dd) for each chunk c of the lane's share that lies inside D (dd: its first
// element): the one loop of the share helpers below.
template <int VEC, int L, typename Fn>
FASTNCA_DEVICE void for_each_chunk(int d0, int lane, const NaDims& d, Fn&& f) {
#pragma unroll
  for (int c = 0; c < L / VEC; ++c) {
    const int dd = chunk_start<VEC>(d0, c, lane, d);
    if (dd < d.D) f(c, dd);
  }
}

// x = the lane's share of row (element stride sd; 1 whenever VEC > 1); zeros past D.
template <typename T, int VEC, int L>
FASTNCA_DEVICE void load_share(const T* __restrict__ row, int64_t sd, int d0, int lane, const NaDims& d,
                               float (&x)[L]) {
#pragma unroll
  for (int u = 0; u < L; ++u) x[u] = 0.f;
  for_each_chunk<VEC, L>(d0, lane, d, [&](int c, int dd) { load_vec<T, VEC>(row + dd * sd, &x[c * VEC]); });
}

// acc + this lane's part of <x, row> (x: a share held in registers, row read here).
template <typename T, int VEC, int L>
FASTNCA_DEVICE float dot_share(const float (&x)[L], const T* __restrict__ row, int d0, int lane,
                               const NaDims& d, float acc) {
  for_each_chunk<VEC, L>(d0, lane, d, [&](int c, int dd) {
    float t[VEC];
    load_vec<T, VEC>(row + dd, t);
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc = fmaf(x[c * VEC + e], t[e], acc);
  });
  return acc;
}

// The same sum with both shares in registers (same chunks, same order).
template <int VEC, int L>
FASTNCA_DEVICE float dot_regs(const float (&x)[L], const float (&y)[L], int d0, int lane,
                              const NaDims& d, float acc) {
  for_each_chunk<VEC, L>(d0, lane, d, [&](int c, int) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc = fmaf(x[c * VEC + e], y[c * VEC + e], acc);
  });
  return acc;
}

// acc += w * the lane's share of row (chunks past D left alone).
template <typename T, int VEC, int L>
FASTNCA_DEVICE void axpy_share(float w, const T* __restrict__ row, int d0, int lane, const NaDims& d,
                               float (&acc)[L]) {
  for_each_chunk<VEC, L>(d0, lane, d, [&](int c, int dd) {
    float t[VEC];
    load_vec<T, VEC>(row + dd, t);
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[c * VEC + e] = fmaf(w, t[e], acc[c * VEC + e]);
  });
}

template <typename T, int VEC, int L>
FASTNCA_DEVICE void store_share(T* __restrict__ row, int d0, int lane, const NaDims& d, const float (&x)[L],
                                float mult) {
  for_each_chunk<VEC, L>(d0, lane, d, [&](int c, int dd) { store_vec<T, VEC>(row + dd, &x[c * VEC], mult); });
}

// ---- windows ----------------------------------------------------------------------------
// Window of a query: key rows/cols per offset (key_index, -1 = outside the grid).
template <int KS>
struct Window {
  int ky[KS], kx[KS];
};

template <int KS>
FASTNCA_DEVICE Window<KS> window_of(const Query& q, const NaDims& d) {
  constexpr int r = KS / 2;
  Window<KS> win;
#pragma unroll
  for (int a = 0; a < KS; ++a) {
    win.ky[a] = key_index(q.y, a - r, d.H, r, d.border);
    win.kx[a] = key_index(q.x, a - r, d.W, r, d.border);
  }
  return win;
}

FASTNCA_DEVICE bool in_softmax(int ky, int kx, int border) {
  return border != kBorderMask || (ky >= 0 && kx >= 0);
}

// s[j] = <x, t_j> over the window's in-grid entries (row-major offsets), outside ones 0:
// x is the row at xrow (element stride sx), t_j the rows of tb. Passes outside, keys
// inside, so x is read once. Returns group sums (every lane holds them).
template <typename T, int KS, int VEC>
FASTNCA_DEVICE void window_dots(const T* __restrict__ xrow, int64_t sx, const T* __restrict__ tb,
                                const View5& ts, const Window<KS>& win, const NaDims& d, int lane,
                                unsigned mask, float (&s)[KS * KS]) {
#pragma unroll
  for (int j = 0; j < KS * KS; ++j) s[j] = 0.f;
  constexpr int L = lane_dims<VEC, KS>();
  for (int d0 = 0; d0 < d.D; d0 += d.G * L) {
    float x[L];
    load_share<T, VEC>(xrow, sx, d0, lane, d, x);
    // Key-outer loops keep one key address live at a time.
#pragma unroll
    for (int a = 0; a < KS; ++a)
#pragma unroll
      for (int b = 0; b < KS; ++b)
        if (win.ky[a] >= 0 && win.kx[b] >= 0)
          s[a * KS + b] = dot_share<T, VEC>(x, tb + win.ky[a] * ts.h + win.kx[b] * ts.w, d0, lane, d,
                                            s[a * KS + b]);
  }
#pragma unroll
  for (int j = 0; j < KS * KS; ++j) s[j] = group_sum(s[j], mask, d.G);
}

// out = mult * sum_j c[j] * t_j over the window's in-grid entries, pass by pass.
template <typename T, int KS, int VEC>
FASTNCA_DEVICE void window_combine(const T* __restrict__ tb, const View5& ts, const Window<KS>& win,
                                   const NaDims& d, int lane, const float (&c)[KS * KS], float mult,
                                   T* __restrict__ out) {
  constexpr int L = lane_dims<VEC, KS>();
  for (int d0 = 0; d0 < d.D; d0 += d.G * L) {
    float acc[L];
#pragma unroll
    for (int u = 0; u < L; ++u) acc[u] = 0.f;
#pragma unroll
    for (int a = 0; a < KS; ++a)
#pragma unroll
      for (int b = 0; b < KS; ++b) {
        if (win.ky[a] >= 0 && win.kx[b] >= 0)
          axpy_share<T, VEC>(c[a * KS + b], tb + win.ky[a] * ts.h + win.kx[b] * ts.w, d0, lane, d, acc);
      }
    store_share<T, VEC>(out, d0, lane, d, acc, mult);
  }
}

// ---- forward --------------------------------------------------------------------------------

template <typename T, int KS, int VEC>
__global__ void __launch_bounds__(kThreads)
na_forward_kernel(const T* __restrict__ q, View5 qs, const T* __restrict__ k, View5 ks,
                  const T* __restrict__ v, View5 vs, T* __restrict__ o, float* __restrict__ lse, NaDims d) {
  constexpr int KK = KS * KS;
  const int64_t gid = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / d.G;
  if (gid >= d.groups) return;  // whole groups leave together
  const int lane = static_cast<int>(threadIdx.x) & (d.G - 1);
  const unsigned mask = group_mask(d.G);
  const Query qq = decode(gid, d);
  const Window<KS> win = window_of<KS>(qq, d);

  float s[KK];
  window_dots<T, KS, VEC>(q + pixel_offset(qs, qq.b, qq.y, qq.x, qq.n), 1, k + qq.b * ks.b + qq.n * ks.n,
                          ks, win, d, lane, mask, s);
  float m = -INFINITY;
#pragma unroll
  for (int a = 0; a < KS; ++a)
#pragma unroll
    for (int b = 0; b < KS; ++b) {
      s[a * KS + b] *= d.scale;
      if (in_softmax(win.ky[a], win.kx[b], d.border)) m = fmaxf(m, s[a * KS + b]);
    }
  float l = 0.f;
#pragma unroll
  for (int a = 0; a < KS; ++a)
#pragma unroll
    for (int b = 0; b < KS; ++b) {
      const int j = a * KS + b;
      s[j] = in_softmax(win.ky[a], win.kx[b], d.border) ? expf(s[j] - m) : 0.f;
      l += s[j];
    }

  window_combine<T, KS, VEC>(v + qq.b * vs.b + qq.n * vs.n, vs, win, d, lane, s, 1.f / l, o + gid * d.D);
  if (lane == 0) lse[gid] = isinf(m) ? m : m + logf(l);  // +inf / all -inf logits: as torch.logsumexp
}

// ---- backward: queries -------------------------------------------------------------------------

template <typename T, int KS, int VEC>
__global__ void __launch_bounds__(kThreads)
na_backward_query_kernel(const T* __restrict__ q, View5 qs, const T* __restrict__ k, View5 ks,
                         const T* __restrict__ v, View5 vs, const T* __restrict__ go, View5 gos,
                         const float* __restrict__ lse, const float* __restrict__ dlse,
                         T* __restrict__ dq, float* __restrict__ delta, NaDims d) {
  constexpr int KK = KS * KS;
  const int64_t gid = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / d.G;
  if (gid >= d.groups) return;
  const int lane = static_cast<int>(threadIdx.x) & (d.G - 1);
  const unsigned mask = group_mask(d.G);
  const Query qq = decode(gid, d);
  const Window<KS> win = window_of<KS>(qq, d);
  const T* kb = k + qq.b * ks.b + qq.n * ks.n;

  float p[KK];
  window_dots<T, KS, VEC>(q + pixel_offset(qs, qq.b, qq.y, qq.x, qq.n), 1, kb, ks, win, d, lane, mask, p);
  const float lse_i = lse[gid];
#pragma unroll
  for (int a = 0; a < KS; ++a)
#pragma unroll
    for (int b = 0; b < KS; ++b) {
      const int j = a * KS + b;
      p[j] = in_softmax(win.ky[a], win.kx[b], d.border) ? expf(p[j] * d.scale - lse_i) : 0.f;
    }

  // dp_j = <do, v_j> (zero value outside the grid)
  float dp[KK];
  window_dots<T, KS, VEC>(go + qq.b * gos.b + qq.y * gos.h + qq.x * gos.w + qq.n * gos.n, gos.d,
                          v + qq.b * vs.b + qq.n * vs.n, vs, win, d, lane, mask, dp);
  float di = 0.f;
#pragma unroll
  for (int j = 0; j < KK; ++j) di = fmaf(p[j], dp[j], di);
  if (dlse != nullptr) di -= dlse[gid];
#pragma unroll
  for (int j = 0; j < KK; ++j) p[j] = p[j] * (dp[j] - di);  // ds_j (without scale)

  window_combine<T, KS, VEC>(kb, ks, win, d, lane, p, d.scale, dq + gid * d.D);
  if (lane == 0) delta[gid] = di;
}

// ---- backward: keys ------------------------------------------------------------------------------

// Calls f(qy, qx) for every query whose window reads key (ky, kx), once per window offset
// that reads it (the inverse neighbourhood: several offsets of one query on small tori).
template <int KS, typename Fn>
FASTNCA_DEVICE void for_each_reader(int ky, int kx, const NaDims& d, Fn&& f) {
  constexpr int r = KS / 2;
#pragma unroll 1
  for (int a = 0; a < KS; ++a) {
    int ylo, yhi;
    query_range(ky, a - r, d.H, r, d.border, &ylo, &yhi);
#pragma unroll 1
    for (int qy = max(ylo, 0); qy <= min(yhi, d.H - 1); ++qy) {
      if (key_index(qy, a - r, d.H, r, d.border) != ky) continue;
#pragma unroll 1
      for (int b = 0; b < KS; ++b) {
        int xlo, xhi;
        query_range(kx, b - r, d.W, r, d.border, &xlo, &xhi);
#pragma unroll 1
        for (int qx = max(xlo, 0); qx <= min(xhi, d.W - 1); ++qx)
          if (key_index(qx, b - r, d.W, r, d.border) == kx) f(qy, qx);
      }
    }
  }
}

template <typename T, int KS, int VEC>
__global__ void __launch_bounds__(kThreads)
na_backward_key_kernel(const T* __restrict__ q, View5 qs, const T* __restrict__ k, View5 ks,
                       const T* __restrict__ v, View5 vs, const T* __restrict__ go, View5 gos,
                       const float* __restrict__ lse, const float* __restrict__ delta,
                       T* __restrict__ dk, T* __restrict__ dv, NaDims d) {
  constexpr int L = lane_dims<VEC, KS>();
  const int64_t gid = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / d.G;
  if (gid >= d.groups) return;
  const int lane = static_cast<int>(threadIdx.x) & (d.G - 1);
  const unsigned mask = group_mask(d.G);
  const Query kk = decode(gid, d);  // this group's key
  const T* kp = k + pixel_offset(ks, kk.b, kk.y, kk.x, kk.n);
  const T* vp = v + pixel_offset(vs, kk.b, kk.y, kk.x, kk.n);
  const int64_t img = static_cast<int64_t>(kk.b) * d.H;
  const int P = d.G * L;  // features per pass
  // The reader's p_ij and ds_ij (unscaled) from its logit and <do_i, v_j>.
  auto probs = [&](int qy, int qx, float s, float dp, float* p, float* ds) {
    const int64_t qi = ((img + qy) * d.W + qx) * d.NH + kk.n;
    s = group_sum(s, mask, d.G) * d.scale;
    dp = group_sum(dp, mask, d.G);
    *p = expf(s - lse[qi]);
    *ds = *p * (dp - delta[qi]);
  };
  float gk[L], gv[L];

  if (d.D <= P) {  // one pass: k, v of this key and q, do of each reader are read once
    float kr[L], vr[L];
    load_share<T, VEC>(kp, 1, 0, lane, d, kr);
    load_share<T, VEC>(vp, 1, 0, lane, d, vr);
#pragma unroll
    for (int u = 0; u < L; ++u) gk[u] = gv[u] = 0.f;
    for_each_reader<KS>(kk.y, kk.x, d, [&](int qy, int qx) {
      float qc[L], gc[L], p, ds;
      load_share<T, VEC>(q + pixel_offset(qs, kk.b, qy, qx, kk.n), 1, 0, lane, d, qc);
      load_share<T, VEC>(go + kk.b * gos.b + qy * gos.h + qx * gos.w + kk.n * gos.n, gos.d, 0, lane, d, gc);
      probs(qy, qx, dot_regs<VEC>(qc, kr, 0, lane, d, 0.f), dot_regs<VEC>(gc, vr, 0, lane, d, 0.f), &p, &ds);
#pragma unroll
      for (int u = 0; u < L; ++u) {
        gk[u] = fmaf(ds, qc[u], gk[u]);
        gv[u] = fmaf(p, gc[u], gv[u]);
      }
    });
    store_share<T, VEC>(dk + gid * d.D, 0, lane, d, gk, d.scale);
    store_share<T, VEC>(dv + gid * d.D, 0, lane, d, gv, 1.f);
    return;
  }

  // Several passes: each accumulates its features of dk, dv; the dots run over all of them.
  for (int d0 = 0; d0 < d.D; d0 += P) {
#pragma unroll
    for (int u = 0; u < L; ++u) gk[u] = gv[u] = 0.f;
    for_each_reader<KS>(kk.y, kk.x, d, [&](int qy, int qx) {
      const T* qrow = q + pixel_offset(qs, kk.b, qy, qx, kk.n);
      const T* grow = go + kk.b * gos.b + qy * gos.h + qx * gos.w + kk.n * gos.n;
      float x[L], s = 0.f, dp = 0.f, p, ds;
#pragma unroll 1
      for (int e0 = 0; e0 < d.D; e0 += P) {  // the forward's order of passes and chunks
        load_share<T, VEC>(qrow, 1, e0, lane, d, x);
        s = dot_share<T, VEC>(x, kp, e0, lane, d, s);
        load_share<T, VEC>(grow, gos.d, e0, lane, d, x);
        dp = dot_share<T, VEC>(x, vp, e0, lane, d, dp);
      }
      probs(qy, qx, s, dp, &p, &ds);
      load_share<T, VEC>(qrow, 1, d0, lane, d, x);
#pragma unroll
      for (int u = 0; u < L; ++u) gk[u] = fmaf(ds, x[u], gk[u]);
      load_share<T, VEC>(grow, gos.d, d0, lane, d, x);
#pragma unroll
      for (int u = 0; u < L; ++u) gv[u] = fmaf(p, x[u], gv[u]);
    });
    store_share<T, VEC>(dk + gid * d.D, d0, lane, d, gk, d.scale);
    store_share<T, VEC>(dv + gid * d.D, d0, lane, d, gv, 1.f);
  }
}

// ---- host side ------------------------------------------------------------------------------------

View5 view5(const std::vector<int64_t>& s, bool last_contiguous) {
  if (s.size() != 5) throw std::invalid_argument("fastnca neighborhood_attention (cuda): expected 5 strides");
  for (int64_t v : s)
    if (v < 0) throw std::invalid_argument("fastnca neighborhood_attention (cuda): negative stride");
  if (last_contiguous && s[4] != 1)
    throw std::invalid_argument("fastnca neighborhood_attention (cuda): q, k, v need stride(-1) == 1");
  return View5{s[0], s[1], s[2], s[3], s[4]};
}

// Whether every row of a [B, H, W, heads, D] tensor is whole 16-byte vectors: 16-byte
// aligned start, unit element stride, the strides of the other dimensions of size > 1
// multiples of the vector (a size-1 dimension's stride is never used).
bool rows_are_vectors(std::uintptr_t p, const View5& s, int B, int H, int W, int NH, int D, int vec) {
  auto steps = [vec](int64_t stride, int size) { return size == 1 || stride % vec == 0; };
  return vec > 1 && p % 16 == 0 && s.d == 1 && D % vec == 0 && steps(s.b, B) && steps(s.h, H) &&
         steps(s.w, W) && steps(s.n, NH);
}

NaDims make_dims(int B, int H, int W, int NH, int D, int kernel_size, int border, float scale, int vec,
                 int elem_bytes) {
  if (B < 1 || H < 1 || W < 1 || NH < 1 || D < 1)
    throw std::invalid_argument("fastnca neighborhood_attention (cuda): invalid sizes");
  if (kernel_size != 3 && kernel_size != 5 && kernel_size != 7)
    throw std::invalid_argument("fastnca neighborhood_attention (cuda): kernel_size must be 3, 5 or 7");
  if (border < 0 || border > 3) throw std::invalid_argument("fastnca neighborhood_attention (cuda): bad border code");
  if (border == kBorderShift && (H < kernel_size || W < kernel_size))
    throw std::invalid_argument("fastnca neighborhood_attention (cuda): shift border needs H, W >= kernel_size");
  if (H > (1 << 30) || W > (1 << 30))  // the border maps' int arithmetic (borders.h)
    throw std::invalid_argument("fastnca neighborhood_attention (cuda): H and W must be at most 2^30");
  NaDims d{B, H, W, NH, D, border, scale, 1, static_cast<int64_t>(B) * H * W * NH};
  // G: the fewest lanes whose passes cover D at once, at least one 32-byte sector per load
  // (but no lane without a chunk), at most a warp.
  const int chunks = (D + vec - 1) / vec;
  const int sector = std::max(1, 32 / (vec * elem_bytes));
  const int lane = vec > 1 ? (kernel_size >= 5 ? lane_dims<2, 7>() : lane_dims<2, 3>())
                            : (kernel_size >= 5 ? lane_dims<1, 7>() : lane_dims<1, 3>());
  while (d.G < 32 && d.G * lane < D) d.G *= 2;
  while (d.G < sector && d.G < chunks) d.G *= 2;
  return d;
}

// Calls f(T{}, integral_constant<KS>, integral_constant<VEC>) for the dtype, kernel size and
// vector width (1, or 16 bytes of T).
template <typename Fn>
void dispatch(int dtype, int kernel_size, bool vectors, Fn&& f) {
  auto with_vec = [&](auto tag, auto ks) {
    using T = decltype(tag);
    if (vectors)
      f(tag, ks, std::integral_constant<int, 16 / sizeof(T)>{});
    else
      f(tag, ks, std::integral_constant<int, 1>{});
  };
  auto with_ks = [&](auto tag) {
    switch (kernel_size) {
      case 3: with_vec(tag, std::integral_constant<int, 3>{}); break;
      case 5: with_vec(tag, std::integral_constant<int, 5>{}); break;
      default: with_vec(tag, std::integral_constant<int, 7>{}); break;
    }
  };
  switch (dtype) {
    case kFloat32: with_ks(float{}); break;
    case kFloat16: with_ks(__half{}); break;
    case kBFloat16: with_ks(__nv_bfloat16{}); break;
    case kFloat64:
      throw std::invalid_argument("fastnca neighborhood_attention (cuda): float64 is not supported by "
                                  "the CUDA kernels; use backend='reference' or 'cpu' for float64");
    default: throw std::invalid_argument("fastnca neighborhood_attention (cuda): unknown dtype code");
  }
}

int elem_bytes(int dtype) { return dtype == kFloat32 ? 4 : 2; }

void na2d_forward_cuda(std::uintptr_t q, const std::vector<int64_t>& q_strides, std::uintptr_t k,
                       const std::vector<int64_t>& k_strides, std::uintptr_t v,
                       const std::vector<int64_t>& v_strides, std::uintptr_t o, std::uintptr_t lse, int B,
                       int H, int W, int heads, int D, int kernel_size, int border, double scale, int dtype,
                       std::uintptr_t stream) {
  const View5 qs = view5(q_strides, true), ks = view5(k_strides, true), vs = view5(v_strides, true);
  const int eb = elem_bytes(dtype), vec = 16 / eb;
  const bool vectors = rows_are_vectors(q, qs, B, H, W, heads, D, vec) && rows_are_vectors(k, ks, B, H, W, heads, D, vec) &&
                       rows_are_vectors(v, vs, B, H, W, heads, D, vec) && o % 16 == 0;
  const NaDims d = make_dims(B, H, W, heads, D, kernel_size, border, static_cast<float>(scale),
                             vectors ? vec : 1, eb);
  const dim3 grid = grid_1d(ceil_div(d.groups * d.G, kThreads), "neighborhood_attention (cuda)");
  dispatch(dtype, kernel_size, vectors, [&](auto tag, auto ksz, auto vsz) {
    using T = decltype(tag);
    constexpr int KS = decltype(ksz)::value, VEC = decltype(vsz)::value;
    launch("neighborhood_attention_forward", na_forward_kernel<T, KS, VEC>, grid, dim3(kThreads), 0,
           as_stream(stream), ptr<const T>(q), qs, ptr<const T>(k), ks, ptr<const T>(v), vs, ptr<T>(o),
           ptr<float>(lse), d);
  });
}

void na2d_backward_cuda(std::uintptr_t grad_o, const std::vector<int64_t>& grad_o_strides,
                        std::uintptr_t grad_lse, std::uintptr_t q, const std::vector<int64_t>& q_strides,
                        std::uintptr_t k, const std::vector<int64_t>& k_strides, std::uintptr_t v,
                        const std::vector<int64_t>& v_strides, std::uintptr_t lse, std::uintptr_t delta,
                        std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv, int B, int H, int W,
                        int heads, int D, int kernel_size, int border, double scale, int dtype,
                        std::uintptr_t stream) {
  const View5 qs = view5(q_strides, true), ks = view5(k_strides, true), vs = view5(v_strides, true);
  const View5 gs = view5(grad_o_strides, false);
  const int eb = elem_bytes(dtype), vec = 16 / eb;
  // The forward's vector width whenever q, k, v are the same (so the recomputed logits are
  // its bit for bit): the launcher hands over a contiguous grad_o when its rows are not
  // vectors but q's are.
  const bool qkv_vectors = rows_are_vectors(q, qs, B, H, W, heads, D, vec) && rows_are_vectors(k, ks, B, H, W, heads, D, vec) &&
                           rows_are_vectors(v, vs, B, H, W, heads, D, vec);
  const bool vectors = qkv_vectors && rows_are_vectors(grad_o, gs, B, H, W, heads, D, vec) && dq % 16 == 0 && dk % 16 == 0 &&
                       dv % 16 == 0;
  const NaDims d = make_dims(B, H, W, heads, D, kernel_size, border, static_cast<float>(scale),
                             vectors ? vec : 1, eb);
  const dim3 grid = grid_1d(ceil_div(d.groups * d.G, kThreads), "neighborhood_attention (cuda)");
  const cudaStream_t s = as_stream(stream);
  dispatch(dtype, kernel_size, vectors, [&](auto tag, auto ksz, auto vsz) {
    using T = decltype(tag);
    constexpr int KS = decltype(ksz)::value, VEC = decltype(vsz)::value;
    launch("neighborhood_attention_backward_query", na_backward_query_kernel<T, KS, VEC>, grid,
           dim3(kThreads), 0, s, ptr<const T>(q), qs, ptr<const T>(k), ks, ptr<const T>(v), vs,
           ptr<const T>(grad_o), gs, ptr<const float>(lse), ptr<const float>(grad_lse), ptr<T>(dq),
           ptr<float>(delta), d);
    launch("neighborhood_attention_backward_key", na_backward_key_kernel<T, KS, VEC>, grid,
           dim3(kThreads), 0, s, ptr<const T>(q), qs, ptr<const T>(k), ks, ptr<const T>(v), vs,
           ptr<const T>(grad_o), gs, ptr<const float>(lse), static_cast<const float*>(ptr<float>(delta)),
           ptr<T>(dk), ptr<T>(dv), d);
  });
}

}  // namespace
}  // namespace fastnca

FASTNCA_BINDINGS(m) {
  using namespace pybind11::literals;
  m.def("na2d_forward", &fastnca::na2d_forward_cuda, "q"_a, "q_strides"_a, "k"_a, "k_strides"_a, "v"_a,
        "v_strides"_a, "o"_a, "lse"_a, "B"_a, "H"_a, "W"_a, "heads"_a, "D"_a, "kernel_size"_a, "border"_a,
        "scale"_a, "dtype"_a, "stream"_a,
        "Neighbourhood attention forward: o (contiguous, input dtype) and lse (contiguous fp32).");
  m.def("na2d_backward", &fastnca::na2d_backward_cuda, "grad_o"_a, "grad_o_strides"_a, "grad_lse"_a,
        "q"_a, "q_strides"_a, "k"_a, "k_strides"_a, "v"_a, "v_strides"_a, "lse"_a, "delta"_a, "dq"_a,
        "dk"_a, "dv"_a, "B"_a, "H"_a, "W"_a, "heads"_a, "D"_a, "kernel_size"_a, "border"_a, "scale"_a,
        "dtype"_a, "stream"_a,
        "Neighbourhood attention backward (grad_lse = 0 for none; delta: fp32 workspace [B,H,W,heads]).");
  m.def(
      "na2d_rows_are_vectors",
      [](std::uintptr_t p, const std::vector<int64_t>& strides, const std::vector<int64_t>& shape, int elem_bytes) {
        if (shape.size() != 5) throw std::invalid_argument("fastnca neighborhood_attention (cuda): expected 5 sizes");
        const int vec = 16 / elem_bytes;
        return fastnca::rows_are_vectors(p, fastnca::view5(strides, false), static_cast<int>(shape[0]),
                                         static_cast<int>(shape[1]), static_cast<int>(shape[2]),
                                         static_cast<int>(shape[3]), static_cast<int>(shape[4]), vec);
      },
      "p"_a, "strides"_a, "shape"_a, "elem_bytes"_a,
      "Whether the kernels read every [..., D] row of this tensor as 16-byte vectors.");
}
