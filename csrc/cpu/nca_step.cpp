// nca_step on the CPU (DESIGN.md, Op 2): fused forward and recompute backward.
//
// Kernel assumptions (python/fastnca/kernels/cpu/nca_step.py checks every one):
//  - state/out/grad_out/d_state: [B, C, H, W] in one storage dtype (code 0 fp32, 1 fp16,
//    2 bf16, 3 fp64), any non-negative element strides (NCHW and channels_last read in
//    place); out and d_state do not overlap anything else. 1 <= H, W < 2^31.
//  - Weights in the compute dtype (fp64 for fp64 state, else fp32), contiguous, prepared
//    by the launcher in these layouts (columns zero-padded to a multiple of 8 elements:
//    Kp = pad(F*C), Hdp = pad(Hd), Cop = pad(C - frozen), Cp = pad(C), LDP = pad(C + Kp)):
//      wc  groups=1: [9*C][Kp], wc[(ky*3+kx)*C + c][o] = pw[o, c, ky, kx]
//          groups=C: [9][Kp],   wc[ky*3+kx][o]         = pw[o, 0, ky, kx]
//      pb [Kp]; w1t [(F+1)*C][Hdp] = w1^T; b1 [Hdp]; w2t [Hd][Cop] = w2^T; b2 [Cop]
//    backward also:
//      w2 [Co][Hdp]; w1 [Hd][LDP]; wcb (groups=1) [9*F*C][Cp], wcb[tap*K + o][c] = pw[o, c, tap]
//  - Weight-gradient outputs in the compute dtype, same padded layouts:
//      d_wc like wc, d_pb [Kp], d_w1 like w1, d_b1 [Hdp], d_w2 like w2, d_b2 [Cop]
//    (padding columns hold garbage-free but meaningless values; the launcher slices them).
//
// Design:
//  - Forward, per tile (a segment of <= kTileW cells of one row): Philox fire mask first,
//    then only the firing cells go through perception + MLP (non-firing cells are copied:
//    out = state exactly, as in the reference where m = 0). For each tile: gather the
//    3 x (n+2) neighbourhood with pad_index into a channel-contiguous buffer, im2col the
//    firing cells, and three small GEMMs (conv 9C -> F*C, fc1, fc2) with register-blocked
//    micro-kernels over pre-transposed weights. Nothing but the output touches memory.
//  - Backward, two passes per image (per batch when the batch's workspaces are small):
//    pass 1 (firing cells only): recompute P and h, dh = gd w2, dz, dP = dz w1, weight-grad
//      partial sums of a fixed chunk of tiles; writes dP (x part and conv part dQ) to a
//      per-image workspace [H*W][(F+1)C] in the compute dtype (zero rows: no fire).
//    pass 2 (every cell): d_state = g + dPx + conv-transpose of dQ as a GATHER over the
//      inverse neighbourhood (pad_index inverted per axis): away from the borders a GEMM
//      per tap straight from the workspace rows, at the borders a gather then a GEMM.
//    Why two passes: the conv transpose at cell s needs dQ of all 9 neighbours, which
//    belong to other tiles (and with reflect/circular padding to far-away border cells).
//    A scatter from each firing cell would need atomics or a colouring; recomputing the
//    neighbours' MLP per tile would cost ~3x the FLOPs at tile height 1. The workspace is
//    transient (25 MB per 256x256 image for the Med-NCA config) and read once.
//  - Determinism: the cells of a pass are split into a fixed number of chunks of tiles
//    (kMaxChunks, fewer for small passes or huge weights: a function of the shapes only,
//    never of the thread count). Each chunk's partial sums are accumulated by one thread in tile
//    order, then reduced in chunk order, element by element, into float64 accumulators.
//    Every other output element is written by exactly one thread. No atomics.
#include "fastnca/bindings.h"
#include "fastnca/borders.h"
#include "fastnca/half.h"
#include "fastnca/philox.h"

#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef FASTNCA_OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vector arguments of inline helpers
#endif

namespace fastnca {
namespace nca_cpu {

// Tuning constants. Measured on an AMD EPYC (Zen 3, AVX2+FMA, no AVX-512), one thread,
// CPU time, Med-NCA config C=32, Hd=128, F=2, groups=1, reflect, B=1, 256x256,
// update_prob 0.5; torch.mm 2048^2 fp32 on the same core: 88 GFLOP/s.
//   forward: 31.9 ms (57.6 ms at update_prob 1 = 79 GFLOP/s, 90% of the mm roof);
//   backward alone: 111 ms; plain PyTorch: 156 ms inference, 340 ms training step.
// kTileW: forward / backward ms = 32: 37.5/136, 64: 36.6/122, 128: 37.1/139,
// 256: 38.3/121 (machine shared, +-5%): flat; 64 keeps the tile buffers small.
constexpr int kTileW = 64;       // cells per tile
// Weight-grad chunks per image: 64 keeps 2..64 threads busy in pass 1; their zeroing and
// reduction cost ~2% of the backward at 256x256.
constexpr int kMaxChunks = 64;
// ... and at least this many cells each: on small images the zeroing and reduction of
// 64 partial copies of the weights cost more than the chunks' work.
constexpr int64_t kMinChunkCells = 128;
// Batches whose dP workspaces together fit in this many bytes (about what stays in cache
// between the passes) run as one pass.
constexpr int64_t kBatchWorkspace = int64_t(2) << 20;
constexpr int64_t kPartialBudget = int64_t(64) << 20;  // bytes of chunk partials at most
// A 2-thread barrier on a loaded machine costs a time slice: the fp64 gradcheck tests
// ran 30x slower (30 s vs 1 s) before tiny problems stayed on the calling thread.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 21;  // multiply-adds, ~50 us of one core
constexpr int kPadTo = 8;        // column padding (one fp32 AVX vector, two fp64)

#if defined(__GNUC__) || defined(__clang__)
#define FASTNCA_FORCE_INLINE inline __attribute__((always_inline))
template <typename T> struct VecT;
template <> struct VecT<float> { typedef float type __attribute__((vector_size(32))); };
template <> struct VecT<double> { typedef double type __attribute__((vector_size(32))); };
typedef int Int8x32 __attribute__((vector_size(32)));
#if defined(__clang__)
#define FASTNCA_SHUF8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define FASTNCA_SHUF8(a, b, ...) __builtin_shuffle(a, b, Int8x32{__VA_ARGS__})
#endif
#else  // portable fallback: a fixed-size array the compiler may vectorise
#define FASTNCA_FORCE_INLINE inline
template <typename T, int N>
struct Arr {
  T v[N];
  Arr() : v{} {}
  Arr& operator+=(const Arr& o) { for (int i = 0; i < N; ++i) v[i] += o.v[i]; return *this; }
  friend Arr operator*(T s, const Arr& a) { Arr r; for (int i = 0; i < N; ++i) r.v[i] = s * a.v[i]; return r; }
};
template <typename T> struct VecT { typedef Arr<T, 32 / sizeof(T)> type; };
#endif

template <typename V, typename T>
FASTNCA_FORCE_INLINE V loadu(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
FASTNCA_FORCE_INLINE void storeu(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

enum Init { kZero = 0, kBias = 1, kAccum = 2 };

struct Tensor4 {
  void* data;
  int64_t sB, sC, sH, sW;
};

template <typename T>
struct Problem {
  int64_t B, C, H, W;
  int F, K, Kp, groups, Hd, Hdp, Co, Cop, frozen, LDP, Cp, LDW, padding, TW;
  int64_t tiles_per_row;
  uint64_t seed;
  uint32_t step, threshold;
  Tensor4 state, out, grad, dstate;
  const T *wc, *pb, *w1t, *b1, *w2t, *b2;  // forward layouts
  const T *w2, *w1, *wcb;                  // backward layouts
  T* ws;                                   // backward: dP workspace [H*W][LDW] per image,
  int64_t ws_b;                            //   image b's at ws + b * ws_b (0: one, reused)
  const uint8_t *simple_y, *simple_x;      // backward: one reader per tap (no border)
  const int64_t *inv_y_off, *inv_x_off;  // inverse neighbourhood per axis: CSR offsets,
  const int *inv_y, *inv_x;              // and source coordinates
};

template <typename T>
struct Scratch {
  T *nb, *A, *P, *Hb, *Db, *G, *dH, *dP, *S, *dS, *dS2, *io;
  int *idx, *col;
};

struct PartialLayout {
  int64_t wc, pb, w1, b1, w2, b2, size;
};

template <typename T>
struct Table {
  void (*forward)(const Problem<T>&, int64_t, int64_t, Scratch<T>&);
  void (*backward1)(const Problem<T>&, int64_t, int64_t, int64_t, Scratch<T>&,
                    const PartialLayout&, T*);
  void (*backward2)(const Problem<T>&, int64_t, int64_t, int64_t, Scratch<T>&);
};

}  // namespace nca_cpu
}  // namespace fastnca

// ---- the kernel bodies, once per instruction set ------------------------------------------
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define FASTNCA_NCA_X86 1
#include <immintrin.h>
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define FASTNCA_NCA_ISA avx2
#define FASTNCA_NCA_F16C 1
#define FASTNCA_NCA_RB 6  // 6 rows x 16 floats: 12 ymm accumulators + 2 B + 1 broadcast
#include "fastnca/nca_step_cpu.h"
#undef FASTNCA_NCA_ISA
#undef FASTNCA_NCA_RB
#undef FASTNCA_NCA_F16C
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

#define FASTNCA_NCA_ISA baseline
#define FASTNCA_NCA_RB 3  // SSE2: a 32-byte vector is two xmm, 12 xmm accumulators
#include "fastnca/nca_step_cpu.h"
#undef FASTNCA_NCA_ISA
#undef FASTNCA_NCA_RB

namespace fastnca {
namespace nca_cpu {
namespace {

bool cpu_has_avx2() {
#ifdef FASTNCA_NCA_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

// Test hook: force the baseline kernels on an AVX2 machine (fastnca._C.nca_step_cpu_set_isa).
std::atomic<bool> g_force_baseline{false};

bool has_avx2() { return cpu_has_avx2() && !g_force_baseline.load(); }

std::string isa_name() { return has_avx2() ? "avx2" : "baseline"; }

std::string set_isa(const std::string& name) {
  const std::string before = isa_name();
  if (name == "baseline") g_force_baseline = true;
  else if (name == "auto") g_force_baseline = false;
  else if (name == "avx2" && cpu_has_avx2()) g_force_baseline = false;
  else throw std::invalid_argument("nca_step_cpu_set_isa: '" + name + "' is not available here");
  return before;
}

template <typename T, int D>
Table<T> pick_table() {
#ifdef FASTNCA_NCA_X86
  if (has_avx2()) return avx2::table<T, D>();
#endif
  return baseline::table<T, D>();
}

template <typename T>
Table<T> pick(int dtype) {
  if constexpr (sizeof(T) == 8) {
    if (dtype != kFloat64) throw std::invalid_argument("nca_step_cpu: fp64 compute needs fp64 state");
    return pick_table<T, 3>();
  } else {
    switch (dtype) {
      case kFloat32: return pick_table<T, 0>();
      case kFloat16: return pick_table<T, 1>();
      case kBFloat16: return pick_table<T, 2>();
      default: throw std::invalid_argument("nca_step_cpu: fp32 compute needs fp32/fp16/bf16 state");
    }
  }
}

int64_t pad8(int64_t n) { return (n + kPadTo - 1) / kPadTo * kPadTo; }

// Everything both directions share, derived from the sizes. The launcher pads the weights
// by the same rule (kernels/cpu/nca_step.py, _pad with _PAD = kPadTo); every test against
// the reference would fail if the two disagreed.
template <typename T>
void setup(Problem<T>& p, int64_t B, int64_t C, int64_t H, int64_t W, int F, int groups, int Hd,
           int frozen, int padding, uint64_t seed, uint32_t step, uint32_t threshold, int tile_w) {
  if (tile_w < 0 || tile_w > 4096) throw std::invalid_argument("nca_step_cpu: tile width must be in [0, 4096]");
  if (B < 1 || C < 1 || H < 1 || W < 1 || F < 1 || Hd < 1 || frozen < 0 || frozen > C)
    throw std::invalid_argument("nca_step_cpu: bad sizes");
  if (H >= (int64_t(1) << 30) || W >= (int64_t(1) << 30) || C > 65536 || Hd > 65536 || F > 64)
    throw std::invalid_argument("nca_step_cpu: sizes out of the supported range");
  if (groups != 1 && groups != C) throw std::invalid_argument("nca_step_cpu: groups must be 1 or C");
  if (padding < 0 || padding > 3) throw std::invalid_argument("nca_step_cpu: bad padding code");
  if (padding == kPadReflect && (H < 2 || W < 2))
    throw std::invalid_argument("nca_step_cpu: reflect padding needs H, W >= 2");
  p.B = B; p.C = C; p.H = H; p.W = W;
  p.F = F; p.K = static_cast<int>(F * C); p.Kp = static_cast<int>(pad8(p.K));
  p.groups = groups; p.Hd = Hd; p.Hdp = static_cast<int>(pad8(Hd));
  p.Co = static_cast<int>(C - frozen); p.Cop = static_cast<int>(pad8(p.Co)); p.frozen = frozen;
  p.LDP = static_cast<int>(pad8(C + p.Kp)); p.Cp = static_cast<int>(pad8(C));
  p.LDW = static_cast<int>(C + p.K); p.padding = padding;
  p.TW = static_cast<int>(std::min<int64_t>(tile_w > 0 ? tile_w : kTileW, W));
  p.tiles_per_row = (W + p.TW - 1) / p.TW;
  p.seed = seed; p.step = step; p.threshold = threshold;
}

// Threads for a call: at most one per kMinWorkPerThread multiply-adds (per image for the
// backward, whose passes synchronise per image), so tiny problems (gradcheck, tests) run
// on the calling thread: a barrier with a descheduled thread costs a time slice.
template <typename T>
int threads_for(const Problem<T>& p, int want, int64_t tiles, int64_t images) {
  const int64_t per_cell = 9 * p.C / (p.groups == 1 ? 1 : p.C) * p.K + (p.C + p.K) * p.Hd + p.Hd * p.Co;
  const int64_t work = images * p.H * p.W * per_cell;
  const int64_t by_work = std::max<int64_t>(1, work / kMinWorkPerThread);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({int64_t(want), tiles, by_work})));
}

// One contiguous zero-initialised block per thread, carved into the tile buffers.
template <typename T>
struct ScratchBlock {
  std::vector<T> data;
  std::vector<int> ints;
  int64_t tsize = 0, isize = 0;
  ScratchBlock(const Problem<T>& p, int nthreads, bool backward) {
    const int64_t TW = p.TW, C = p.C;
    tsize = 3 * (TW + 2) * C + TW * 9 * C + TW * p.LDP + TW * p.Hdp + TW * p.Cop + TW * C;
    if (backward) tsize += TW * p.Cop + TW * p.Hdp + TW * p.LDP + TW * 9 * p.K + 2 * TW * p.Cp;
    tsize = pad8(tsize) + 64;  // keep threads' blocks apart (no false sharing)
    isize = 2 * TW + 2 + 16;
    data.assign(static_cast<size_t>(tsize * nthreads), T(0));
    ints.assign(static_cast<size_t>(isize * nthreads), 0);
  }
  Scratch<T> get(const Problem<T>& p, int thread, bool backward) {
    const int64_t TW = p.TW, C = p.C;
    T* q = data.data() + tsize * thread;
    Scratch<T> s{};
    auto take = [&q](int64_t n) { T* r = q; q += n; return r; };
    s.nb = take(3 * (TW + 2) * C);
    s.A = take(TW * 9 * C);
    s.P = take(TW * p.LDP);
    s.Hb = take(TW * p.Hdp);
    s.Db = take(TW * p.Cop);
    s.io = take(TW * C);
    if (backward) {
      s.G = take(TW * p.Cop);
      s.dH = take(TW * p.Hdp);
      s.dP = take(TW * p.LDP);
      s.S = take(TW * 9 * p.K);
      s.dS = take(TW * p.Cp);
      s.dS2 = take(TW * p.Cp);
    }
    s.idx = ints.data() + isize * thread;
    s.col = s.idx + TW + 8;
    return s;
  }
};

int thread_count(int requested) {
#ifdef FASTNCA_OPENMP
  return std::max(1, requested > 0 ? requested : omp_get_max_threads());
#else
  return 1;
#endif
}

Tensor4 view(std::uintptr_t data, const std::vector<int64_t>& strides) {
  if (strides.size() != 4) throw std::invalid_argument("nca_step_cpu: 4 strides expected");
  for (int64_t s : strides)
    if (s < 0) throw std::invalid_argument("nca_step_cpu: negative stride");
  return Tensor4{reinterpret_cast<void*>(data), strides[0], strides[1], strides[2], strides[3]};
}

template <typename T>
void forward_impl(const Tensor4& state, const Tensor4& out, int dtype, const std::vector<int64_t>& sizes,
                  int F, int groups, int Hd, int frozen, int padding, uint64_t seed, uint32_t step,
                  uint32_t threshold, std::uintptr_t wc, std::uintptr_t pb, std::uintptr_t w1t,
                  std::uintptr_t b1, std::uintptr_t w2t, std::uintptr_t b2, int nthreads, int tile_w) {
  Problem<T> p{};
  setup(p, sizes.at(0), sizes.at(1), sizes.at(2), sizes.at(3), F, groups, Hd, frozen, padding, seed,
        step, threshold, tile_w);
  p.state = state; p.out = out;
  p.wc = ptr<const T>(wc); p.pb = ptr<const T>(pb); p.w1t = ptr<const T>(w1t);
  p.b1 = ptr<const T>(b1); p.w2t = ptr<const T>(w2t); p.b2 = ptr<const T>(b2);
  const Table<T> tab = pick<T>(dtype);
  const int64_t ntiles = p.B * p.H * p.tiles_per_row;
  const int nt = threads_for(p, thread_count(nthreads), ntiles, p.B);
  ScratchBlock<T> block(p, nt, false);
#ifdef FASTNCA_OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
  {
#ifdef FASTNCA_OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    Scratch<T> s = block.get(p, tid, false);
    // dynamic: tiles cost in proportion to their firing cells
#ifdef FASTNCA_OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
    for (int64_t t = 0; t < ntiles; ++t) tab.forward(p, t, t + 1, s);
  }
}

// Inverse of pad_index along one axis: for source s and tap k, the coordinates p in
// [0, n) with pad_index(p + k - 1, n) == s, as CSR (off[s*3 + k] .. off[s*3 + k + 1]);
// simple[s] = 1 when every tap k has exactly the one reader s - (k - 1).
void inverse_axis(int n, int mode, std::vector<int64_t>& off, std::vector<int>& idx,
                  std::vector<uint8_t>& simple) {
  std::vector<int64_t> count(static_cast<size_t>(n) * 3 + 1, 0);  // 3n + 1 entries up to 3n: past int
  for (int q = 0; q < n; ++q)
    for (int k = 0; k < 3; ++k) {
      const int s = pad_index(q + k - 1, n, mode);
      if (s >= 0) ++count[static_cast<size_t>(s) * 3 + k + 1];
    }
  for (size_t i = 1; i < count.size(); ++i) count[i] += count[i - 1];
  off = count;
  idx.assign(static_cast<size_t>(count.back()), 0);
  std::vector<int64_t> fill(count.begin(), count.end() - 1);
  for (int q = 0; q < n; ++q)  // ascending q: a fixed summation order in pass 2
    for (int k = 0; k < 3; ++k) {
      const int s = pad_index(q + k - 1, n, mode);
      if (s >= 0) idx[static_cast<size_t>(fill[static_cast<size_t>(s) * 3 + k]++)] = q;
    }
  simple.assign(static_cast<size_t>(n), 1);
  for (int s = 0; s < n; ++s)
    for (int k = 0; k < 3; ++k) {
      const size_t a = static_cast<size_t>(off[static_cast<size_t>(s) * 3 + k]);
      const size_t b = static_cast<size_t>(off[static_cast<size_t>(s) * 3 + k + 1]);
      if (b - a != 1 || idx[a] != s - (k - 1)) simple[static_cast<size_t>(s)] = 0;
    }
}

// Small images run as one batch: pass 1 over every image's tiles (one workspace per
// image), one reduction, pass 2; large ones one image at a time (one workspace, reused).
// Either way the chunking is a function of the shapes only.
template <typename T>
bool batched_backward(const Problem<T>& p) {
  return p.B > 1 && p.B * p.H * p.W * p.LDW * int64_t(sizeof(T)) <= kBatchWorkspace;
}

// Elements of T in the backward's dP workspace, which the caller allocates (with torch:
// then it shows in torch's allocator and profiler).
template <typename T>
int64_t backward_workspace(const Problem<T>& p) {
  return (batched_backward(p) ? p.B : 1) * p.H * p.W * p.LDW;
}

template <typename T>
void backward_impl(const Tensor4& grad, const Tensor4& state, const Tensor4& dstate, int dtype,
                   const std::vector<int64_t>& sizes, int F, int groups, int Hd, int frozen,
                   int padding, uint64_t seed, uint32_t step, uint32_t threshold,
                   const std::vector<std::uintptr_t>& w, const std::vector<std::uintptr_t>& dw,
                   int nthreads, int tile_w, std::uintptr_t ws_ptr) {
  if (w.size() != 9 || dw.size() != 6) throw std::invalid_argument("nca_step_cpu: 9 weights, 6 grads");
  if (!ws_ptr) throw std::invalid_argument("nca_step_cpu: no workspace (nca_step_backward_workspace elements)");
  Problem<T> p{};
  setup(p, sizes.at(0), sizes.at(1), sizes.at(2), sizes.at(3), F, groups, Hd, frozen, padding, seed,
        step, threshold, tile_w);
  p.state = state; p.grad = grad; p.dstate = dstate;
  p.wc = ptr<const T>(w[0]); p.pb = ptr<const T>(w[1]); p.w1t = ptr<const T>(w[2]);
  p.b1 = ptr<const T>(w[3]); p.w2t = ptr<const T>(w[4]); p.b2 = ptr<const T>(w[5]);
  p.w2 = ptr<const T>(w[6]); p.w1 = ptr<const T>(w[7]); p.wcb = ptr<const T>(w[8]);
  const Table<T> tab = pick<T>(dtype);

  PartialLayout pl{};
  const int64_t rows_wc = groups == 1 ? 9 * p.C : 9;
  pl.wc = 0;
  pl.pb = pl.wc + rows_wc * p.Kp;
  pl.w1 = pl.pb + p.Kp;
  pl.b1 = pl.w1 + int64_t(p.Hd) * p.LDP;
  pl.w2 = pl.b1 + p.Hdp;
  pl.b2 = pl.w2 + int64_t(p.Co) * p.Hdp;
  pl.size = pad8(pl.b2 + p.Cop) + 16;  // + 16: chunks' partials on separate cache lines

  const int64_t tiles_img = p.H * p.tiles_per_row;
  const int64_t ws_img = p.H * p.W * p.LDW;
  const bool batched = batched_backward(p);
  const int64_t groups_b = batched ? 1 : p.B;               // passes over the batch
  const int64_t images = batched ? p.B : 1;                 // images per pass
  const int64_t tiles = images * tiles_img;                 // tiles per pass
  const int64_t by_budget = std::max<int64_t>(1, kPartialBudget / (pl.size * int64_t(sizeof(T))));
  const int64_t by_cells = std::max<int64_t>(1, images * p.H * p.W / kMinChunkCells);
  const int64_t nchunks = std::min<int64_t>({tiles, int64_t(kMaxChunks), by_budget, by_cells});
  const int nt = threads_for(p, thread_count(nthreads), tiles, images);

  std::vector<T> partial(static_cast<size_t>(pl.size * nchunks));
  std::vector<double> acc(static_cast<size_t>(pl.size), 0.0);
  // The caller's workspace, backward_workspace(p) elements; not zero-filled (25 MB per
  // 256x256 image): pass 1 writes every row.
  p.ws_b = batched ? ws_img : 0;
  std::vector<int64_t> iyo, ixo;
  std::vector<int> iy, ix;
  std::vector<uint8_t> sy, sx;
  inverse_axis(static_cast<int>(p.H), padding, iyo, iy, sy);
  inverse_axis(static_cast<int>(p.W), padding, ixo, ix, sx);
  p.ws = ptr<T>(ws_ptr); p.simple_y = sy.data(); p.simple_x = sx.data();
  p.inv_y_off = iyo.data(); p.inv_y = iy.data(); p.inv_x_off = ixo.data(); p.inv_x = ix.data();
  ScratchBlock<T> block(p, nt, true);
  T* part = partial.data();
  double* accp = acc.data();
  const int64_t psize = pl.size;

#ifdef FASTNCA_OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
  {
#ifdef FASTNCA_OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    Scratch<T> s = block.get(p, tid, true);
    for (int64_t g = 0; g < groups_b; ++g) {
      const int64_t b0 = g * images;  // first image of this pass
#ifdef FASTNCA_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
      for (int64_t c = 0; c < nchunks; ++c) {
        T* pc = part + c * psize;
        std::fill(pc, pc + psize, T(0));
        // the chunk's tiles [t0, t1) of this pass, image by image
        for (int64_t t = tiles * c / nchunks, t1 = tiles * (c + 1) / nchunks; t < t1;) {
          const int64_t i = t / tiles_img, e = std::min(t1, (i + 1) * tiles_img);
          tab.backward1(p, b0 + i, t - i * tiles_img, e - i * tiles_img, s, pl, pc);
          t = e;
        }
      }
      // partials -> accumulators in chunk order (each element by one thread)
#ifdef FASTNCA_OPENMP
#pragma omp for schedule(static) nowait
#endif
      for (int64_t e = 0; e < psize; ++e) {
        double a = accp[e];
        for (int64_t c = 0; c < nchunks; ++c) a += static_cast<double>(part[c * psize + e]);
        accp[e] = a;
      }
#ifdef FASTNCA_OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
      for (int64_t t = 0; t < tiles; ++t)
        tab.backward2(p, b0 + t / tiles_img, t % tiles_img, t % tiles_img + 1, s);
    }
  }

  const int64_t sizes_out[6] = {pl.pb - pl.wc, pl.w1 - pl.pb, pl.b1 - pl.w1,
                                pl.w2 - pl.b1, pl.b2 - pl.w2, p.Cop};
  const int64_t offs[6] = {pl.wc, pl.pb, pl.w1, pl.b1, pl.w2, pl.b2};
  for (int i = 0; i < 6; ++i) {
    T* o = ptr<T>(dw[i]);
    for (int64_t e = 0; e < sizes_out[i]; ++e) o[e] = static_cast<T>(acc[offs[i] + e]);
  }
}

bool compute_fp64(int dtype) { return dtype == kFloat64; }

}  // namespace
}  // namespace nca_cpu
}  // namespace fastnca

FASTNCA_BINDINGS(m) {
  using namespace fastnca;
  using namespace fastnca::nca_cpu;
  using namespace pybind11::literals;
  namespace py = pybind11;
  m.def("nca_step_cpu_isa", &isa_name, "Instruction set the CPU nca_step kernels run with.");
  m.def("nca_step_cpu_set_isa", &set_isa, "name"_a,
        "Test hook: 'baseline' forces the portable kernels, 'auto' restores; returns the previous.");
  m.def("nca_step_cpu_tile", [] { return kTileW; });
  m.def(
      "nca_step_forward",
      [](std::uintptr_t state, std::vector<int64_t> state_strides, std::uintptr_t out,
         std::vector<int64_t> out_strides, int dtype, std::vector<int64_t> sizes, int F, int groups,
         int Hd, int frozen, int padding, uint64_t seed, uint32_t step, uint32_t threshold,
         std::uintptr_t wc, std::uintptr_t pb, std::uintptr_t w1t, std::uintptr_t b1,
         std::uintptr_t w2t, std::uintptr_t b2, int nthreads, int tile_w) {
        const Tensor4 st = view(state, state_strides), ot = view(out, out_strides);
        if (compute_fp64(dtype))
          forward_impl<double>(st, ot, dtype, sizes, F, groups, Hd, frozen, padding, seed, step,
                               threshold, wc, pb, w1t, b1, w2t, b2, nthreads, tile_w);
        else
          forward_impl<float>(st, ot, dtype, sizes, F, groups, Hd, frozen, padding, seed, step,
                              threshold, wc, pb, w1t, b1, w2t, b2, nthreads, tile_w);
      },
      "state"_a, "state_strides"_a, "out"_a, "out_strides"_a, "dtype"_a, "sizes"_a, "F"_a,
      "groups"_a, "hidden"_a, "frozen"_a, "padding"_a, "seed"_a, "step"_a, "threshold"_a, "wc"_a,
      "pb"_a, "w1t"_a, "b1"_a, "w2t"_a, "b2"_a, "nthreads"_a, "tile_w"_a = 0,
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "nca_step_backward",
      [](std::uintptr_t grad, std::vector<int64_t> grad_strides, std::uintptr_t state,
         std::vector<int64_t> state_strides, std::uintptr_t dstate,
         std::vector<int64_t> dstate_strides, int dtype, std::vector<int64_t> sizes, int F,
         int groups, int Hd, int frozen, int padding, uint64_t seed, uint32_t step,
         uint32_t threshold, std::vector<std::uintptr_t> weights,
         std::vector<std::uintptr_t> grads, int nthreads, int tile_w, std::uintptr_t ws) {
        const Tensor4 gt = view(grad, grad_strides), st = view(state, state_strides),
                      dt = view(dstate, dstate_strides);
        if (compute_fp64(dtype))
          backward_impl<double>(gt, st, dt, dtype, sizes, F, groups, Hd, frozen, padding, seed,
                                step, threshold, weights, grads, nthreads, tile_w, ws);
        else
          backward_impl<float>(gt, st, dt, dtype, sizes, F, groups, Hd, frozen, padding, seed, step,
                               threshold, weights, grads, nthreads, tile_w, ws);
      },
      "grad"_a, "grad_strides"_a, "state"_a, "state_strides"_a, "dstate"_a, "dstate_strides"_a,
      "dtype"_a, "sizes"_a, "F"_a, "groups"_a, "hidden"_a, "frozen"_a, "padding"_a, "seed"_a,
      "step"_a, "threshold"_a, "weights"_a, "grads"_a, "nthreads"_a, "tile_w"_a, "ws"_a,
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "nca_step_backward_workspace",
      [](int dtype, std::vector<int64_t> sizes, int F, int groups, int Hd, int frozen, int padding) {
        if (sizes.size() != 4) throw std::invalid_argument("nca_step_cpu: sizes must be [B, C, H, W]");
        auto elems = [&](auto tag) {
          Problem<decltype(tag)> p{};
          setup(p, sizes[0], sizes[1], sizes[2], sizes[3], F, groups, Hd, frozen, padding, 0, 0, 0, 0);
          return backward_workspace(p);
        };
        return compute_fp64(dtype) ? elems(double{}) : elems(float{});
      },
      "dtype"_a, "sizes"_a, "F"_a, "groups"_a, "hidden"_a, "frozen"_a, "padding"_a,
      "Elements (of the compute dtype) of nca_step_backward's dP workspace ('ws').");
}
