// Per-tile kernel bodies of the CPU nca_step (csrc/cpu/nca_step.cpp).
//
// nca_step.cpp includes this file once per instruction set, each time inside a
// `#pragma GCC target(...)` region and with FASTNCA_NCA_ISA naming the namespace and
// FASTNCA_NCA_RB the rows of a GEMM register block, so the same source is compiled for
// AVX2+FMA and for the baseline ISA and picked at run time (__builtin_cpu_supports).
// No include guard on purpose. Types (Problem, Scratch, Partial, VecT) come from
// nca_step.cpp; threading, chunking and the launch checks live there too.
//
// A tile is a segment of up to p.TW cells of one image row. All per-cell math runs in
// small per-thread buffers ("Scratch"); rows of those buffers are cells, columns are
// channels, padded to multiples of 8 elements so GEMM columns are whole vectors.

namespace fastnca {
namespace nca_cpu {
namespace FASTNCA_NCA_ISA {

constexpr int kRB = FASTNCA_NCA_RB;

// C[R x NV*W] (init) + A[R x K] * B[K x NV*W]. A(r, k) = a[r*lda + k], or a[k*lda + r]
// when kAT (the weight-gradient GEMMs read A transposed). B rows are ldb apart.
// The accumulators stay in registers: R*NV vectors (12 ymm with R=6, NV=2 on AVX2).
template <typename T, int R, int NV, int kInit, bool kAT>
static inline void micro(int K, const T* __restrict a, int64_t lda, const T* __restrict b,
                         int64_t ldb, T* __restrict c, int64_t ldc, const T* __restrict bias) {
  using V = typename VecT<T>::type;
  constexpr int W = sizeof(V) / sizeof(T);
  V acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      if (kInit == kAccum) acc[r][j] = loadu<V>(c + r * ldc + j * W);
      else if (kInit == kBias) acc[r][j] = loadu<V>(bias + j * W);
      else acc[r][j] = V{};
    }
  for (int k = 0; k < K; ++k) {
    V bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) bv[j] = loadu<V>(b + k * ldb + j * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const T s = kAT ? a[k * lda + r] : a[r * lda + k];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] += s * bv[j];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) storeu(c + r * ldc + j * W, acc[r][j]);
}

template <typename T, int NV, int kInit, bool kAT, int R>
static inline void micro_tail(int rows, int K, const T* a, int64_t lda, const T* b, int64_t ldb,
                              T* c, int64_t ldc, const T* bias) {
  if constexpr (R > 0) {
    if (rows == R) micro<T, R, NV, kInit, kAT>(K, a, lda, b, ldb, c, ldc, bias);
    else micro_tail<T, NV, kInit, kAT, R - 1>(rows, K, a, lda, b, ldb, c, ldc, bias);
  }
}

template <typename T, int NV, int kInit, bool kAT>
static inline void panel(int M, int K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                         int64_t ldc, const T* bias) {
  int i = 0;
  for (; i + kRB <= M; i += kRB)
    micro<T, kRB, NV, kInit, kAT>(K, a + (kAT ? i : i * lda), lda, b, ldb, c + i * ldc, ldc, bias);
  if (i < M)
    micro_tail<T, NV, kInit, kAT, kRB - 1>(M - i, K, a + (kAT ? i : i * lda), lda, b, ldb,
                                            c + i * ldc, ldc, bias);
}

// C[M x N] = (0 | bias row | C) + A[M x K] B[K x N]; N is a multiple of the vector width
// (the launcher pads every column count to 8). Column panels of 2 vectors outer, row
// blocks inner: a K x 16 panel of B (<= 18 KB for the Med-NCA conv) stays in L1 while
// every row block of the tile streams past it.
template <typename T, int kInit, bool kAT>
static void gemm(int M, int N, int K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                 int64_t ldc, const T* bias = nullptr) {
  constexpr int W = sizeof(typename VecT<T>::type) / sizeof(T);
  if (M <= 0) return;
  int j = 0;
  for (; j + 2 * W <= N; j += 2 * W)
    panel<T, 2, kInit, kAT>(M, K, a, lda, b + j, ldb, c + j, ldc, bias ? bias + j : nullptr);
  if (j < N) panel<T, 1, kInit, kAT>(M, K, a, lda, b + j, ldb, c + j, ldc, bias ? bias + j : nullptr);
}

// ---- tile I/O ------------------------------------------------------------------------

// Element load/store in the storage dtype. The AVX2 build converts float16 with F16C
// (every AVX2 CPU has it): the software conversion made the fp16 forward 40% slower
// than fp32 (44 vs 32 ms, Med-NCA config); both round to nearest even.
template <int D>
FASTNCA_FORCE_INLINE auto io_load(const typename Scalar<D>::T* p) {
#ifdef FASTNCA_NCA_F16C
  if constexpr (D == kFloat16) return _cvtsh_ss(*p);
  else
#endif
    return Scalar<D>::load(p);
}
template <int D, typename V>
FASTNCA_FORCE_INLINE void io_store(typename Scalar<D>::T* p, V v) {
#ifdef FASTNCA_NCA_F16C
  if constexpr (D == kFloat16) *p = _cvtss_sh(static_cast<float>(v), 0);
  else
#endif
    Scalar<D>::store(p, v);
}

template <typename T, int D>
static inline T load_el(const Tensor4& t, int64_t off) {
  return static_cast<T>(io_load<D>(static_cast<const typename Scalar<D>::T*>(t.data) + off));
}

// dst[j*ldd + k] = src[k*lds + j] for j, k < 8: three shuffle stages (unpack pairs,
// combine pairs of pairs, swap 128-bit halves). The NCHW gather spent 11% of the forward
// in scalar transposing stores before this (Med-NCA config, update_prob 0.5).
#ifdef FASTNCA_SHUF8
template <typename T>
FASTNCA_FORCE_INLINE void transpose8(const T* src, int64_t lds, T* dst, int64_t ldd) {
  using V = typename VecT<float>::type;
  V r[8], t[8], u[8];
  for (int k = 0; k < 8; ++k) r[k] = loadu<V>(src + k * lds);
  for (int a = 0; a < 4; ++a) {
    t[2 * a] = FASTNCA_SHUF8(r[2 * a], r[2 * a + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[2 * a + 1] = FASTNCA_SHUF8(r[2 * a], r[2 * a + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int h = 0; h < 2; ++h)    // h = 0: channels 0-3 (t0..t3), 1: channels 4-7 (t4..t7)
    for (int q = 0; q < 2; ++q) {  // q = 0: the "lo" unpacks (x 0,1,4,5), 1: "hi" (x 2,3,6,7)
      const V& p0 = t[4 * h + q];
      const V& p1 = t[4 * h + 2 + q];
      u[4 * h + 2 * q] = FASTNCA_SHUF8(p0, p1, 0, 1, 8, 9, 4, 5, 12, 13);
      u[4 * h + 2 * q + 1] = FASTNCA_SHUF8(p0, p1, 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int j = 0; j < 4; ++j) {  // u[j]: x = j and j + 4 of channels 0-3; u[4 + j]: 4-7
    storeu(dst + j * ldd, V(FASTNCA_SHUF8(u[j], u[4 + j], 0, 1, 2, 3, 8, 9, 10, 11)));
    storeu(dst + (j + 4) * ldd, V(FASTNCA_SHUF8(u[j], u[4 + j], 4, 5, 6, 7, 12, 13, 14, 15)));
  }
}
#else
template <typename T>
inline void transpose8(const T* src, int64_t lds, T* dst, int64_t ldd) {
  for (int j = 0; j < 8; ++j)
    for (int k = 0; k < 8; ++k) dst[j * ldd + k] = src[k * lds + j];
}
#endif

// nb[ky][xx][c] = state[b, c, pad(y+ky-1), pad(x0+xx-1)] for xx in [0, n+2): the 3-row
// neighbourhood of the tile, channels contiguous, zeros where padding reads a zero.
// The loop order follows the state layout (channel-inner for channels_last).
template <typename T, int D>
static void gather_rows(const Problem<T>& p, int64_t b, int64_t y, int64_t x0, int n,
                        Scratch<T>& s) {
  using S = typename Scalar<D>::T;
  const int C = p.C, ncol = n + 2;
  const Tensor4& st = p.state;
  for (int xx = 0; xx < ncol; ++xx)
    s.col[xx] = pad_index(static_cast<int>(x0) + xx - 1, static_cast<int>(p.W), p.padding);
  for (int ky = 0; ky < 3; ++ky) {
    T* dst = s.nb + static_cast<int64_t>(ky) * (p.TW + 2) * C;
    const int yy = pad_index(static_cast<int>(y) + ky - 1, static_cast<int>(p.H), p.padding);
    if (yy < 0) {
      for (int e = 0; e < ncol * C; ++e) dst[e] = T(0);
      continue;
    }
    const int64_t row = b * st.sB + yy * st.sH;
    if (st.sW == 1 && st.sC != 1) {  // NCHW: read along x, transpose into the buffer
      int c = 0;
      if constexpr (D == kFloat32) {  // 8x8 register transposes of the interior columns
        for (; c + 8 <= C; c += 8) {
          const float* src = static_cast<const float*>(st.data) + row + c * st.sC + x0;
          int xb = 0;
          for (; xb + 8 <= n; xb += 8) transpose8(src + xb, st.sC, dst + (1 + xb) * C + c, C);
          for (; xb < n; ++xb)
            for (int k = 0; k < 8; ++k) dst[(1 + xb) * C + c + k] = src[k * st.sC + xb];
        }
      }
      for (; c < C; ++c) {
        const S* src = static_cast<const S*>(st.data) + row + c * st.sC + x0;  // no padding
        for (int xx = 1; xx <= n; ++xx) dst[xx * C + c] = static_cast<T>(io_load<D>(src + xx - 1));
      }
      for (int cc = 0; cc < C; ++cc)  // the two padded columns
        for (int xx : {0, n + 1}) {
          const int sx = s.col[xx];
          dst[xx * C + cc] = sx < 0 ? T(0) : load_el<T, D>(st, row + cc * st.sC + sx);
        }
    } else {  // channels_last (sC == 1) or any other layout: channel-inner
      for (int xx = 0; xx < ncol; ++xx) {
        const int sx = s.col[xx];
        T* d = dst + xx * C;
        if (sx < 0) {
          for (int c = 0; c < C; ++c) d[c] = T(0);
        } else if (st.sC == 1) {
          const S* src = static_cast<const S*>(st.data) + row + sx * st.sW;
          for (int c = 0; c < C; ++c) d[c] = static_cast<T>(io_load<D>(src + c));
        } else {
          const int64_t base = row + sx * st.sW;
          for (int c = 0; c < C; ++c) d[c] = load_el<T, D>(st, base + c * st.sC);
        }
      }
    }
  }
}

// io[i][c] (T) -> t[b, c, y, x0+i] in the storage dtype, layout-friendly loop order.
template <typename T, int D>
static void store_tile(const Tensor4& t, int C, int64_t b, int64_t y, int64_t x0, int n,
                       const T* io) {
  using S = typename Scalar<D>::T;
  S* base = static_cast<S*>(t.data) + b * t.sB + y * t.sH + x0 * t.sW;
  if (t.sC == 1) {
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < C; ++c) io_store<D>(base + i * t.sW + c, io[i * C + c]);
  } else if (t.sW != 1) {
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < C; ++c) io_store<D>(base + i * t.sW + c * t.sC, io[i * C + c]);
  } else {
    int c = 0;
    if constexpr (D == kFloat32) {
      for (; c + 8 <= C; c += 8) {
        int i = 0;
        for (; i + 8 <= n; i += 8) transpose8(io + i * C + c, C, base + c * t.sC + i, t.sC);
        for (; i < n; ++i)
          for (int k = 0; k < 8; ++k) base[(c + k) * t.sC + i] = io[i * C + c + k];
      }
    }
    for (; c < C; ++c)
      for (int i = 0; i < n; ++i) io_store<D>(base + c * t.sC + i, io[i * C + c]);
  }
}

// io[i][c] = t[b, c, y, x0+i] (T) for all n cells of the tile.
template <typename T, int D>
static void load_tile(const Tensor4& t, int C, int64_t b, int64_t y, int64_t x0, int n, T* io) {
  using S = typename Scalar<D>::T;
  const S* base = static_cast<const S*>(t.data) + b * t.sB + y * t.sH + x0 * t.sW;
  if (t.sC == 1) {
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < C; ++c) io[i * C + c] = static_cast<T>(io_load<D>(base + i * t.sW + c));
  } else if (t.sW != 1) {
    for (int i = 0; i < n; ++i)
      for (int c = 0; c < C; ++c)
        io[i * C + c] = static_cast<T>(io_load<D>(base + i * t.sW + c * t.sC));
  } else {
    int c = 0;
    if constexpr (D == kFloat32) {
      for (; c + 8 <= C; c += 8) {
        int i = 0;
        for (; i + 8 <= n; i += 8) transpose8(base + c * t.sC + i, t.sC, io + i * C + c, C);
        for (; i < n; ++i)
          for (int k = 0; k < 8; ++k) io[i * C + c + k] = base[(c + k) * t.sC + i];
      }
    }
    for (; c < C; ++c)
      for (int i = 0; i < n; ++i) io[i * C + c] = static_cast<T>(io_load<D>(base + c * t.sC + i));
  }
}

// io[i][c] = t[b, c, y, x0+i] (T), c in [c0, c0+nc), rows ld apart, for the listed cells.
template <typename T, int D>
static void load_cells(const Tensor4& t, int c0, int nc, int64_t b, int64_t y, int64_t x0,
                       const int* cells, int m, T* io, int ld) {
  const int64_t base = b * t.sB + y * t.sH + x0 * t.sW;
  if (t.sC == 1 || t.sW != 1) {
    for (int j = 0; j < m; ++j)
      for (int c = 0; c < nc; ++c)
        io[j * ld + c] = load_el<T, D>(t, base + cells[j] * t.sW + (c0 + c) * t.sC);
  } else {
    for (int c = 0; c < nc; ++c)
      for (int j = 0; j < m; ++j)
        io[j * ld + c] = load_el<T, D>(t, base + (c0 + c) * t.sC + cells[j]);
  }
}

// ---- the shared front half: perception and hidden layer of the firing cells -------------

// Fills s.A (im2col, [m][9C]), s.P ([m][LDP] = [x | conv | 0]) and s.Hb ([m][Hdp] =
// relu(P w1^T + b1)) for the m firing cells s.idx[0..m) of the tile (nb already gathered).
template <typename T>
static void perceive_hidden(const Problem<T>& p, int m, Scratch<T>& s) {
  const int C = p.C, K = p.K, C9 = 9 * C, LDP = p.LDP, nbw = p.TW + 2;
  for (int j = 0; j < m; ++j) {
    const int i = s.idx[j];
    T* a = s.A + static_cast<int64_t>(j) * C9;
    for (int ky = 0; ky < 3; ++ky)
      for (int kx = 0; kx < 3; ++kx) {
        const T* src = s.nb + (static_cast<int64_t>(ky) * nbw + i + kx) * C;
        T* d = a + (ky * 3 + kx) * C;
        for (int c = 0; c < C; ++c) d[c] = src[c];
      }
    const T* x = s.nb + (static_cast<int64_t>(nbw) + i + 1) * C;
    T* prow = s.P + static_cast<int64_t>(j) * LDP;
    for (int c = 0; c < C; ++c) prow[c] = x[c];
  }
  if (p.groups == 1) {
    gemm<T, kBias, false>(m, p.Kp, C9, s.A, C9, p.wc, p.Kp, s.P + C, LDP, p.pb);
  } else {  // depthwise: output channel o = c*F + f reads input channel c
    const int F = p.F;
    for (int j = 0; j < m; ++j) {
      const T* a = s.A + static_cast<int64_t>(j) * C9;
      T* q = s.P + static_cast<int64_t>(j) * LDP + C;
      for (int o = 0; o < K; ++o) q[o] = p.pb[o];
      for (int t = 0; t < 9; ++t) {
        const T* at = a + t * C;
        const T* wt = p.wc + t * p.Kp;
        for (int c = 0; c < C; ++c) {
          const T av = at[c];
          for (int f = 0; f < F; ++f) q[c * F + f] += av * wt[c * F + f];
        }
      }
    }
  }
  gemm<T, kBias, false>(m, p.Hdp, C + K, s.P, LDP, p.w1t, p.Hdp, s.Hb, p.Hdp, p.b1);
  const int64_t nh = static_cast<int64_t>(m) * p.Hdp;
  for (int64_t e = 0; e < nh; ++e) s.Hb[e] = s.Hb[e] < T(0) ? T(0) : s.Hb[e];  // ReLU keeping NaN, as torch
}

static inline int fire_list(uint64_t seed, uint64_t cell0, uint32_t step, uint32_t thr, int n,
                            int* idx) {
  int m = 0;
  for (int i = 0; i < n; ++i)
    if (fire(seed, cell0 + static_cast<uint64_t>(i), step, thr)) idx[m++] = i;
  return m;
}

// ---- forward -----------------------------------------------------------------------------

template <typename T, int D>
static void forward_tiles(const Problem<T>& p, int64_t t0, int64_t t1, Scratch<T>& s) {
  const int C = p.C, nbw = p.TW + 2;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / (p.H * p.tiles_per_row), rem = t % (p.H * p.tiles_per_row);
    const int64_t y = rem / p.tiles_per_row, x0 = (rem % p.tiles_per_row) * p.TW;
    const int n = static_cast<int>(p.W - x0 < p.TW ? p.W - x0 : p.TW);
    const int m = fire_list(p.seed, static_cast<uint64_t>((b * p.H + y) * p.W + x0), p.step,
                            p.threshold, n, s.idx);
    gather_rows<T, D>(p, b, y, x0, n, s);
    const T* xrow = s.nb + static_cast<int64_t>(nbw + 1) * C;  // centre row, from x0
    for (int e = 0; e < n * C; ++e) s.io[e] = xrow[e];
    if (m > 0 && p.Co > 0) {
      perceive_hidden<T>(p, m, s);
      gemm<T, kBias, false>(m, p.Cop, p.Hd, s.Hb, p.Hdp, p.w2t, p.Cop, s.Db, p.Cop, p.b2);
      for (int j = 0; j < m; ++j) {
        T* o = s.io + static_cast<int64_t>(s.idx[j]) * C + p.frozen;
        const T* d = s.Db + static_cast<int64_t>(j) * p.Cop;
        for (int c = 0; c < p.Co; ++c) o[c] += d[c];
      }
    }
    store_tile<T, D>(p.out, C, b, y, x0, n, s.io);
  }
}

// ---- backward pass 1: per firing cell, dP = d(loss)/d(perception), weight-grad partials --

// Tiles [t0, t1) of image b (tile indices within the image), in order, accumulating into
// `part` (one chunk's partial sums: the order of additions is fixed by the tile order).
// Writes the dP row of every cell of the tiles to the image workspace p.ws (zeros for the
// cells that do not fire), so pass 2 reads it without looking at the mask.
template <typename T, int D>
static void backward1_tiles(const Problem<T>& p, int64_t b, int64_t t0, int64_t t1,
                            Scratch<T>& s, const PartialLayout& pl, T* part) {
  const int C = p.C, K = p.K, C9 = 9 * C, LDP = p.LDP, Hdp = p.Hdp, Cop = p.Cop;
  T* pwc = part + pl.wc;
  T* ppb = part + pl.pb;
  T* pw1 = part + pl.w1;
  T* pb1 = part + pl.b1;
  T* pw2 = part + pl.w2;
  T* pb2 = part + pl.b2;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t y = t / p.tiles_per_row, x0 = (t % p.tiles_per_row) * p.TW;
    const int n = static_cast<int>(p.W - x0 < p.TW ? p.W - x0 : p.TW);
    const int m = fire_list(p.seed, static_cast<uint64_t>((b * p.H + y) * p.W + x0), p.step,
                            p.threshold, n, s.idx);
    T* wsrow = p.ws + b * p.ws_b + (y * p.W + x0) * p.LDW;
    for (int64_t e = 0; e < static_cast<int64_t>(n) * p.LDW; ++e) wsrow[e] = T(0);
    if (m == 0) continue;
    gather_rows<T, D>(p, b, y, x0, n, s);
    perceive_hidden<T>(p, m, s);
    // gd = grad_out of the updated channels (m = 1 for every listed cell)
    load_cells<T, D>(p.grad, p.frozen, p.Co, b, y, x0, s.idx, m, s.G, Cop);
    // dh = gd w2; dz = dh * (z > 0) (z > 0 <=> h > 0); dP = dz w1
    gemm<T, kZero, false>(m, Hdp, p.Co, s.G, Cop, p.w2, Hdp, s.dH, Hdp);
    const int64_t nh = static_cast<int64_t>(m) * Hdp;
    for (int64_t e = 0; e < nh; ++e) s.dH[e] = s.Hb[e] > T(0) ? s.dH[e] : T(0);
    gemm<T, kZero, false>(m, LDP, p.Hd, s.dH, Hdp, p.w1, LDP, s.dP, LDP);
    // weight-gradient partials: d_w2 += gd^T h, d_w1 += dz^T P, d_pw += patch^T dQ
    gemm<T, kAccum, true>(p.Co, Hdp, m, s.G, Cop, s.Hb, Hdp, pw2, Hdp);
    gemm<T, kAccum, true>(p.Hd, LDP, m, s.dH, Hdp, s.P, LDP, pw1, LDP);
    for (int j = 0; j < m; ++j) {
      const T* g = s.G + static_cast<int64_t>(j) * Cop;
      for (int c = 0; c < p.Co; ++c) pb2[c] += g[c];
      const T* dz = s.dH + static_cast<int64_t>(j) * Hdp;
      for (int h = 0; h < p.Hd; ++h) pb1[h] += dz[h];
      const T* dq = s.dP + static_cast<int64_t>(j) * LDP + C;
      for (int o = 0; o < K; ++o) ppb[o] += dq[o];
    }
    if (p.groups == 1) {
      gemm<T, kAccum, true>(C9, p.Kp, m, s.A, C9, s.dP + C, LDP, pwc, p.Kp);
    } else {
      const int F = p.F;
      for (int j = 0; j < m; ++j) {
        const T* a = s.A + static_cast<int64_t>(j) * C9;
        const T* dq = s.dP + static_cast<int64_t>(j) * LDP + C;
        for (int tap = 0; tap < 9; ++tap) {
          T* w = pwc + tap * p.Kp;
          for (int c = 0; c < C; ++c) {
            const T av = a[tap * C + c];
            for (int f = 0; f < F; ++f) w[c * F + f] += av * dq[c * F + f];
          }
        }
      }
    }
    // dP rows (x part and conv part) to the workspace for pass 2
    for (int j = 0; j < m; ++j) {
      T* w = wsrow + static_cast<int64_t>(s.idx[j]) * p.LDW;
      const T* d = s.dP + static_cast<int64_t>(j) * LDP;
      for (int k = 0; k < C + K; ++k) w[k] = d[k];
    }
  }
}

// ---- backward pass 2: d_state by gathering over the inverse neighbourhood ------------------

// d_state[s] = g[s] + dPx[s] + sum_tap sum_{p : tap of p reads s} dQ[p] . Wc[tap].
// "Simple" cells (p.simple_y[y] && p.simple_x[x]: every tap has exactly the one reader
// p = s - (ky-1, kx-1), the case away from the borders) run straight GEMMs whose A rows are
// the workspace rows of the readers: a run of cells along x reads consecutive workspace
// rows for each tap, so no gather at all. The other cells (borders, where reflect/circular
// /replicate padding makes several p read one s or zero padding none; tiny grids) sum the
// dQ of their readers (per-axis inverse lists of pad_index) into S[cell][tap][o] first.
// Depthwise perception takes the S path everywhere (its GEMM is a per-channel dot).
template <typename T, int D>
static void backward2_tiles(const Problem<T>& p, int64_t b, int64_t t0, int64_t t1,
                            Scratch<T>& s) {
  const int C = p.C, K = p.K, K9 = 9 * K, LDW = p.LDW, Cp = p.Cp;
  const T* ws = p.ws + b * p.ws_b;  // this image's dP workspace
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t y = t / p.tiles_per_row, x0 = (t % p.tiles_per_row) * p.TW;
    const int n = static_cast<int>(p.W - x0 < p.TW ? p.W - x0 : p.TW);
    const bool row_simple = p.groups == 1 && p.simple_y[y];
    int ne = 0;  // cells of the gather path, in s.idx
    for (int i = 0; i < n; ++i)
      if (!(row_simple && p.simple_x[x0 + i])) s.idx[ne++] = i;
    // gather path: S rows of the listed cells, then dS2 = S Wc
    for (int j = 0; j < ne; ++j) {
      const int64_t x = x0 + s.idx[j];
      T* srow = s.S + static_cast<int64_t>(j) * K9;
      for (int ky = 0; ky < 3; ++ky) {
        const int* ylo = p.inv_y + p.inv_y_off[y * 3 + ky];
        const int* yhi = p.inv_y + p.inv_y_off[y * 3 + ky + 1];
        for (int kx = 0; kx < 3; ++kx) {
          const int* xlo = p.inv_x + p.inv_x_off[x * 3 + kx];
          const int* xhi = p.inv_x + p.inv_x_off[x * 3 + kx + 1];
          T* d = srow + (ky * 3 + kx) * K;
          for (int o = 0; o < K; ++o) d[o] = T(0);
          for (const int* py = ylo; py < yhi; ++py)
            for (const int* px = xlo; px < xhi; ++px) {
              const T* src = ws + (static_cast<int64_t>(*py) * p.W + *px) * LDW + C;
              for (int o = 0; o < K; ++o) d[o] += src[o];
            }
        }
      }
    }
    if (p.groups == 1) {
      gemm<T, kZero, false>(ne, Cp, K9, s.S, K9, p.wcb, Cp, s.dS2, Cp);
    } else {
      const int F = p.F;
      for (int j = 0; j < ne; ++j) {
        const T* srow = s.S + static_cast<int64_t>(j) * K9;
        T* d = s.dS2 + static_cast<int64_t>(j) * Cp;
        for (int c = 0; c < C; ++c) d[c] = T(0);
        for (int tap = 0; tap < 9; ++tap) {
          const T* st = srow + tap * K;
          const T* wt = p.wc + tap * p.Kp;
          for (int c = 0; c < C; ++c) {
            T acc = d[c];
            for (int f = 0; f < F; ++f) acc += st[c * F + f] * wt[c * F + f];
            d[c] = acc;
          }
        }
      }
    }
    for (int j = 0; j < ne; ++j) {
      const T* src = s.dS2 + static_cast<int64_t>(j) * Cp;
      T* dst = s.dS + static_cast<int64_t>(s.idx[j]) * Cp;
      for (int c = 0; c < C; ++c) dst[c] = src[c];
    }
    // direct path: runs of simple cells, one GEMM per tap accumulating into dS
    if (row_simple) {
      for (int i = 0; i < n;) {
        if (!p.simple_x[x0 + i]) { ++i; continue; }
        int e = i;
        while (e < n && p.simple_x[x0 + e]) ++e;
        const int64_t q0 = y * p.W + x0 + i;
        for (int tap = 0; tap < 9; ++tap) {
          const int64_t reader = q0 - (tap / 3 - 1) * p.W - (tap % 3 - 1);  // >= 0: simple
          const T* a = ws + reader * LDW + C;
          const T* w = p.wcb + static_cast<int64_t>(tap) * K * Cp;
          T* c = s.dS + static_cast<int64_t>(i) * Cp;
          if (tap == 0) gemm<T, kZero, false>(e - i, Cp, K, a, LDW, w, Cp, c, Cp);
          else gemm<T, kAccum, false>(e - i, Cp, K, a, LDW, w, Cp, c, Cp);
        }
        i = e;
      }
    }
    // io = grad_out + dPx (zero rows for non-firing cells) + conv-transpose part
    load_tile<T, D>(p.grad, C, b, y, x0, n, s.io);
    const T* dx = ws + (y * p.W + x0) * LDW;
    for (int i = 0; i < n; ++i) {
      T* o = s.io + static_cast<int64_t>(i) * C;
      const T* d = s.dS + static_cast<int64_t>(i) * Cp;
      const T* x = dx + static_cast<int64_t>(i) * LDW;
      for (int c = 0; c < C; ++c) o[c] += x[c] + d[c];
    }
    store_tile<T, D>(p.dstate, C, b, y, x0, n, s.io);
  }
}

template <typename T, int D>
static Table<T> table() {
  return Table<T>{&forward_tiles<T, D>, &backward1_tiles<T, D>, &backward2_tiles<T, D>};
}

}  // namespace FASTNCA_NCA_ISA
}  // namespace nca_cpu
}  // namespace fastnca
