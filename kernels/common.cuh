// Shared device helpers for spindle's kernels: dtype conversion, 16-byte vector access,
// warp/block reductions and cp.async. Every kernel computes in fp32 and converts at the edges.
//
// Built two ways: by nvcc for the GPU (the normal path), and by a host C++ compiler with
// kernels/emulator/emu.h included first (SPINDLE_EMULATE), which runs the same kernel bodies on
// CPU threads so their logic can be tested on machines without a GPU.
#pragma once

#ifndef SPINDLE_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
// The kernel's dynamic shared memory, 16-byte aligned.
#define SPINDLE_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace spindle {

typedef __nv_bfloat16 bf16;
typedef __half f16;

// ---------------------------------------------------------------------------------------------
// Conversions. Everything is accumulated in fp32.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(f16 x) { return __half2float(x); }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ f16 from_float<f16>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) { return __float2bfloat16_rn(x); }

// Elements of T in one 16-byte access (4 floats, 8 halves).
template <typename T> struct Vec {
  static constexpr int N = 16 / sizeof(T);
};

// 16 bytes are moved as one uint4 (LDG.128 / STG.128 / LDS.128) and reinterpreted with memcpy,
// which the compiler turns into register moves and which, unlike pointer casts, is defined
// behaviour for every compiler (the CPU emulator builds these with g++ -O2).

// Load 16 bytes of T from global memory through the read-only path and widen to fp32.
template <typename T>
__device__ __forceinline__ void load_global(const T *__restrict__ p, float (&out)[Vec<T>::N]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4 *>(p));
  T e[Vec<T>::N];
  memcpy(e, &raw, 16);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) out[i] = to_float(e[i]);
}

// Load 16 bytes of T from memory written in this kernel (no read-only path) and widen.
template <typename T>
__device__ __forceinline__ void load_plain(const T *p, float (&out)[Vec<T>::N]) {
  const uint4 raw = *reinterpret_cast<const uint4 *>(p);
  T e[Vec<T>::N];
  memcpy(e, &raw, 16);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) out[i] = to_float(e[i]);
}

// Narrow fp32 values to T and store 16 bytes.
template <typename T>
__device__ __forceinline__ void store_vec(T *p, const float (&v)[Vec<T>::N]) {
  T e[Vec<T>::N];
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) e[i] = from_float<T>(v[i]);
  uint4 raw;
  memcpy(&raw, e, 16);
  *reinterpret_cast<uint4 *>(p) = raw;
}

// ---------------------------------------------------------------------------------------------
// Reductions.
#ifndef SPINDLE_EMULATE
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
#else
// The emulator reduces a warp in one exchange instead of five (same result up to rounding order).
__device__ __forceinline__ float warp_sum(float v) { return emu_warp_reduce(v, false); }
__device__ __forceinline__ float warp_max(float v) { return emu_warp_reduce(v, true); }
#endif

// Sum over the whole block; every thread gets the result. `scratch` holds >= 32 floats.
// blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = lane < num_warps ? scratch[lane] : 0.f;
  total = warp_sum(total);
  __syncthreads(); // scratch may be reused right after
  return total;
}

// ---------------------------------------------------------------------------------------------
// Asynchronous global->shared copies (sm_80+): many 16-byte loads in flight without registers.
// `valid == false` zero-fills the 16 bytes without reading global memory.
#ifndef SPINDLE_EMULATE
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N committed groups are still pending.
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

// Softmax runs in base 2: scores are pre-multiplied by log2(e), so exp(x) == exp2(x * log2 e).
constexpr float LOG2E = 1.4426950408889634f;
__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

// One step of the online softmax for a 64-wide row of base-2 scores, by one warp: replaces the
// scores by their weights against the running maximum `m`, folds their sum into `l`, and leaves
// in `alpha` the factor earlier partial outputs must be rescaled by. `m`, `l`, `alpha` live in
// shared memory; lane 0 updates them. Shared by the paged decode and prefill kernels.
__device__ __forceinline__ void online_softmax_row(float *row, float &m, float &l, float &alpha,
                                                   int lane) {
  const float s0 = row[lane], s1 = row[lane + 32];
  const float m_old = m;
  const float m_new = fmaxf(m_old, warp_max(fmaxf(s0, s1)));
  const float m_use = m_new == neg_inf() ? 0.f : m_new;
  const float p0 = exp2f(s0 - m_use), p1 = exp2f(s1 - m_use);
  row[lane] = p0;
  row[lane + 32] = p1;
  const float psum = warp_sum(p0 + p1);
  if (lane == 0) {
    const float a = exp2f(m_old - m_use);
    l = l * a + psum;
    m = m_new;
    alpha = a;
  }
}

// Copy key (or value) rows `tile_start .. tile_start + TILE` of one KV head from the paged cache
// into shared memory with 16-byte cp.async: `THREADS` threads, `CH` chunks of `V` elements per
// head row of `D` elements, rows `ROW` elements apart in `dst`. `base` is the head's start in
// block 0, `table` the sequence's block table; rows at or past `end` are zero-filled and their
// global memory is not read. Shared by the paged decode and prefill kernels.
template <int TILE, int THREADS, int D, int V, int CH, int ROW, typename T>
__device__ __forceinline__ void load_kv_tile(T *dst, const T *base, int tile_start, int end,
                                             const int *table, int block_size,
                                             long long block_stride, int tid) {
  for (int i = tid; i < TILE * CH; i += THREADS) {
    const int r = i / CH;
    const int c = i - r * CH;
    const int pos = tile_start + r;
    const bool valid = pos < end;
    const T *src = base;
    if (valid) {
      const long long blk = table[pos / block_size];
      src = base + blk * block_stride + (long long)(pos % block_size) * D + c * V;
    }
    cp_async16(dst + r * ROW + c * V, src, valid);
  }
}

} // namespace spindle
