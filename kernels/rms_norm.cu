// Fused RMSNorm, optionally with the residual add in front of it:
//   rms_norm:      out = x / sqrt(mean(x^2) + eps) * w
//   add_rms_norm:  sum = x + residual (rounded to T, as the unfused graph does);
//                  out = rms_norm(sum)  — one read of each input instead of three passes.
// One CTA per row; 16-byte vectors when the row allows it, fp32 statistics. The second pass
// re-reads the row, which is still in L1.
#include "common.cuh"

namespace spindle {

template <typename T>
__device__ __forceinline__ void rms_norm_impl(T *__restrict__ out, long long out_stride, const T *__restrict__ x,
                                              long long x_stride, const T *__restrict__ w, int hidden, float eps,
                                              int vectorized) {
  __shared__ float scratch[32];
  constexpr int V = Vec<T>::N;
  const long long row = blockIdx.x;
  const T *xr = x + row * x_stride;
  T *orow = out + row * out_stride;
  float ss = 0.f;
  if (vectorized) {
    for (int i = threadIdx.x; i < hidden / V; i += blockDim.x) {
      float v[V];
      load_global(xr + i * V, v);
#pragma unroll
      for (int k = 0; k < V; ++k) ss = fmaf(v[k], v[k], ss);
    }
  } else {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
      const float v = to_float(xr[i]);
      ss = fmaf(v, v, ss);
    }
  }
  const float inv = rsqrtf(block_sum(ss, scratch) / (float)hidden + eps);
  if (vectorized) {
    for (int i = threadIdx.x; i < hidden / V; i += blockDim.x) {
      float v[V], wv[V];
      load_global(xr + i * V, v);
      load_global(w + i * V, wv);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = v[k] * inv * wv[k];
      store_vec(orow + i * V, v);
    }
  } else {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
      orow[i] = from_float<T>(to_float(xr[i]) * inv * to_float(w[i]));
  }
}

// `sum` may alias `residual` and `out` may alias `x`: each element is read before it is written,
// by the same thread.
template <typename T>
__device__ __forceinline__ void add_rms_norm_impl(T *out, T *sum, long long stride, const T *x, const T *residual,
                                                  const T *__restrict__ w, int hidden, float eps, int vectorized) {
  __shared__ float scratch[32];
  constexpr int V = Vec<T>::N;
  const long long row = blockIdx.x;
  const T *xr = x + row * stride;
  const T *rr = residual + row * stride;
  T *sr = sum + row * stride;
  T *orow = out + row * stride;
  float ss = 0.f;
  if (vectorized) {
    for (int i = threadIdx.x; i < hidden / V; i += blockDim.x) {
      float a[V], b[V];
      load_plain(xr + i * V, a);
      load_plain(rr + i * V, b);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        a[k] = to_float(from_float<T>(a[k] + b[k])); // the stored (rounded) sum feeds the norm
        ss = fmaf(a[k], a[k], ss);
      }
      store_vec(sr + i * V, a);
    }
  } else {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
      const T s = from_float<T>(to_float(xr[i]) + to_float(rr[i]));
      sr[i] = s;
      const float f = to_float(s);
      ss = fmaf(f, f, ss);
    }
  }
  const float inv = rsqrtf(block_sum(ss, scratch) / (float)hidden + eps);
  if (vectorized) {
    for (int i = threadIdx.x; i < hidden / V; i += blockDim.x) {
      float v[V], wv[V];
      load_plain(sr + i * V, v);
      load_global(w + i * V, wv);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = v[k] * inv * wv[k];
      store_vec(orow + i * V, v);
    }
  } else {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) orow[i] = from_float<T>(to_float(sr[i]) * inv * to_float(w[i]));
  }
}

} // namespace spindle

#define SPINDLE_RMS_NORM(NAME, T)                                                                            \
  extern "C" __global__ void __launch_bounds__(1024) rms_norm_##NAME(T *out, long long out_stride,          \
                                                                     const T *x, long long x_stride,        \
                                                                     const T *w, int hidden, float eps,     \
                                                                     int vectorized) {                      \
    spindle::rms_norm_impl<T>(out, out_stride, x, x_stride, w, hidden, eps, vectorized);                    \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(1024)                                                       \
      add_rms_norm_##NAME(T *out, T *sum, long long stride, const T *x, const T *residual, const T *w,       \
                          int hidden, float eps, int vectorized) {                                          \
    spindle::add_rms_norm_impl<T>(out, sum, stride, x, residual, w, hidden, eps, vectorized);               \
  }

SPINDLE_RMS_NORM(f32, float)
SPINDLE_RMS_NORM(f16, spindle::f16)
SPINDLE_RMS_NORM(bf16, spindle::bf16)
