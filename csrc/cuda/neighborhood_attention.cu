// neighborhood_attention2d on CUDA: forward and recompute backward (DESIGN.md, Op 3).
//
// Assumptions (python/fastnca/kernels/cuda/neighborhood_attention.py checks every one):
//   * q, k, v: [B, H, W, heads, D] of T in {float, __half, __nv_bfloat16}, element strides
//     with stride(-1) == 1 (strided views of a packed QKV tensor are fine); grad_o: any
//     strides. o, dq, dk, dv contiguous in T; lse, grad_lse, the Di workspace contiguous fp32.
//   * kernel_size in {3, 5, 7} (template), border code from borders.h; shift needs
//     H, W >= kernel_size. Sizes fit in int, element offsets use int64.
//
// Mapping: a group of G lanes (G = power of two <= 32, about D) owns one (cell, head): lanes
// stride over D, dot products are butterfly sums over the group (fixed order, so the
// recomputed logits of the backward are bit-identical to the forward's). All k^2 logits of
// a window stay in registers, so the softmax is exact (no online rescaling).
//
// Backward, no atomics:
//   query kernel: recompute s and p = exp(s - lse), dp_j = <do, v_j>,
//     Di = sum_j p_j dp_j - dlse (the same number as <do, o> - dlse, but from the fp32
//     recomputation instead of the rounded o), ds = p (dp - Di), dq = scale sum_j ds_j k_j;
//     Di goes to a workspace.
//   key kernel: each key gathers over its inverse neighbourhood (query_range + key_index):
//     dk = scale sum_i ds_ij q_i, dv = sum_i p_ij do_i, recomputing s_ij from q_i, k_j.
#include <vector>

#include <pybind11/stl.h>

#include "fastnca/bindings.h"
#include "fastnca/borders.h"
#include "fastnca/device_cuda.cuh"

namespace fastnca {
namespace {

constexpr int kThreads = 128;
constexpr int kKeyDims = 4;  // dims per lane accumulated at once by the key kernel
constexpr int kOutDims = 4;  // same for the o / dq sums

struct NaDims {
  int B, H, W, NH, D;
  int border;
  float scale;
  int G;  // lanes per (cell, head)
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
  q.n = static_cast<int>(gid % d.NH);
  int64_t t = gid / d.NH;
  q.x = static_cast<int>(t % d.W);
  t /= d.W;
  q.y = static_cast<int>(t % d.H);
  q.b = static_cast<int>(t / d.H);
  return q;
}

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

// s[j] = scale * <q, k_j> for the KS*KS window entries (row-major offsets); outside
// entries get 0 (zeros border: a zero key) -- callers apply the mask border.
template <typename T, int KS>
FASTNCA_DEVICE void window_logits(const T* __restrict__ q, const View5& qs, const T* __restrict__ k,
                                  const View5& ks, const Query& qq, const Window<KS>& win,
                                  const NaDims& d, int lane, unsigned mask, float (&s)[KS * KS]) {
  const T* qp = q + pixel_offset(qs, qq.b, qq.y, qq.x, qq.n);
  const T* kb = k + qq.b * ks.b + qq.n * ks.n;
  // Key-outer loops keep one key address live at a time (k^2 = 49 hoisted addresses spill).
#pragma unroll
  for (int a = 0; a < KS; ++a)
#pragma unroll
    for (int b = 0; b < KS; ++b) {
      float acc = 0.f;
      if (win.ky[a] >= 0 && win.kx[b] >= 0) {
        const T* kp = kb + win.ky[a] * ks.h + win.kx[b] * ks.w;
        for (int dd = lane; dd < d.D; dd += d.G) acc = fmaf(load(qp + dd), load(kp + dd), acc);
      }
      s[a * KS + b] = acc;
    }
#pragma unroll
  for (int j = 0; j < KS * KS; ++j) s[j] = group_sum(s[j], mask, d.G) * d.scale;
}

// out[dd] = mult * sum_j c[j] * t_j[dd] over the window's in-grid entries, dims in passes of
// kOutDims per lane so that only one key address is live at a time.
template <typename T, int KS>
FASTNCA_DEVICE void window_combine(const T* __restrict__ t, const View5& ts, const Query& qq,
                                   const Window<KS>& win, const NaDims& d, int lane,
                                   const float (&c)[KS * KS], float mult, T* __restrict__ out) {
  const T* tb = t + qq.b * ts.b + qq.n * ts.n;
  for (int d0 = 0; d0 < d.D; d0 += kOutDims * d.G) {
    float acc[kOutDims];
#pragma unroll
    for (int u = 0; u < kOutDims; ++u) acc[u] = 0.f;
#pragma unroll
    for (int a = 0; a < KS; ++a)
#pragma unroll
      for (int b = 0; b < KS; ++b) {
        if (win.ky[a] < 0 || win.kx[b] < 0) continue;
        const T* tp = tb + win.ky[a] * ts.h + win.kx[b] * ts.w;
        const float cj = c[a * KS + b];
#pragma unroll
        for (int u = 0; u < kOutDims; ++u) {
          const int dd = d0 + lane + u * d.G;
          if (dd < d.D) acc[u] = fmaf(cj, load(tp + dd), acc[u]);
        }
      }
#pragma unroll
    for (int u = 0; u < kOutDims; ++u) {
      const int dd = d0 + lane + u * d.G;
      if (dd < d.D) store(out + dd, acc[u] * mult);
    }
  }
}

FASTNCA_DEVICE bool in_softmax(int ky, int kx, int border) {
  return border != kBorderMask || (ky >= 0 && kx >= 0);
}

// ---- forward --------------------------------------------------------------------------------

template <typename T, int KS>
__global__ void __launch_bounds__(kThreads)
na_forward_kernel(const T* __restrict__ q, View5 qs, const T* __restrict__ k, View5 ks,
                  const T* __restrict__ v, View5 vs, T* __restrict__ o, float* __restrict__ lse, NaDims d) {
  constexpr int KK = KS * KS;
  const int64_t gid = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / d.G;
  if (gid >= static_cast<int64_t>(d.B) * d.H * d.W * d.NH) return;  // whole groups leave together
  const int lane = static_cast<int>(threadIdx.x) & (d.G - 1);
  const unsigned mask = group_mask(d.G);
  const Query qq = decode(gid, d);
  const Window<KS> win = window_of<KS>(qq, d);

  float s[KK];
  window_logits<T, KS>(q, qs, k, ks, qq, win, d, lane, mask, s);
  float m = -INFINITY;
#pragma unroll
  for (int a = 0; a < KS; ++a)
#pragma unroll
    for (int b = 0; b < KS; ++b)
      if (in_softmax(win.ky[a], win.kx[b], d.border)) m = fmaxf(m, s[a * KS + b]);
  float l = 0.f;
#pragma unroll
  for (int a = 0; a < KS; ++a)
#pragma unroll
    for (int b = 0; b < KS; ++b) {
      const int j = a * KS + b;
      s[j] = in_softmax(win.ky[a], win.kx[b], d.border) ? expf(s[j] - m) : 0.f;
      l += s[j];
    }

  window_combine<T, KS>(v, vs, qq, win, d, lane, s, 1.f / l, o + gid * d.D);
  if (lane == 0) lse[gid] = m + logf(l);
}

// ---- backward: queries -------------------------------------------------------------------------

template <typename T, int KS>
__global__ void __launch_bounds__(kThreads)
na_backward_query_kernel(const T* __restrict__ q, View5 qs, const T* __restrict__ k, View5 ks,
                         const T* __restrict__ v, View5 vs, const T* __restrict__ go, View5 gos,
                         const float* __restrict__ lse, const float* __restrict__ dlse,
                         T* __restrict__ dq, float* __restrict__ delta, NaDims d) {
  constexpr int KK = KS * KS;
  const int64_t gid = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / d.G;
  if (gid >= static_cast<int64_t>(d.B) * d.H * d.W * d.NH) return;
  const int lane = static_cast<int>(threadIdx.x) & (d.G - 1);
  const unsigned mask = group_mask(d.G);
  const Query qq = decode(gid, d);
  const Window<KS> win = window_of<KS>(qq, d);

  float p[KK];
  window_logits<T, KS>(q, qs, k, ks, qq, win, d, lane, mask, p);
  const float lse_i = lse[gid];
#pragma unroll
  for (int a = 0; a < KS; ++a)
#pragma unroll
    for (int b = 0; b < KS; ++b) {
      const int j = a * KS + b;
      p[j] = in_softmax(win.ky[a], win.kx[b], d.border) ? expf(p[j] - lse_i) : 0.f;
    }

  // dp_j = <do, v_j> (zero value outside the grid)
  float dp[KK];
  const T* gp = go + qq.b * gos.b + qq.y * gos.h + qq.x * gos.w + qq.n * gos.n;
  const T* vb = v + qq.b * vs.b + qq.n * vs.n;
#pragma unroll
  for (int a = 0; a < KS; ++a)
#pragma unroll
    for (int b = 0; b < KS; ++b) {
      float acc = 0.f;
      if (win.ky[a] >= 0 && win.kx[b] >= 0) {
        const T* vp = vb + win.ky[a] * vs.h + win.kx[b] * vs.w;
        for (int dd = lane; dd < d.D; dd += d.G) acc = fmaf(load(gp + dd * gos.d), load(vp + dd), acc);
      }
      dp[a * KS + b] = acc;
    }
  float di = 0.f;
#pragma unroll
  for (int j = 0; j < KK; ++j) {
    dp[j] = group_sum(dp[j], mask, d.G);
    di = fmaf(p[j], dp[j], di);
  }
  if (dlse != nullptr) di -= dlse[gid];
#pragma unroll
  for (int j = 0; j < KK; ++j) p[j] = p[j] * (dp[j] - di);  // ds_j (without scale)

  window_combine<T, KS>(k, ks, qq, win, d, lane, p, d.scale, dq + gid * d.D);
  if (lane == 0) delta[gid] = di;
}

// ---- backward: keys ------------------------------------------------------------------------------

template <typename T, int KS>
__global__ void __launch_bounds__(kThreads)
na_backward_key_kernel(const T* __restrict__ q, View5 qs, const T* __restrict__ k, View5 ks,
                       const T* __restrict__ v, View5 vs, const T* __restrict__ go, View5 gos,
                       const float* __restrict__ lse, const float* __restrict__ delta,
                       T* __restrict__ dk, T* __restrict__ dv, NaDims d) {
  constexpr int r = KS / 2;
  const int64_t gid = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / d.G;
  if (gid >= static_cast<int64_t>(d.B) * d.H * d.W * d.NH) return;
  const int lane = static_cast<int>(threadIdx.x) & (d.G - 1);
  const unsigned mask = group_mask(d.G);
  const Query kk = decode(gid, d);  // this group's key
  const T* kp = k + pixel_offset(ks, kk.b, kk.y, kk.x, kk.n);
  const T* vp = v + pixel_offset(vs, kk.b, kk.y, kk.x, kk.n);
  const int64_t img = static_cast<int64_t>(kk.b) * d.H;

  for (int d0 = 0; d0 < d.D; d0 += kKeyDims * d.G) {
    float gk[kKeyDims], gv[kKeyDims];
#pragma unroll
    for (int u = 0; u < kKeyDims; ++u) gk[u] = gv[u] = 0.f;
    for (int a = 0; a < KS; ++a) {
      int ylo, yhi;
      query_range(kk.y, a - r, d.H, r, d.border, &ylo, &yhi);
      for (int qy = max(ylo, 0); qy <= min(yhi, d.H - 1); ++qy) {
        if (key_index(qy, a - r, d.H, r, d.border) != kk.y) continue;
        for (int b = 0; b < KS; ++b) {
          int xlo, xhi;
          query_range(kk.x, b - r, d.W, r, d.border, &xlo, &xhi);
          for (int qx = max(xlo, 0); qx <= min(xhi, d.W - 1); ++qx) {
            if (key_index(qx, b - r, d.W, r, d.border) != kk.x) continue;
            // query (qy, qx) reads this key through window offset (a, b)
            const int64_t qi = ((img + qy) * d.W + qx) * d.NH + kk.n;
            const T* qp = q + pixel_offset(qs, kk.b, qy, qx, kk.n);
            const T* gp = go + kk.b * gos.b + qy * gos.h + qx * gos.w + kk.n * gos.n;
            float s = 0.f, dp = 0.f;
            for (int dd = lane; dd < d.D; dd += d.G) {
              s = fmaf(load(qp + dd), load(kp + dd), s);
              dp = fmaf(load(gp + dd * gos.d), load(vp + dd), dp);
            }
            s = group_sum(s, mask, d.G) * d.scale;
            dp = group_sum(dp, mask, d.G);
            const float p = expf(s - lse[qi]);
            const float ds = p * (dp - delta[qi]);
#pragma unroll
            for (int u = 0; u < kKeyDims; ++u) {
              const int dd = d0 + lane + u * d.G;
              if (dd < d.D) {
                gk[u] = fmaf(ds, load(qp + dd), gk[u]);
                gv[u] = fmaf(p, load(gp + dd * gos.d), gv[u]);
              }
            }
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kKeyDims; ++u) {
      const int dd = d0 + lane + u * d.G;
      if (dd < d.D) {
        store(dk + gid * d.D + dd, gk[u] * d.scale);
        store(dv + gid * d.D + dd, gv[u]);
      }
    }
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

NaDims make_dims(int B, int H, int W, int NH, int D, int kernel_size, int border, float scale) {
  if (B < 1 || H < 1 || W < 1 || NH < 1 || D < 1)
    throw std::invalid_argument("fastnca neighborhood_attention (cuda): invalid sizes");
  if (kernel_size != 3 && kernel_size != 5 && kernel_size != 7)
    throw std::invalid_argument("fastnca neighborhood_attention (cuda): kernel_size must be 3, 5 or 7");
  if (border < 0 || border > 3) throw std::invalid_argument("fastnca neighborhood_attention (cuda): bad border code");
  if (border == kBorderShift && (H < kernel_size || W < kernel_size))
    throw std::invalid_argument("fastnca neighborhood_attention (cuda): shift border needs H, W >= kernel_size");
  if (H > (1 << 30) || W > (1 << 30))  // the border maps' int arithmetic (borders.h)
    throw std::invalid_argument("fastnca neighborhood_attention (cuda): H and W must be at most 2^30");
  NaDims d{B, H, W, NH, D, border, scale, 1};
  while (d.G < 32 && d.G < D) d.G *= 2;  // lanes about D, at most a warp
  return d;
}

dim3 grid_of(const NaDims& d) {
  const int64_t threads = static_cast<int64_t>(d.B) * d.H * d.W * d.NH * d.G;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff)  // gridDim.x limit
    throw std::invalid_argument("fastnca neighborhood_attention (cuda): B*H*W*heads too large for one launch");
  return dim3(static_cast<unsigned>(blocks));
}

// Calls f(T{}, std::integral_constant<int, KS>{}) for the dtype and kernel size.
template <typename Fn>
void dispatch(int dtype, int kernel_size, Fn&& f) {
  auto with_ks = [&](auto tag) {
    switch (kernel_size) {
      case 3: f(tag, std::integral_constant<int, 3>{}); break;
      case 5: f(tag, std::integral_constant<int, 5>{}); break;
      default: f(tag, std::integral_constant<int, 7>{}); break;
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

void na2d_forward_cuda(std::uintptr_t q, const std::vector<int64_t>& q_strides, std::uintptr_t k,
                       const std::vector<int64_t>& k_strides, std::uintptr_t v,
                       const std::vector<int64_t>& v_strides, std::uintptr_t o, std::uintptr_t lse, int B,
                       int H, int W, int heads, int D, int kernel_size, int border, double scale, int dtype,
                       std::uintptr_t stream) {
  const NaDims d = make_dims(B, H, W, heads, D, kernel_size, border, static_cast<float>(scale));
  const View5 qs = view5(q_strides, true), ks = view5(k_strides, true), vs = view5(v_strides, true);
  dispatch(dtype, kernel_size, [&](auto tag, auto ksz) {
    using T = decltype(tag);
    constexpr int KS = decltype(ksz)::value;
    launch("neighborhood_attention_forward", na_forward_kernel<T, KS>, grid_of(d), dim3(kThreads), 0,
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
  const NaDims d = make_dims(B, H, W, heads, D, kernel_size, border, static_cast<float>(scale));
  const View5 qs = view5(q_strides, true), ks = view5(k_strides, true), vs = view5(v_strides, true);
  const View5 gs = view5(grad_o_strides, false);
  const cudaStream_t s = as_stream(stream);
  dispatch(dtype, kernel_size, [&](auto tag, auto ksz) {
    using T = decltype(tag);
    constexpr int KS = decltype(ksz)::value;
    launch("neighborhood_attention_backward_query", na_backward_query_kernel<T, KS>, grid_of(d),
           dim3(kThreads), 0, s, ptr<const T>(q), qs, ptr<const T>(k), ks, ptr<const T>(v), vs,
           ptr<const T>(grad_o), gs, ptr<const float>(lse), ptr<const float>(grad_lse), ptr<T>(dq),
           ptr<float>(delta), d);
    launch("neighborhood_attention_backward_key", na_backward_key_kernel<T, KS>, grid_of(d),
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
}
