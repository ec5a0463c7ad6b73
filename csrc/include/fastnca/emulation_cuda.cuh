// Host emulation of the CUDA built-ins used by the fastnca kernels, to run their logic
// (index maps, chunking, barriers, group shuffles, workspace layouts) on a machine without
// a GPU. Not part of any shipped module: scripts/build_cuda_emulation.sh compiles
// csrc/cuda/{nca_step,neighborhood_attention}.cu with g++ -DFASTNCA_CUDA_EMULATION into a
// test-only extension, and tests/test_cuda_kernels.py runs the CUDA launchers on CPU
// tensors through it.
//
// Model: blocks run one after another; the threads of a block run as host threads with real
// barriers, so a missing __syncthreads shows up as a race only by luck (compute-sanitizer
// racecheck on a GPU is the real check), but every index, bound and reduction order is the
// one the device executes.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

using std::max;
using std::min;

#undef __launch_bounds__
#define __launch_bounds__(...)

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace fastnca_emu {

// Reusable barrier for `count` threads that also ORs a predicate (for __syncthreads_or).
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  int arrive_and_wait(int pred = 0) {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t gen = gen_;
    acc_ |= pred;
    if (++arrived_ == count_) {
      result_ = acc_;
      acc_ = 0;
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
      return result_;
    }
    cv_.wait(lock, [&] { return gen_ != gen; });
    return result_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int count_, arrived_ = 0, acc_ = 0, result_ = 0;
  uint64_t gen_ = 0;
};

struct Block {
  std::vector<float4> smem;
  std::unique_ptr<Barrier> barrier;
  // Warp shuffles: one exchange buffer per warp, one barrier per (warp, lane mask).
  std::vector<float> exchange;
  std::mutex shuffle_mu;
  std::map<std::pair<int, unsigned>, std::unique_ptr<Barrier>> shuffle_barriers;
};

inline thread_local Block* current = nullptr;

// The 32-bit word that fills a block's shared memory at launch. A float NaN by default
// (an unwritten float shows in the results); read as an int it is a huge index that most
// bounds checks take for an idle slot, so tests also run with small integers (0: the
// first cell of a tile), which an index read past a list's end then really uses.
inline uint32_t smem_poison = 0x7FC00000u;

inline float4* dynamic_smem() { return current->smem.data(); }

inline Barrier& shuffle_barrier(int warp, unsigned mask) {
  std::lock_guard<std::mutex> lock(current->shuffle_mu);
  auto& slot = current->shuffle_barriers[{warp, mask}];
  if (!slot) slot = std::make_unique<Barrier>(__builtin_popcount(mask));
  return *slot;
}

template <typename... KArgs, typename... Args>
void run(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args... args) {
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk;
        // Poison shared memory: kernels must not read what they did not write.
        float word;
        std::memcpy(&word, &smem_poison, sizeof(word));
        blk.smem.assign((smem + sizeof(float4) - 1) / sizeof(float4) + 1, float4{word, word, word, word});
        blk.barrier = std::make_unique<Barrier>(nthreads);
        blk.exchange.assign(static_cast<size_t>(nthreads) + 32, 0.f);
        std::vector<std::thread> threads;
        std::exception_ptr error;
        std::mutex error_mu;
        for (int t = 0; t < nthreads; ++t)
          threads.emplace_back([&, t] {
            current = &blk;
            threadIdx = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = make_uint3(bx, by, bz);
            blockDim = block;
            gridDim = grid;
            try {
              kernel(args...);
            } catch (...) {
              std::lock_guard<std::mutex> lock(error_mu);
              error = std::current_exception();
            }
          });
        for (auto& th : threads) th.join();
        if (error) std::rethrow_exception(error);
      }
}

}  // namespace fastnca_emu

inline void __syncthreads() { fastnca_emu::current->barrier->arrive_and_wait(); }
inline int __syncthreads_or(int pred) {
  return fastnca_emu::current->barrier->arrive_and_wait(pred != 0);
}

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask, int width) {
  auto* blk = fastnca_emu::current;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  if (!(mask >> lane & 1u)) std::abort();  // a lane outside its own mask: invalid on the device
  const int src = (lane & ~(width - 1)) | ((lane ^ lane_mask) & (width - 1));
  if (!(mask >> src & 1u)) std::abort();   // reading a lane that does not take part
  auto& bar = fastnca_emu::shuffle_barrier(warp, mask);
  blk->exchange[tid] = v;
  bar.arrive_and_wait();
  const float out = blk->exchange[warp * 32 + src];
  bar.arrive_and_wait();
  return out;
}
