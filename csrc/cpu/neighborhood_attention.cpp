// neighborhood_attention2d on the CPU (DESIGN.md, Op 3): fused forward and backward.
//
// Kernel assumptions (python/fastnca/kernels/cpu/neighborhood_attention.py enforces them;
// make_problem() below re-checks the scalar ones and every pointer for null):
//  * q, k, v, o, grad_o: [B, H, W, heads, D] views given by a data pointer and the element
//    strides of dims 0..3; dim 4 (D) has stride 1. q/k/v may be strided views of one
//    packed qkv tensor; they are only read.
//  * lse, grad_lse (optional), workspace: contiguous, compute dtype.
//  * outputs (o, lse, dq, dk, dv): contiguous, o/dq/dk/dv in the input dtype.
//  * dtype code 0..3 (common.h): fp32/fp16/bf16 compute in fp32, fp64 in fp64.
//  * kernel_size in {3, 5, 7}, border code 0..3 (borders.h); shift needs H, W >= kernel_size.
//
// Design
//  * Forward, per query (b, y, x, head): the <= ks^2 logits of its window live in a stack
//    array (no unfolded K/V, no score matrix), softmax in the compute type, o = sum p v.
//    Window keys come from key_index() per axis (tables built once per call).
//  * Backward pass 1, per query: recompute s and p = exp(s - lse), dp_j = <do, v_j>,
//    Di = sum_j p_j dp_j - dlse, ds = p (dp - Di), dq = scale sum_j ds_j k_j (Di from the
//    compute-type p and dp, not from the stored o: see backward_query_rows). It also writes p and
//    scale*ds of every window entry to a workspace [B, H, W, heads, 2, ks^2] (18 values per
//    query-head at ks=3, 28% of q at D=64). Pass 2 then needs no dot product at all:
//    5 D-length ops per (query, key) pair instead of 7 when pass 2 recomputes s and dp.
//  * Backward pass 2, per key: dk_j = sum scale ds_ij q_i and dv_j = sum p_ij do_i over
//    the key's inverse neighbourhood, enumerated per axis with query_range() + key_index()
//    (covers shift's asymmetric windows and circular's repeats on grids smaller than the
//    window). Every output element is written by one thread in a fixed order: bitwise
//    deterministic whatever the thread count, no atomics.
//  * Parallel over (b, y) rows (OpenMP, static contiguous ranges, torch's thread count);
//    within a query position the heads go in chunks, phase by phase (see kHeadChunk).
//  * SIMD: GCC vector extensions, templated on the vector width, compiled three times with
//    target attributes (avx512f+bw+vl at 64-byte vectors, avx2+fma+f16c at 32 bytes, the
//    x86-64 baseline) and picked at run time with __builtin_cpu_supports: the wheel is
//    built without -march=native. D = 32, 64, 128 are compile-time (fully unrolled);
//    any other D runs the same code with a run-time D.
//
// Measured (2 cores shared with other jobs, AVX2, fp32, GeCA-XS attention 32x32, 6 heads,
// D=64, packed qkv, min wall time): B=8 forward 7.7 ms vs compiled FlexAttention (3x3
// block mask) 120 ms and unfold (GeCA) 664 ms; forward+backward 54 ms vs unfold 1120 ms.
// B=32: forward 58 ms vs 537 / 2098 ms; forward+backward 331 ms vs 3824 ms. At B=32 page
// faults on the fresh 50 MB outputs are about half of our time (THP_MEM_ALLOC_ENABLE=1:
// forward 26 ms, forward+backward 125 ms).
#include "fastnca/bindings.h"
#include "fastnca/borders.h"
#include "fastnca/common.h"
#include "fastnca/half.h"

#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>
#ifdef FASTNCA_OPENMP
#include <omp.h>
#endif

#define FASTNCA_NA_INLINE inline __attribute__((always_inline))

namespace fastnca {
namespace {

constexpr int kMaxWindow = 49;  // 7 x 7
// Logit arrays are padded to whole vectors (16 lanes at most): 64 covers 49.
constexpr int kWindowPad = 64;
// Pairs per key in backward pass 2: at most (3r+1)^2 = 100 (shift, r = 3, next to a
// border); make_problem() checks the bound.
constexpr int kMaxPairs = 169;

// ---- vector helpers ------------------------------------------------------------------
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of always_inline helpers only

// 16-bit -> 32-bit lane widening, one overload per width (vector types do not survive as
// template arguments in GCC, and __builtin_convertvector rejects dependent member typedefs).
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
FASTNCA_NA_INLINE u32x8 widen(u16x8 h) { return __builtin_convertvector(h, u32x8); }
FASTNCA_NA_INLINE u32x16 widen(u16x16 h) { return __builtin_convertvector(h, u32x16); }
// Integer lanes (< 2^24) to float, exactly.
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
FASTNCA_NA_INLINE f32x8 to_float(u32x8 u) { return __builtin_convertvector(u, f32x8); }
FASTNCA_NA_INLINE f32x16 to_float(u32x16 u) { return __builtin_convertvector(u, f32x16); }

// Vector types per (compute type, vector bytes), spelled out: GCC drops vector_size
// attributes that depend on template parameters at template definition time.
template <class C, int kVB> struct VecTypes;
template <> struct VecTypes<float, 32> {
  typedef float V __attribute__((vector_size(32)));
  typedef u32x8 U;
  typedef u16x8 H16;
};
template <> struct VecTypes<float, 64> {
  typedef float V __attribute__((vector_size(64)));
  typedef u32x16 U;
  typedef u16x16 H16;
};
template <> struct VecTypes<double, 32> {
  typedef double V __attribute__((vector_size(32)));
};
template <> struct VecTypes<double, 64> {
  typedef double V __attribute__((vector_size(64)));
};

// Cfg<dtype code, vector bytes, D (0 = run time)>: storage type T, compute type C, lanes L.
template <int kDType_, int kVB_, int kD_>
struct Cfg {
  static constexpr int kDType = kDType_;
  static constexpr int kD = kD_;
  using S = Scalar<kDType_>;
  using T = typename S::T;
  using C = typename std::conditional<kDType_ == kFloat64, double, float>::type;
  static constexpr int L = kVB_ / static_cast<int>(sizeof(C));
  using V = typename VecTypes<C, kVB_>::V;
  static_assert(kWindowPad % L == 0, "logit arrays must hold whole vectors");
  static constexpr bool kSameType = std::is_same<T, C>::value;  // fp32 / fp64 storage

  static FASTNCA_NA_INLINE V loadc(const C* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static FASTNCA_NA_INLINE void storec(C* p, V v) { std::memcpy(p, &v, sizeof v); }
  static FASTNCA_NA_INLINE V splat(C x) { return V{} + x; }

  // L elements of storage type at p, converted to the compute type.
  static FASTNCA_NA_INLINE V load(const T* p) {
    if constexpr (kDType == kFloat16) {
      // Branch-free half -> float, with integer operations and one exact int -> float
      // conversion: no float32 denormal arises, so the flush-to-zero / denormals-are-zero
      // modes (torch.set_flush_denormal, or a library built with -ffast-math) cannot flush
      // half subnormals (the multiply-by-2^112 rebias read them as float32 denormals: DAZ
      // made them 0). Normals: exponent+mantissa shifted into place, rebiased 15 -> 127;
      // subnormals and zero: mantissa * 2^-24; inf/NaN patched.
      using U = typename VecTypes<C, kVB_>::U;
      typename VecTypes<C, kVB_>::H16 h;
      std::memcpy(&h, p, sizeof h);
      const U u = widen(h);
      const U em = (u & 0x7fffu) << 13;
      const V sub = to_float(u & 0x3ffu) * 0x1p-24f;
      U sub_bits;
      std::memcpy(&sub_bits, &sub, sizeof sub_bits);
      U bits = em < (1u << 23) ? sub_bits : em + ((127u - 15u) << 23);
      bits = em >= (0x7c00u << 13) ? (em | 0x7f800000u) : bits;
      bits |= (u & 0x8000u) << 16;
      V f;
      std::memcpy(&f, &bits, sizeof f);
      return f;
    } else if constexpr (kDType == kBFloat16) {
      using U = typename VecTypes<C, kVB_>::U;
      typename VecTypes<C, kVB_>::H16 h;
      std::memcpy(&h, p, sizeof h);
      const U u = widen(h) << 16;
      V f;
      std::memcpy(&f, &u, sizeof f);
      return f;
    } else {
      V v;
      std::memcpy(&v, p, sizeof v);
      return v;
    }
  }

  static FASTNCA_NA_INLINE C hsum(V v) {
    C t[L];
    std::memcpy(t, &v, sizeof v);
    for (int w = L / 2; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) t[i] += t[i + w];
    return t[0];
  }
  static FASTNCA_NA_INLINE C hmax(V v) {
    C t[L];
    std::memcpy(t, &v, sizeof v);
    for (int w = L / 2; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) t[i] = t[i] > t[i + w] ? t[i] : t[i + w];
    return t[0];
  }

  // exp of every lane. float: Cody-Waite reduction by ln2 and the Cephes expf polynomial
  // (max rel. error ~1.5e-7 on our inputs, which are <= 0); exactly 0 below -87.3 (and
  // for -inf). Inputs above 88 saturate at e^88: logits minus their max never get there.
  static FASTNCA_NA_INLINE V vexp(V x) {
    if constexpr (std::is_same<C, float>::value) {
      using U = typename VecTypes<C, kVB_>::U;
      const auto under = x < splat(-87.33654f);
      x = x > splat(88.0f) ? splat(88.0f) : x;
      x = x < splat(-87.33654f) ? splat(-87.33654f) : x;
      const V magic = splat(0x1.8p23f);  // adding it rounds to an integer in the low bits
      const V t = x * 1.44269504088896341f + magic;
      const V n = t - magic;
      V r = x - n * 0.693359375f;
      r = r - n * -2.12194440e-4f;
      V p = splat(1.9875691500e-4f);
      p = p * r + 1.3981999507e-3f;
      p = p * r + 8.3334519073e-3f;
      p = p * r + 4.1665795894e-2f;
      p = p * r + 1.6666665459e-1f;
      p = p * r + 5.0000001201e-1f;
      p = p * (r * r) + r + 1.0f;
      U ti;
      std::memcpy(&ti, &t, sizeof ti);
      const U pow2 = (ti + (127u - 0x4B400000u)) << 23;  // 2^n
      V scale;
      std::memcpy(&scale, &pow2, sizeof scale);
      p = p * scale;
      return under ? V{} : p;
    } else {
      C t[L];
      std::memcpy(t, &x, sizeof x);
      for (int i = 0; i < L; ++i) t[i] = std::exp(t[i]);
      return loadc(t);
    }
  }
};

// dst[0..D) = src converted to the compute type.
template <class K>
FASTNCA_NA_INLINE void to_compute(const typename K::T* __restrict src, typename K::C* __restrict dst, int D) {
  constexpr int L = K::L;
  const int nv = (K::kD ? K::kD : D) / L;
  for (int c = 0; c < nv; ++c) K::storec(dst + c * L, K::load(src + c * L));
  for (int d = nv * L; d < (K::kD ? K::kD : D); ++d) dst[d] = K::S::load(src + d);
}

// dst[0..D) = src rounded to the 16-bit storage type (fp32/fp64 outputs are written in
// place by the kernels).
template <class K>
FASTNCA_NA_INLINE void from_compute(const typename K::C* __restrict src, typename K::T* __restrict dst, int D) {
  const int n = K::kD ? K::kD : D;
  for (int d = 0; d < n; ++d) K::S::store(dst + d, src[d]);
}

// out[j] = <a, ptrs[j]> for j < n, and out[n .. next multiple of L) = 0. Two keys per
// sweep share the loads of a; all lane sums are formed before any horizontal sum so the
// sweeps do not wait on the reductions. (A shuffle-tree reduction of L keys at a time
// measured the same as one horizontal sum per key: 148 vs 154 ns/query-head forward.)
template <class K>
FASTNCA_NA_INLINE void multi_dot(const typename K::C* __restrict a, const typename K::T* const* ptrs, int n,
                                 int Drt, typename K::C* __restrict out) {
  using C = typename K::C;
  using V = typename K::V;
  constexpr int L = K::L;
  const int D = K::kD ? K::kD : Drt;
  const int nv = D / L;
  V acc[kWindowPad];
  int j = 0;
  for (; j + 2 <= n; j += 2) {
    const typename K::T* p0 = ptrs[j];
    const typename K::T* p1 = ptrs[j + 1];
    V acc0 = {}, acc1 = {};
    for (int c = 0; c < nv; ++c) {
      const V x = K::loadc(a + c * L);
      acc0 += x * K::load(p0 + c * L);
      acc1 += x * K::load(p1 + c * L);
    }
    acc[j] = acc0;
    acc[j + 1] = acc1;
  }
  if (j < n) {
    const typename K::T* p0 = ptrs[j];
    V acc0 = {};
    for (int c = 0; c < nv; ++c) acc0 += K::loadc(a + c * L) * K::load(p0 + c * L);
    acc[j] = acc0;
  }
  const int npad = (n + L - 1) / L * L;
  for (j = 0; j < n; ++j) out[j] = K::hsum(acc[j]);
  for (j = n; j < npad; ++j) out[j] = 0;
  if (nv * L < D) {
    for (j = 0; j < n; ++j) {
      C s = 0;
      for (int d = nv * L; d < D; ++d) s += a[d] * K::S::load(ptrs[j] + d);
      out[j] += s;
    }
  }
}

// out[c*L .. (c+NB)*L) = sum_j w[j] ptrs[j][...] for every block of NB vectors from c on.
template <class K, int NB>
FASTNCA_NA_INLINE int weighted_sum_blocks(const typename K::C* __restrict w, const typename K::T* const* ptrs,
                                          int n, int c, int nv, typename K::C* __restrict out) {
  using V = typename K::V;
  constexpr int L = K::L;
  for (; c + NB <= nv; c += NB) {
    V acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = V{};
    for (int j = 0; j < n; ++j) {
      const V wj = K::splat(w[j]);
      const typename K::T* p = ptrs[j] + c * L;
      for (int b = 0; b < NB; ++b) acc[b] += wj * K::load(p + b * L);
    }
    for (int b = 0; b < NB; ++b) K::storec(out + (c + b) * L, acc[b]);
  }
  return c;
}

// out[d] = sum_{j < n} w[j] ptrs[j][d] for d < D (zeros when n == 0). Accumulators stay in
// registers: blocks of 8 vectors (8 of AVX2's 16 ymm), then 4, 2, 1, scalar tail.
template <class K>
FASTNCA_NA_INLINE void weighted_sum(const typename K::C* __restrict w, const typename K::T* const* ptrs, int n,
                                    int Drt, typename K::C* __restrict out) {
  using C = typename K::C;
  constexpr int L = K::L;
  const int D = K::kD ? K::kD : Drt;
  const int nv = D / L;
  int c = weighted_sum_blocks<K, 8>(w, ptrs, n, 0, nv, out);
  c = weighted_sum_blocks<K, 4>(w, ptrs, n, c, nv, out);
  c = weighted_sum_blocks<K, 2>(w, ptrs, n, c, nv, out);
  weighted_sum_blocks<K, 1>(w, ptrs, n, c, nv, out);
  for (int d = nv * L; d < D; ++d) {
    C s = 0;
    for (int j = 0; j < n; ++j) s += w[j] * K::S::load(ptrs[j] + d);
    out[d] = s;
  }
}

// In place: logits s[0..n) -> softmax weights; n_zero more logits of exactly 0 (border
// "zeros") take part in the normalisation. Returns the log-sum-exp. s has room for
// kWindowPad entries.
template <class K>
FASTNCA_NA_INLINE typename K::C softmax(typename K::C* __restrict s, int n, int n_zero) {
  using C = typename K::C;
  using V = typename K::V;
  constexpr int L = K::L;
  const int npad = (n + L - 1) / L * L;
  for (int j = n; j < npad; ++j) s[j] = -std::numeric_limits<C>::infinity();  // exp -> 0
  V mv = K::splat(n_zero ? C(0) : -std::numeric_limits<C>::infinity());
  for (int j = 0; j < npad; j += L) {
    const V x = K::loadc(s + j);
    mv = x > mv ? x : mv;
  }
  const C m = K::hmax(mv);
  V sv = {};
  for (int j = 0; j < npad; j += L) {
    const V e = K::vexp(K::loadc(s + j) - m);
    K::storec(s + j, e);
    sv += e;
  }
  const C sum = K::hsum(sv) + (n_zero ? static_cast<C>(n_zero) * std::exp(-m) : C(0));
  const C inv = C(1) / sum;
  for (int j = 0; j < npad; j += L) K::storec(s + j, K::loadc(s + j) * inv);
  return std::isinf(m) ? m : m + std::log(sum);  // +inf / all -inf logits: as torch.logsumexp
}

// ---- arguments ---------------------------------------------------------------------
struct View {  // a [B, H, W, heads, D] tensor with stride 1 along D
  std::uintptr_t ptr;
  int64_t s[4];
};

// Inverse neighbourhood along one axis: the (query coordinate, offset index) pairs whose
// key coordinate is j are entries[start[j] .. start[j+1]).
struct Inverse {
  std::vector<int64_t> start;  // CSR row starts: n * ks entries can pass 2^31 on long axes
  std::vector<int> query, offset;
};

struct Problem {
  int B, H, W, NH, D, ks, border;
  double scale;
  std::vector<int> ykey, xkey;  // [H * ks], [W * ks]: key coordinate per (query coordinate, offset), -1 outside
  Inverse yinv, xinv;
};

struct Args {
  const Problem* p;
  View q, k, v, dO;  // dO: backward only
  std::uintptr_t o_out, lse, dlse, ws, dq, dk, dv;
};

using RowsFn = void (*)(const Args&, int64_t, int64_t);

// Base pointer of (b, y, x, h) in a view, strides held in locals by the callers.
template <class T>
FASTNCA_NA_INLINE const T* at(std::uintptr_t base, const int64_t* s, int b, int y, int x, int h) {
  return reinterpret_cast<const T*>(base) + b * s[0] + y * s[1] + x * s[2] + h * s[3];
}

// The window of query (y, x): element offsets (without batch and head) of its in-grid
// keys in k and v, their window indices, and how many neighbours fall outside.
struct Window {
  int n, n_out;
  int64_t koff[kMaxWindow], voff[kMaxWindow];
  int idx[kMaxWindow];
};

FASTNCA_NA_INLINE void gather_window(const Problem& P, const int64_t* ks_, const int64_t* vs_, int y, int x,
                                     Window& w) {
  const int ks = P.ks;
  const int* yk = P.ykey.data() + static_cast<size_t>(y) * ks;
  const int* xk = P.xkey.data() + static_cast<size_t>(x) * ks;
  w.n = 0;
  w.n_out = 0;
  for (int ia = 0; ia < ks; ++ia) {
    for (int ic = 0; ic < ks; ++ic) {
      if (yk[ia] < 0 || xk[ic] < 0) {
        ++w.n_out;
        continue;
      }
      w.koff[w.n] = yk[ia] * ks_[1] + xk[ic] * ks_[2];
      w.voff[w.n] = yk[ia] * vs_[1] + xk[ic] * vs_[2];
      w.idx[w.n] = ia * ks + ic;
      ++w.n;
    }
  }
}

// Heads of one query position are processed in chunks, phase by phase (all dot products,
// then all softmaxes, then all weighted sums): the heads' dependency chains (dots ->
// reduction -> max -> exp -> sum -> weights) are independent, and the out-of-order core
// overlaps them; one head at a time was latency-bound.
// TUNING(kHeadChunk): GeCA-XS heads (6 x 64, fp32, AVX2, 1 thread, CPU time per
// query-head): one head at a time -> chunks of 8 (with fp32 q read in place):
// forward 158 -> 145 ns in cache (1x16x16), 300 -> 231 ns at 8x32x32; backward 864/520
// -> 523 ns at 8x32x32 (noisy: 2 cores shared with other jobs).
constexpr int kHeadChunk = 8;

// The query-side vector of head h in the compute type: the tensor itself for fp32/fp64
// (read in place), else converted into buf.
template <class K>
FASTNCA_NA_INLINE const typename K::C* query_side(const typename K::T* src, typename K::C* buf, int D) {
  if constexpr (K::kSameType) {
    return src;
  } else {
    to_compute<K>(src, buf, D);
    return buf;
  }
}

// ---- forward --------------------------------------------------------------------------
template <class K>
FASTNCA_NA_INLINE void forward_rows(const Args& a, int64_t r0, int64_t r1) {
  using T = typename K::T;
  using C = typename K::C;
  constexpr bool kSameType = K::kSameType;
  const Problem& P = *a.p;
  const int D = K::kD ? K::kD : P.D, NH = P.NH, W = P.W;
  const int n_zero_mode = P.border == kBorderZeros;
  const C scale = static_cast<C>(P.scale);
  int64_t qs[4], ks_[4], vs_[4];
  for (int i = 0; i < 4; ++i) qs[i] = a.q.s[i], ks_[i] = a.k.s[i], vs_[i] = a.v.s[i];
  std::vector<C> buf((kHeadChunk + 1) * static_cast<size_t>(D));
  C* __restrict ob = buf.data() + kHeadChunk * static_cast<size_t>(D);
  const T* kp[kMaxWindow];
  const T* vp[kMaxWindow];
  alignas(64) C s[kHeadChunk][kWindowPad];
  C l[kHeadChunk];
  Window win;
  T* out = reinterpret_cast<T*>(a.o_out);
  C* lse = reinterpret_cast<C*>(a.lse);
  for (int64_t row = r0; row < r1; ++row) {
    const int b = static_cast<int>(row / P.H), y = static_cast<int>(row % P.H);
    for (int x = 0; x < W; ++x) {
      gather_window(P, ks_, vs_, y, x, win);
      const int n = win.n;
      if (n > kMaxWindow) __builtin_unreachable();
      for (int h0 = 0; h0 < NH; h0 += kHeadChunk) {
        const int hn = std::min(kHeadChunk, NH - h0);
        for (int t = 0; t < hn; ++t) {
          const T* kh = at<T>(a.k.ptr, ks_, b, 0, 0, h0 + t);
          for (int j = 0; j < n; ++j) kp[j] = kh + win.koff[j];
          const C* qa = query_side<K>(at<T>(a.q.ptr, qs, b, y, x, h0 + t), buf.data() + t * D, D);
          multi_dot<K>(qa, kp, n, D, s[t]);
        }
        for (int t = 0; t < hn; ++t) {
          for (int j = 0; j < n; ++j) s[t][j] *= scale;
          // zeros: every outside neighbour is a logit of exactly 0 inside the softmax.
          l[t] = softmax<K>(s[t], n, n_zero_mode * win.n_out);
        }
        for (int t = 0; t < hn; ++t) {
          const T* vh = at<T>(a.v.ptr, vs_, b, 0, 0, h0 + t);
          for (int j = 0; j < n; ++j) vp[j] = vh + win.voff[j];
          const int64_t i = (row * W + x) * NH + h0 + t;
          if constexpr (kSameType) {
            weighted_sum<K>(s[t], vp, n, D, reinterpret_cast<C*>(out + i * D));
          } else {
            weighted_sum<K>(s[t], vp, n, D, ob);
            from_compute<K>(ob, out + i * D, D);
          }
          lse[i] = l[t];
        }
      }
    }
  }
}

// ---- backward pass 1: per query (dq, workspace of p and scale*ds) ---------------------
template <class K>
FASTNCA_NA_INLINE void backward_query_rows(const Args& a, int64_t r0, int64_t r1) {
  using T = typename K::T;
  using C = typename K::C;
  constexpr bool kSameType = K::kSameType;
  using V = typename K::V;
  constexpr int L = K::L;
  const Problem& P = *a.p;
  const int D = K::kD ? K::kD : P.D, kk = P.ks * P.ks, NH = P.NH, W = P.W;
  const C scale = static_cast<C>(P.scale);
  int64_t qs[4], ks_[4], vs_[4], ds_[4];
  for (int i = 0; i < 4; ++i) qs[i] = a.q.s[i], ks_[i] = a.k.s[i], vs_[i] = a.v.s[i], ds_[i] = a.dO.s[i];
  std::vector<C> buf(3 * static_cast<size_t>(D));
  C* __restrict qb = buf.data();
  C* __restrict db = qb + D;
  C* __restrict gb = db + D;
  const T* kp[kMaxWindow];
  const T* vp[kMaxWindow];
  alignas(64) C s[kHeadChunk][kWindowPad];
  alignas(64) C dp[kHeadChunk][kWindowPad];
  Window win;
  const C* lse = reinterpret_cast<const C*>(a.lse);
  const C* dlse = reinterpret_cast<const C*>(a.dlse);  // may be null
  C* ws = reinterpret_cast<C*>(a.ws);
  T* dq = reinterpret_cast<T*>(a.dq);
  const V vscale = K::splat(scale);
  for (int64_t row = r0; row < r1; ++row) {
    const int b = static_cast<int>(row / P.H), y = static_cast<int>(row % P.H);
    for (int x = 0; x < W; ++x) {
      // Outside neighbours (zeros/mask) have a zero key and value: no gradient flows.
      gather_window(P, ks_, vs_, y, x, win);
      const int n = win.n;
      if (n > kMaxWindow) __builtin_unreachable();
      const int npad = (n + L - 1) / L * L;
      const int64_t i0 = (row * W + x) * NH;
      for (int h0 = 0; h0 < NH; h0 += kHeadChunk) {
        const int hn = std::min(kHeadChunk, NH - h0);
        for (int t = 0; t < hn; ++t) {  // dot products: s = <q, k_j>, dp = <do, v_j>
          const int h = h0 + t;
          const T* kh = at<T>(a.k.ptr, ks_, b, 0, 0, h);
          const T* vh = at<T>(a.v.ptr, vs_, b, 0, 0, h);
          for (int j = 0; j < n; ++j) {
            kp[j] = kh + win.koff[j];
            vp[j] = vh + win.voff[j];
          }
          const C* qa = query_side<K>(at<T>(a.q.ptr, qs, b, y, x, h), qb, D);
          const C* da = query_side<K>(at<T>(a.dO.ptr, ds_, b, y, x, h), db, D);
          multi_dot<K>(qa, kp, n, D, s[t]);
          multi_dot<K>(da, vp, n, D, dp[t]);
        }
        for (int t = 0; t < hn; ++t) {  // p = exp(scale s - lse): s[] -> p, dp[] -> scale*ds
          const V vl = K::splat(lse[i0 + h0 + t]);
          for (int j = 0; j < npad; j += L) K::storec(s[t] + j, K::vexp(K::loadc(s[t] + j) * vscale - vl));
          // Di = sum_j p_j dp_j - dlse_i from the compute-precision p and dp (as the reference
          // and the CUDA kernel), not <do_i, o_i>: o is stored rounded to the input dtype,
          // and with half inputs whose values share a large offset that rounding swamps
          // dp_j - Di. n multiply-adds in window order (deterministic).
          C di = 0;
          for (int j = 0; j < n; ++j) di += s[t][j] * dp[t][j];
          const V vDi = K::splat(di - (dlse ? dlse[i0 + h0 + t] : C(0)));
          for (int j = 0; j < npad; j += L)
            K::storec(dp[t] + j, K::loadc(s[t] + j) * (K::loadc(dp[t] + j) - vDi) * vscale);
          C* wp = ws + (i0 + h0 + t) * 2 * kk;  // [p | scale*ds] per window entry
          if (n < kk)
            for (int j = 0; j < 2 * kk; ++j) wp[j] = 0;
          for (int j = 0; j < n; ++j) {
            wp[win.idx[j]] = s[t][j];
            wp[kk + win.idx[j]] = dp[t][j];
          }
        }
        for (int t = 0; t < hn; ++t) {  // dq = sum_j scale ds_j k_j
          const T* kh = at<T>(a.k.ptr, ks_, b, 0, 0, h0 + t);
          for (int j = 0; j < n; ++j) kp[j] = kh + win.koff[j];
          const int64_t i = i0 + h0 + t;
          if constexpr (kSameType) {
            weighted_sum<K>(dp[t], kp, n, D, reinterpret_cast<C*>(dq + i * D));
          } else {
            weighted_sum<K>(dp[t], kp, n, D, gb);
            from_compute<K>(gb, dq + i * D, D);
          }
        }
      }
    }
  }
}

// ---- backward pass 2: per key (dk, dv gathered over the inverse neighbourhood) --------
template <class K>
FASTNCA_NA_INLINE void backward_key_rows(const Args& a, int64_t r0, int64_t r1) {
  using T = typename K::T;
  using C = typename K::C;
  constexpr bool kSameType = K::kSameType;
  const Problem& P = *a.p;
  const int D = K::kD ? K::kD : P.D, ks = P.ks, kk = ks * ks, NH = P.NH, W = P.W;
  int64_t qs[4], ds_[4];
  for (int i = 0; i < 4; ++i) qs[i] = a.q.s[i], ds_[i] = a.dO.s[i];
  std::vector<C> buf(static_cast<size_t>(D));
  C* __restrict gb = buf.data();
  // Pairs (query, window entry) reading the current key, without batch and head.
  int64_t qoff[kMaxPairs], doff[kMaxPairs], woff[kMaxPairs];
  const T* qp[kMaxPairs];
  const T* dop[kMaxPairs];
  C wd[kMaxPairs], wpr[kMaxPairs];
  const C* ws = reinterpret_cast<const C*>(a.ws);
  T* dk = reinterpret_cast<T*>(a.dk);
  T* dv = reinterpret_cast<T*>(a.dv);
  const Inverse& yi = P.yinv;
  const Inverse& xi = P.xinv;
  for (int64_t row = r0; row < r1; ++row) {
    const int b = static_cast<int>(row / P.H), ky = static_cast<int>(row % P.H);
    for (int kx = 0; kx < W; ++kx) {
      int n = 0;
      for (int64_t e = yi.start[ky]; e < yi.start[ky + 1]; ++e) {
        const int qy = yi.query[e], ia = yi.offset[e];
        for (int64_t f = xi.start[kx]; f < xi.start[kx + 1]; ++f) {
          const int qx = xi.query[f], ic = xi.offset[f];
          qoff[n] = qy * qs[1] + qx * qs[2];
          doff[n] = qy * ds_[1] + qx * ds_[2];
          woff[n] = ((static_cast<int64_t>(b) * P.H + qy) * W + qx) * NH * 2 * kk + ia * ks + ic;
          ++n;
        }
      }
      if (n > kMaxPairs) __builtin_unreachable();  // make_problem() checked the tables
      for (int h = 0; h < NH; ++h) {
        const T* qh = at<T>(a.q.ptr, qs, b, 0, 0, h);
        const T* dh = at<T>(a.dO.ptr, ds_, b, 0, 0, h);
        const C* wh = ws + static_cast<int64_t>(h) * 2 * kk;
        for (int t = 0; t < n; ++t) {
          qp[t] = qh + qoff[t];
          dop[t] = dh + doff[t];
          wpr[t] = wh[woff[t]];
          wd[t] = wh[woff[t] + kk];
        }
        const int64_t j = (row * W + kx) * NH + h;
        if constexpr (kSameType) {
          weighted_sum<K>(wd, qp, n, D, reinterpret_cast<C*>(dk + j * D));
          weighted_sum<K>(wpr, dop, n, D, reinterpret_cast<C*>(dv + j * D));
        } else {
          weighted_sum<K>(wd, qp, n, D, gb);
          from_compute<K>(gb, dk + j * D, D);
          weighted_sum<K>(wpr, dop, n, D, gb);
          from_compute<K>(gb, dv + j * D, D);
        }
      }
    }
  }
}

// ---- instruction-set variants ------------------------------------------------------------
// The always_inline bodies above are compiled into each wrapper with its target ISA.
#define FASTNCA_NA_VARIANT(NAME, ATTR)                                                         \
  template <class K>                                                                           \
  ATTR void forward_##NAME(const Args& a, int64_t r0, int64_t r1) { forward_rows<K>(a, r0, r1); } \
  template <class K>                                                                           \
  ATTR void backward_query_##NAME(const Args& a, int64_t r0, int64_t r1) {                     \
    backward_query_rows<K>(a, r0, r1);                                                         \
  }                                                                                            \
  template <class K>                                                                           \
  ATTR void backward_key_##NAME(const Args& a, int64_t r0, int64_t r1) {                       \
    backward_key_rows<K>(a, r0, r1);                                                           \
  }

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTNCA_NA_X86 1
FASTNCA_NA_VARIANT(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))))
FASTNCA_NA_VARIANT(avx2, __attribute__((target("avx2,fma,f16c"))))
#endif
FASTNCA_NA_VARIANT(base, )

// kIsaAvx2Wide is a test hook, never picked automatically: the AVX-512 kernels' 64-byte
// (16 fp32 lanes) code compiled for AVX2, so CI machines without AVX-512 still check the
// 16-lane logic (16-lane fp16/bf16 widening, sums, block splits, padding) that the
// AVX-512 variant runs.
enum Isa : int { kIsaBase = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kIsaAvx2Wide = 3 };

int detected_isa() {
#ifdef FASTNCA_NA_X86
  static const int isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
      return kIsaAvx512;
    return avx2 ? kIsaAvx2 : kIsaBase;
  }();
  return isa;
#else
  return kIsaBase;
#endif
}

struct Kernels {
  RowsFn forward, backward_query, backward_key;
  int lanes;  // vector lanes of the compute type in the selected code (test hook na2d_lanes)
};

template <int kIsa, class K>
Kernels kernels_for() {
#ifdef FASTNCA_NA_X86
  if constexpr (kIsa == kIsaAvx512)
    return {&forward_avx512<K>, &backward_query_avx512<K>, &backward_key_avx512<K>, K::L};
  if constexpr (kIsa == kIsaAvx2)
    return {&forward_avx2<K>, &backward_query_avx2<K>, &backward_key_avx2<K>, K::L};
#endif
  return {&forward_base<K>, &backward_query_base<K>, &backward_key_base<K>, K::L};
}

template <int kIsa, int kVB, int kDType>
Kernels kernels_for_dim(int D) {
  if constexpr (kDType != kFloat64) {  // fp64 is the gradcheck path: run-time D only
    switch (D) {
      case 32: return kernels_for<kIsa, Cfg<kDType, kVB, 32>>();
      case 64: return kernels_for<kIsa, Cfg<kDType, kVB, 64>>();
      case 128: return kernels_for<kIsa, Cfg<kDType, kVB, 128>>();
      default: break;
    }
  }
  return kernels_for<kIsa, Cfg<kDType, kVB, 0>>();
}

template <int kIsa, int kVB>
Kernels kernels_for_dtype(int dtype, int D) {
#ifdef FASTNCA_NA_DEV_FP32_ONLY  // developer builds for quick tuning: fp32 kernels only
  if (dtype != kFloat32) throw std::invalid_argument("na2d: built with FASTNCA_NA_DEV_FP32_ONLY");
  return kernels_for_dim<kIsa, kVB, kFloat32>(D);
#endif
  switch (dtype) {
    case kFloat32: return kernels_for_dim<kIsa, kVB, kFloat32>(D);
    case kFloat16: return kernels_for_dim<kIsa, kVB, kFloat16>(D);
    case kBFloat16: return kernels_for_dim<kIsa, kVB, kBFloat16>(D);
    default: return kernels_for_dim<kIsa, kVB, kFloat64>(D);
  }
}

// The instruction-set variant a call runs: isa < 0 picks the best this CPU supports,
// otherwise at most isa (tests force each path).
int effective_isa(int isa) {
  const int best = detected_isa();
  if (isa == kIsaAvx2Wide) return best >= kIsaAvx2 ? kIsaAvx2Wide : kIsaBase;
  return isa < 0 ? best : std::min(isa, best);
}

Kernels select(int dtype, int D, int isa) {
  switch (effective_isa(isa)) {
    case kIsaAvx512: return kernels_for_dtype<kIsaAvx512, 64>(dtype, D);
    case kIsaAvx2: return kernels_for_dtype<kIsaAvx2, 32>(dtype, D);
    case kIsaAvx2Wide: return kernels_for_dtype<kIsaAvx2, 64>(dtype, D);
    default: return kernels_for_dtype<kIsaBase, 32>(dtype, D);
  }
}

const char* isa_name(int isa) {
  switch (isa) {
    case kIsaAvx512: return "avx512";
    case kIsaAvx2: return "avx2";
    case kIsaAvx2Wide: return "avx2-wide";
    default: return "base";
  }
}

// Runs fn(r0, r1) on contiguous, equal shares of the rows (as schedule(static)).
template <class Fn>
void parallel_rows(int64_t rows, int threads, Fn fn) {
#ifdef FASTNCA_OPENMP
  if (threads > 1 && rows > 1) {
    threads = static_cast<int>(std::min<int64_t>(threads, rows));
#pragma omp parallel num_threads(threads)
    {
      const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
      const int64_t r0 = rows * t / nt, r1 = rows * (t + 1) / nt;
      if (r0 < r1) fn(r0, r1);
    }
    return;
  }
#endif
  fn(0, rows);
}

// TUNING(kSerialWork): below this many window multiply-adds (B*H*W*heads*D*ks^2) a call
// runs on one thread. Forward, fp32, AVX2, 2 cores shared with other jobs: 1x16x16x6x64
// (885k) 191 us on 1 thread, 103 us on 2; 1x8x8x6x64 (221k) 48 us on 1 thread but 758 us
// on 2 (waking a descheduled OpenMP worker). 2^19 keeps every parallel call >= ~100 us.
constexpr int64_t kSerialWork = 1 << 19;

int threads_for(const Problem& P, int threads) {
  const int64_t work = static_cast<int64_t>(P.B) * P.H * P.W * P.NH * P.D * P.ks * P.ks;
  return work < kSerialWork ? 1 : std::max(1, threads);
}

// ---- launch ------------------------------------------------------------------------------
void build_axis(int n, int ks, int mode, std::vector<int>& key, Inverse& inv) {
  const int r = ks / 2;
  key.resize(static_cast<size_t>(n) * ks);
  for (int i = 0; i < n; ++i)
    for (int ia = 0; ia < ks; ++ia) key[static_cast<size_t>(i) * ks + ia] = key_index(i, ia - r, n, r, mode);
  inv.start.assign(1, 0);
  inv.query.clear();
  inv.offset.clear();
  for (int j = 0; j < n; ++j) {
    for (int ia = 0; ia < ks; ++ia) {
      int lo, hi;
      query_range(j, ia - r, n, r, mode, &lo, &hi);
      for (int i = std::max(lo, 0); i <= std::min(hi, n - 1); ++i) {
        if (key_index(i, ia - r, n, r, mode) != j) continue;
        inv.query.push_back(i);
        inv.offset.push_back(ia);
      }
    }
    inv.start.push_back(static_cast<int64_t>(inv.query.size()));
  }
}

Problem make_problem(const std::vector<int64_t>& shape, int ks, int border, double scale, int dtype) {
  if (shape.size() != 5) throw std::invalid_argument("na2d: shape must be [B, H, W, heads, D]");
  for (int64_t s : shape)
    if (s < 1 || s > (int64_t{1} << 30)) throw std::invalid_argument("na2d: every dimension must be in [1, 2^30]");
  if (ks != 3 && ks != 5 && ks != 7) throw std::invalid_argument("na2d: kernel_size must be 3, 5 or 7");
  if (border < 0 || border > 3) throw std::invalid_argument("na2d: border code must be 0..3");
  if (dtype < 0 || dtype > 3) throw std::invalid_argument("na2d: dtype code must be 0..3");
  if (!std::isfinite(scale)) throw std::invalid_argument("na2d: scale must be finite");
  Problem P;
  P.B = static_cast<int>(shape[0]);
  P.H = static_cast<int>(shape[1]);
  P.W = static_cast<int>(shape[2]);
  P.NH = static_cast<int>(shape[3]);
  P.D = static_cast<int>(shape[4]);
  P.ks = ks;
  P.border = border;
  P.scale = scale;
  if (border == kBorderShift && (P.H < ks || P.W < ks))
    throw std::invalid_argument("na2d: border 'shift' needs H and W >= kernel_size");
  build_axis(P.H, ks, border, P.ykey, P.yinv);
  build_axis(P.W, ks, border, P.xkey, P.xinv);
  int64_t my = 0, mx = 0;
  for (int j = 0; j < P.H; ++j) my = std::max(my, P.yinv.start[j + 1] - P.yinv.start[j]);
  for (int j = 0; j < P.W; ++j) mx = std::max(mx, P.xinv.start[j + 1] - P.xinv.start[j]);
  if (my * mx > kMaxPairs) throw std::logic_error("na2d: inverse neighbourhood larger than kMaxPairs");
  return P;
}

View make_view(std::uintptr_t ptr, const std::vector<int64_t>& strides, size_t first, const char* name) {
  if (ptr == 0) throw std::invalid_argument(std::string("na2d: null pointer for ") + name);
  View v{ptr, {strides[first], strides[first + 1], strides[first + 2], strides[first + 3]}};
  return v;
}

// ptrs = (q, k, v, o, lse); strides = 4 element strides (dims 0..3) each of q, k, v.
void na2d_forward(const std::vector<std::uintptr_t>& ptrs, const std::vector<int64_t>& strides,
                  const std::vector<int64_t>& shape, int ks, int border, double scale, int dtype, int threads,
                  int isa) {
  if (ptrs.size() != 5 || strides.size() != 12) throw std::invalid_argument("na2d_forward: expects 5 pointers, 12 strides");
  const Problem P = make_problem(shape, ks, border, scale, dtype);
  Args a{};
  a.p = &P;
  a.q = make_view(ptrs[0], strides, 0, "q");
  a.k = make_view(ptrs[1], strides, 4, "k");
  a.v = make_view(ptrs[2], strides, 8, "v");
  a.o_out = ptrs[3];
  a.lse = ptrs[4];
  if (!a.o_out || !a.lse) throw std::invalid_argument("na2d_forward: null output pointer");
  const Kernels kern = select(dtype, P.D, isa);
  parallel_rows(static_cast<int64_t>(P.B) * P.H, threads_for(P, threads),
                [&](int64_t r0, int64_t r1) { kern.forward(a, r0, r1); });
}

// ptrs = (q, k, v, grad_o, lse, grad_lse or 0, workspace, dq, dk, dv);
// strides = 4 element strides each of q, k, v, grad_o. (o is not read: Di comes from p, dp.)
void na2d_backward(const std::vector<std::uintptr_t>& ptrs, const std::vector<int64_t>& strides,
                   const std::vector<int64_t>& shape, int ks, int border, double scale, int dtype, int threads,
                   int isa) {
  if (ptrs.size() != 10 || strides.size() != 16)
    throw std::invalid_argument("na2d_backward: expects 10 pointers, 16 strides");
  const Problem P = make_problem(shape, ks, border, scale, dtype);
  Args a{};
  a.p = &P;
  a.q = make_view(ptrs[0], strides, 0, "q");
  a.k = make_view(ptrs[1], strides, 4, "k");
  a.v = make_view(ptrs[2], strides, 8, "v");
  a.dO = make_view(ptrs[3], strides, 12, "grad_o");
  a.lse = ptrs[4];
  a.dlse = ptrs[5];
  a.ws = ptrs[6];
  a.dq = ptrs[7];
  a.dk = ptrs[8];
  a.dv = ptrs[9];
  if (!a.lse || !a.ws || !a.dq || !a.dk || !a.dv) throw std::invalid_argument("na2d_backward: null pointer");
  const Kernels kern = select(dtype, P.D, isa);
  const int64_t rows = static_cast<int64_t>(P.B) * P.H;
  const int t = threads_for(P, threads);
  // Pass 2 reads the workspace rows of queries up to 2r rows away: a full barrier between.
  parallel_rows(rows, t, [&](int64_t r0, int64_t r1) { kern.backward_query(a, r0, r1); });
  parallel_rows(rows, t, [&](int64_t r0, int64_t r1) { kern.backward_key(a, r0, r1); });
}

}  // namespace
}  // namespace fastnca

FASTNCA_BINDINGS(m) {
  using namespace fastnca;
  using namespace pybind11::literals;
  namespace py = pybind11;
  m.def("na2d_forward", &na2d_forward, "ptrs"_a, "strides"_a, "shape"_a, "kernel_size"_a, "border"_a, "scale"_a,
        "dtype"_a, "threads"_a, "isa"_a = -1, py::call_guard<py::gil_scoped_release>(),
        "Neighbourhood attention forward: (q, k, v, o, lse) pointers, q/k/v strides.");
  m.def("na2d_backward", &na2d_backward, "ptrs"_a, "strides"_a, "shape"_a, "kernel_size"_a, "border"_a,
        "scale"_a, "dtype"_a, "threads"_a, "isa"_a = -1, py::call_guard<py::gil_scoped_release>(),
        "Neighbourhood attention backward: (q, k, v, grad_o, lse, grad_lse|0, ws, dq, dk, dv).");
  m.def("na2d_isa", [](int isa) { return std::string(isa_name(effective_isa(isa))); }, "isa"_a = -1,
        "Instruction-set variant the neighbourhood-attention kernels run with for this isa request.");
  m.def("na2d_lanes", [](int dtype, int D, int isa) { return select(dtype, D, isa).lanes; }, "dtype"_a, "D"_a,
        "isa"_a = -1, "Test hook: vector lanes of the kernels a call of this dtype code and head dim runs.");
}
