// A small CUDA execution emulator for spindle's kernels, so their logic (indexing, tiling, the
// cp.async pipeline's group accounting, online softmax, split-K merge) can be checked against a
// reference on machines without a GPU, such as CI. Include it before the kernel sources and
// compile them as host C++20:
//
//   g++ -std=c++20 -O2 -pthread -I$CUDA_HOME/include -Ikernels kernels/emulator/test_kernels.cpp
//
// Model: CTAs run one after another; the threads of a CTA are real host threads, so
// __syncthreads is a barrier of the CTA's threads and warp shuffles are barriers of the warp's 32
// threads. Shared memory is a per-CTA buffer (the dynamic part) plus function statics (the static
// part, which is safe because only one CTA runs at a time). cp.async copies synchronously. What
// it cannot show: timing, memory-model races between real concurrent CTAs, bank conflicts, and
// anything the compiler or hardware does differently. It is a logic check, not a GPU.
#pragma once

#define SPINDLE_EMULATE 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __shared__ static
#define __align__(n) alignas(n)

namespace emu {

// A reusable barrier that spins briefly and then yields: far cheaper than futex sleeps when
// hundreds of emulated threads share a few cores and meet at a barrier every few instructions.
class Barrier {
public:
  explicit Barrier(int n) : expected_(n) {}
  void arrive_and_wait() {
    unsigned gen;
    {
      Lock lock(busy_);
      gen = generation_.load(std::memory_order_relaxed);
      if (++waiting_ == expected_) {
        waiting_ = 0;
        generation_.store(gen + 1, std::memory_order_release);
        return;
      }
    }
    for (int spin = 0; generation_.load(std::memory_order_acquire) == gen; ++spin)
      if (spin > 64) std::this_thread::yield();
  }
  // Leave for good (a thread that exited the kernel): later phases need one arrival fewer.
  void arrive_and_drop() {
    Lock lock(busy_);
    --expected_;
    if (expected_ > 0 && waiting_ == expected_) {
      waiting_ = 0;
      generation_.store(generation_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
    }
  }

private:
  struct Lock {
    explicit Lock(std::atomic<bool> &f) : flag(f) {
      while (flag.exchange(true, std::memory_order_acquire)) std::this_thread::yield();
    }
    ~Lock() { flag.store(false, std::memory_order_release); }
    std::atomic<bool> &flag;
  };
  std::atomic<bool> busy_{false};
  int expected_;
  int waiting_ = 0;
  std::atomic<unsigned> generation_{0};
};

struct Warp {
  explicit Warp(int n) : bar(n) {}
  Barrier bar;
  float buf[32];
};

struct Cta {
  Cta(int threads, size_t smem_bytes) : bar(threads), smem(smem_bytes + 16), smem_bytes(smem_bytes) {
    const int warps = (threads + 31) / 32;
    for (int w = 0; w < warps; ++w) warp.emplace_back(std::make_unique<Warp>(std::min(32, threads - 32 * w)));
  }
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warp;
  std::vector<unsigned char> smem;
  size_t smem_bytes;
  unsigned char *aligned_smem() {
    uintptr_t p = reinterpret_cast<uintptr_t>(smem.data());
    return reinterpret_cast<unsigned char *>((p + 15) & ~uintptr_t(15));
  }
};

inline thread_local Cta *cta = nullptr;
inline thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;

} // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define SPINDLE_DYNAMIC_SMEM(name) unsigned char *name = emu::cta->aligned_smem()

inline unsigned emu_dynamic_smem_bytes() { return (unsigned)emu::cta->smem_bytes; }
inline void __syncthreads() { emu::cta->bar.arrive_and_wait(); }
inline void __trap() {
  std::fprintf(stderr, "emulator: __trap() in block (%u,%u,%u) thread %u\n", blockIdx.x, blockIdx.y, blockIdx.z,
               threadIdx.x);
  std::abort();
}

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  emu::Warp &w = *emu::cta->warp[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  w.buf[lane] = v;
  w.bar.arrive_and_wait();
  const float r = w.buf[lane ^ lane_mask];
  w.bar.arrive_and_wait();
  return r;
}

// A whole-warp sum or max in one exchange (what the xor butterfly computes).
inline float emu_warp_reduce(float v, bool is_max) {
  emu::Warp &w = *emu::cta->warp[threadIdx.x / 32];
  w.buf[threadIdx.x % 32] = v;
  w.bar.arrive_and_wait();
  float r = w.buf[0];
  for (int i = 1; i < 32; ++i) r = is_max ? std::fmax(r, w.buf[i]) : r + w.buf[i];
  w.bar.arrive_and_wait();
  return r;
}

template <typename T> inline T __ldg(const T *p) { return *p; }
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
template <typename T> inline T min(T a, T b) { return a < b ? a : b; }
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }

namespace spindle {
// cp.async emulation: copy (or zero-fill) at once; the group bookkeeping becomes a no-op.
inline void cp_async16(void *smem, const void *gmem, bool valid) {
  if (valid)
    std::memcpy(smem, gmem, 16);
  else
    std::memset(smem, 0, 16);
}
inline void cp_async_commit() {}
template <int N> inline void cp_async_wait() {}
} // namespace spindle

namespace emu {

// Run `kernel` over the grid: CTAs in order on one pool of `block.x` host threads (made once per
// launch; each CTA gets fresh barriers and garbage-filled shared memory).
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, A... args) {
  const int threads = (int)(block.x * block.y * block.z);
  std::vector<dim3> ctas;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) ctas.push_back(dim3(x, y, z));
  std::barrier<> phase(threads);
  std::unique_ptr<Cta> current;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_idx = dim3((unsigned)t, 0, 0);
      block_dim = block;
      grid_dim = grid;
      for (const dim3 &b : ctas) {
        if (t == 0) {
          current = std::make_unique<Cta>(threads, smem_bytes);
          std::memset(current->smem.data(), 0xff, current->smem.size()); // shared memory starts as garbage
        }
        phase.arrive_and_wait();
        cta = current.get();
        block_idx = b;
        kernel(args...);
        // An exited thread no longer holds up the CTA's barriers (as on the GPU).
        cta->warp[t / 32]->bar.arrive_and_drop();
        cta->bar.arrive_and_drop();
        phase.arrive_and_wait();
      }
    });
  }
  for (auto &th : pool) th.join();
}

} // namespace emu
