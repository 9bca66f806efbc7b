// Rotary position embedding in place, Hugging Face "rotate half" layout: for i < D/2,
//   x'[i]       = x[i] * cos[p][i] - x[i + D/2] * sin[p][i]
//   x'[i + D/2] = x[i + D/2] * cos[p][i] + x[i] * sin[p][i]
// with p the token's own position (so sequences at different positions share one launch).
// q and k are updated in one launch; their rows may be strided (e.g. views into the fused qkv
// projection). cos/sin tables are [max_positions, D/2] in the model dtype, as RotaryEmbedding
// builds them. One CTA per token; 16-byte vectors over (head, chunk of the half).
#include "common.cuh"

namespace spindle {

template <typename T>
__device__ __forceinline__ void rotate_vec(T *x, const T *__restrict__ cos_row, const T *__restrict__ sin_row,
                                           int half, int c) {
  constexpr int V = Vec<T>::N;
  float a[V], b[V], cs[V], sn[V];
  load_plain(x + c * V, a);
  load_plain(x + half + c * V, b);
  load_global(cos_row + c * V, cs);
  load_global(sin_row + c * V, sn);
  float ra[V], rb[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    ra[k] = a[k] * cs[k] - b[k] * sn[k];
    rb[k] = b[k] * cs[k] + a[k] * sn[k];
  }
  store_vec(x + c * V, ra);
  store_vec(x + half + c * V, rb);
}

template <typename T>
__device__ __forceinline__ void rotary_impl(T *q, long long q_stride, T *k, long long k_stride,
                                            const T *__restrict__ cos, const T *__restrict__ sin,
                                            const uint32_t *__restrict__ positions, int max_positions, int num_heads,
                                            int num_kv_heads, int head_dim, int vectorized) {
  constexpr int V = Vec<T>::N;
  const long long token = blockIdx.x;
  const int half = head_dim / 2;
  // A position past the table is clamped rather than read out of bounds (the model validates
  // positions against max_model_len before this point).
  const long long pos = min(positions[token], (uint32_t)(max_positions - 1));
  const T *cos_row = cos + pos * half;
  const T *sin_row = sin + pos * half;
  const int heads = num_heads + num_kv_heads;
  if (vectorized) {
    const int chunks = half / V;
    for (int i = threadIdx.x; i < heads * chunks; i += blockDim.x) {
      const int h = i / chunks;
      const int c = i - h * chunks;
      T *x = h < num_heads ? q + token * q_stride + (long long)h * head_dim
                           : k + token * k_stride + (long long)(h - num_heads) * head_dim;
      rotate_vec(x, cos_row, sin_row, half, c);
    }
  } else {
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
      const int h = i / half;
      const int d = i - h * half;
      T *x = h < num_heads ? q + token * q_stride + (long long)h * head_dim
                           : k + token * k_stride + (long long)(h - num_heads) * head_dim;
      const float a = to_float(x[d]), b = to_float(x[d + half]);
      const float cs = to_float(cos_row[d]), sn = to_float(sin_row[d]);
      x[d] = from_float<T>(a * cs - b * sn);
      x[d + half] = from_float<T>(b * cs + a * sn);
    }
  }
}

} // namespace spindle

#define SPINDLE_ROTARY(NAME, T)                                                                              \
  extern "C" __global__ void __launch_bounds__(256)                                                         \
      rotary_embedding_##NAME(T *q, long long q_stride, T *k, long long k_stride, const T *cos, const T *sin, \
                              const uint32_t *positions, int max_positions, int num_heads, int num_kv_heads, \
                              int head_dim, int vectorized) {                                               \
    spindle::rotary_impl<T>(q, q_stride, k, k_stride, cos, sin, positions, max_positions, num_heads,         \
                            num_kv_heads, head_dim, vectorized);                                            \
  }

SPINDLE_ROTARY(f32, float)
SPINDLE_ROTARY(f16, spindle::f16)
SPINDLE_ROTARY(bf16, spindle::bf16)
