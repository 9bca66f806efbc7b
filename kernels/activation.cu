// SwiGLU activation fused with the gate/up split: x is [rows, 2 * d] holding gate | up (the fused
// gate_up projection), out[r, i] = silu(gate[r, i]) * up[r, i], silu(g) = g / (1 + exp(-g)).
// Computed in fp32 and rounded once. Grid = (rows, ceil(d / (threads * vec))); each thread owns
// one 16-byte vector (or, when rows are not 16-byte aligned, the same span element by element).
#include "common.cuh"

namespace spindle {

__device__ __forceinline__ float silu(float g) { return g / (1.f + __expf(-g)); }

template <typename T>
__device__ __forceinline__ void silu_and_mul_impl(T *__restrict__ out, long long out_stride,
                                                  const T *__restrict__ x, long long x_stride, int d,
                                                  int vectorized) {
  constexpr int V = Vec<T>::N;
  const long long row = blockIdx.x;
  const T *gate = x + row * x_stride;
  const T *up = gate + d;
  T *o = out + row * out_stride;
  if (vectorized) {
    const int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= d / V) return;
    float g[V], u[V];
    load_global(gate + i * V, g);
    load_global(up + i * V, u);
#pragma unroll
    for (int k = 0; k < V; ++k) g[k] = silu(g[k]) * u[k];
    store_vec(o + i * V, g);
  } else {
    const int base = (blockIdx.y * blockDim.x + threadIdx.x) * V;
    for (int k = 0; k < V; ++k) {
      const int i = base + k;
      if (i < d) o[i] = from_float<T>(silu(to_float(gate[i])) * to_float(up[i]));
    }
  }
}

} // namespace spindle

#define SPINDLE_SILU(NAME, T)                                                                                \
  extern "C" __global__ void __launch_bounds__(256)                                                         \
      silu_and_mul_##NAME(T *out, long long out_stride, const T *x, long long x_stride, int d, int vectorized) { \
    spindle::silu_and_mul_impl<T>(out, out_stride, x, x_stride, d, vectorized);                             \
  }

SPINDLE_SILU(f32, float)
SPINDLE_SILU(f16, spindle::f16)
SPINDLE_SILU(bf16, spindle::bf16)
