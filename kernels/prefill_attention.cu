// Prefill attention over the paged cache: variable-length sequences in one launch, each query
// token attending causally to its sequence's cached prefix plus the new tokens before it (the new
// K/V rows are written by reshape_and_cache first). Serves plain prefill, chunked prefill and
// prefix-cache hits alike.
//
// Grid: x = work item (sequence, first query token of the CTA), y = KV head. A CTA takes up to
// PF_ROWS query rows, a row being one (token, query head of the GQA group) pair, so K/V tiles are
// shared by every head of the group. Work items are built on the host, longest first.
//
// Flash-attention structure on CUDA cores, fp32 throughout: Q rows live in shared memory as
// fp32 (pre-scaled into the base-2 softmax domain); K/V tiles of PF_TILE keys arrive by cp.async
// (16-byte copies, zero-filled past the last key needed), the next K tile is requested while
// softmax and P*V of the current one run; each thread computes a 4x4 block of S and a
// 4-row x 16-byte-chunk block of O, so every shared-memory load feeds 4x its width in FMAs.
// Register budget: 2 CTAs per SM (128 registers) up to D = 128, 1 CTA for D = 256, whose shared
// memory allows only one anyway. (A tensor-core version (mma / wgmma) is the next step; see
// docs/cuda.md.)
#include "common.cuh"

namespace spindle {

constexpr int PF_THREADS = 256;
constexpr int PF_ROWS = 64;
constexpr int PF_TILE = 64;

// Shared-memory plan (byte offsets). Rust mirrors BYTES in crates/kernels/src/attention.rs
// (prefill_smem_bytes); the kernel traps if given less.
template <typename T, int D> struct PrefillSmem {
  static constexpr int V = Vec<T>::N;
  static constexpr int CH = D / V;
  static constexpr int ROW = D + V;          // K/V tile row (elements of T), padded by 16 bytes
  static constexpr int QROW = D + 4;         // Q row (floats), padded by 16 bytes
  static constexpr int SROW = PF_TILE + 16;  // S/P row (floats): rows 16 banks apart
  static constexpr int Q_OFF = 0;
  static constexpr int K_OFF = Q_OFF + PF_ROWS * QROW * 4;
  static constexpr int V_OFF = K_OFF + PF_TILE * ROW * (int)sizeof(T);
  static constexpr int S_OFF = V_OFF + PF_TILE * ROW * (int)sizeof(T);
  static constexpr int M_OFF = S_OFF + PF_ROWS * SROW * 4; // m, l, alpha per row
  static constexpr int BYTES = M_OFF + 3 * PF_ROWS * 4;
  static_assert(D % V == 0, "head_dim must be a multiple of the 16-byte vector");
};

__device__ __forceinline__ unsigned prefill_dynamic_smem_bytes() {
#ifdef SPINDLE_EMULATE
  return emu_dynamic_smem_bytes();
#else
  unsigned r;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  return r;
#endif
}

template <typename T, int D>
__device__ __forceinline__ void prefill_impl(
    T *__restrict__ out, long long out_stride,   // [tokens, out_stride]
    const T *__restrict__ q, long long q_stride, // [tokens, q_stride], heads contiguous
    const T *__restrict__ k_cache, const T *__restrict__ v_cache,
    const int *__restrict__ seq_qstart, // [seqs] first row of the sequence in q/out
    const int *__restrict__ seq_qlen,   // [seqs] new tokens this step
    const int *__restrict__ seq_ctx,    // [seqs] context length after this step
    const int *__restrict__ block_tables, int bt_stride, // [seqs, bt_stride]
    const int *__restrict__ work_seq, const int *__restrict__ work_qoff, // [work items]
    int num_heads, int num_kv_heads, int block_size, float scale_log2, int tokens_per_cta,
    int window,           // > 0: a query at p sees keys p - window + 1 ..= p only
    float softcap_log2) { // > 0: scores become c * tanh(s / c) (Gemma 2), c in the base-2 domain
  using S = PrefillSmem<T, D>;
  constexpr int V = S::V, CH = S::CH, ROW = S::ROW, QROW = S::QROW, SROW = S::SROW;
  constexpr int NCK = (CH + 15) / 16; // output chunks per thread
  SPINDLE_DYNAMIC_SMEM(smem);
  if (prefill_dynamic_smem_bytes() < (unsigned)S::BYTES) __trap();
  float *Qs = reinterpret_cast<float *>(smem + S::Q_OFF);
  T *Ks = reinterpret_cast<T *>(smem + S::K_OFF);
  T *Vs = reinterpret_cast<T *>(smem + S::V_OFF);
  float *Ss = reinterpret_cast<float *>(smem + S::S_OFF);
  float *m_s = reinterpret_cast<float *>(smem + S::M_OFF);
  float *l_s = m_s + PF_ROWS;
  float *a_s = l_s + PF_ROWS;

  const int tid = threadIdx.x;
  const int seq = work_seq[blockIdx.x];
  const int qoff = work_qoff[blockIdx.x];
  const int kvh = blockIdx.y;
  const int group = num_heads / num_kv_heads;
  const int qlen = seq_qlen[seq];
  const int ctx = seq_ctx[seq];
  const long long qstart = seq_qstart[seq];
  const int ntok = min(tokens_per_cta, qlen - qoff);
  const int rows = ntok * group; // <= PF_ROWS (host guarantees tokens_per_cta * group <= PF_ROWS)
  const int first_pos = ctx - qlen + qoff; // absolute position of the CTA's first query token
  const int nkeys = first_pos + ntok;      // the CTA's last query sees keys 0..nkeys-1
  const int ntiles = (nkeys + PF_TILE - 1) / PF_TILE;
  // Tiles wholly before the window of the CTA's first query are skipped.
  const int t_first = window > 0 ? max(0, first_pos - window + 1) / PF_TILE : 0;
  const int *table = block_tables + (long long)seq * bt_stride;
  const long long head_stride = (long long)block_size * D;
  const long long block_stride = (long long)num_kv_heads * head_stride;
  const T *kbase = k_cache + kvh * head_stride;
  const T *vbase = v_cache + kvh * head_stride;

  // PF_TILE rows x CH chunks of 16 bytes; keys at or past `nkeys` are zero-filled, unread.
  auto load_tile = [&](T *dst, const T *base, int tile_start) {
    load_kv_tile<PF_TILE, PF_THREADS, D, V, CH, ROW>(dst, base, tile_start, nkeys, table,
                                                    block_size, block_stride, tid);
  };

  load_tile(Ks, kbase, t_first * PF_TILE);
  cp_async_commit();
  load_tile(Vs, vbase, t_first * PF_TILE);
  cp_async_commit();

  // Q rows (token-major, head-minor), scaled; rows past `rows` are zero.
  for (int i = tid; i < PF_ROWS * CH; i += PF_THREADS) {
    const int r = i / CH;
    const int c = i - r * CH;
    float v[V];
    if (r < rows) {
      const int tok = r / group;
      const int head = kvh * group + (r - tok * group);
      load_global(q + (qstart + qoff + tok) * q_stride + (long long)head * D + c * V, v);
#pragma unroll
      for (int x = 0; x < V; ++x) v[x] *= scale_log2;
    } else {
#pragma unroll
      for (int x = 0; x < V; ++x) v[x] = 0.f;
    }
    float4 *dst = reinterpret_cast<float4 *>(Qs + r * QROW + c * V);
#pragma unroll
    for (int x = 0; x < V / 4; ++x) dst[x] = make_float4(v[4 * x], v[4 * x + 1], v[4 * x + 2], v[4 * x + 3]);
  }
  if (tid < PF_ROWS) {
    m_s[tid] = neg_inf();
    l_s[tid] = 0.f;
    a_s[tid] = 0.f; // rows past `rows` keep alpha 0 and P 0: their O stays 0
  }

  const int tx = tid & 15, ty = tid >> 4;
  const int warp = tid >> 5, lane = tid & 31;
  int row_pos[4]; // absolute position of each of this thread's S rows (-1: not a row)
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    row_pos[i] = r < rows ? first_pos + r / group : -1;
  }
  float o[4][NCK][V];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int k = 0; k < NCK; ++k)
#pragma unroll
      for (int x = 0; x < V; ++x) o[i][k][x] = 0.f;

  for (int t = t_first; t < ntiles; ++t) {
    const int tile_start = t * PF_TILE;
    cp_async_wait<1>();
    __syncthreads();

    // S = Q K^T: rows ty + 16 i, keys tx + 16 jj.
    {
      float acc[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) acc[i][jj] = 0.f;
#pragma unroll 2
      for (int c = 0; c < CH; ++c) {
        float kf[4][V];
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) load_plain(Ks + (tx + 16 * jj) * ROW + c * V, kf[jj]);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float qv[V];
          const float4 *qp = reinterpret_cast<const float4 *>(Qs + (ty + 16 * i) * QROW + c * V);
#pragma unroll
          for (int x = 0; x < V / 4; ++x) {
            const float4 f = qp[x];
            qv[4 * x] = f.x;
            qv[4 * x + 1] = f.y;
            qv[4 * x + 2] = f.z;
            qv[4 * x + 3] = f.w;
          }
#pragma unroll
          for (int jj = 0; jj < 4; ++jj)
#pragma unroll
            for (int x = 0; x < V; ++x) acc[i][jj] = fmaf(qv[x], kf[jj][x], acc[i][jj]);
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = ty + 16 * i;
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const int col = tx + 16 * jj;
          const int key = tile_start + col;
          // Rows that are not real rows get P = 0 directly (softmax skips them).
          float sc = acc[i][jj];
          if (softcap_log2 > 0.f) sc = softcap_log2 * tanhf(sc / softcap_log2);
          const bool seen = key <= row_pos[i] && (window <= 0 || key > row_pos[i] - window);
          Ss[r * SROW + col] = row_pos[i] < 0 ? 0.f : (seen ? sc : neg_inf());
        }
      }
    }
    __syncthreads(); // S complete; Ks free
    if (t + 1 < ntiles) load_tile(Ks, kbase, tile_start + PF_TILE);
    cp_async_commit();

    // Online softmax: warp w takes rows w, w + 8, ...
    for (int r = warp; r < rows; r += PF_THREADS / 32)
      online_softmax_row(Ss + r * SROW, m_s[r], l_s[r], a_s[r], lane);
    cp_async_wait<1>();
    __syncthreads();

    // O = O * alpha + P V
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float a = a_s[ty + 16 * i];
#pragma unroll
      for (int k = 0; k < NCK; ++k)
#pragma unroll
        for (int x = 0; x < V; ++x) o[i][k][x] *= a;
    }
#pragma unroll 4
    for (int j = 0; j < PF_TILE; ++j) {
      float p[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) p[i] = Ss[(ty + 16 * i) * SROW + j];
#pragma unroll
      for (int k = 0; k < NCK; ++k) {
        const int c = tx + 16 * k;
        if (c < CH) {
          float vf[V];
          load_plain(Vs + j * ROW + c * V, vf);
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int x = 0; x < V; ++x) o[i][k][x] = fmaf(p[i], vf[x], o[i][k][x]);
        }
      }
    }
    __syncthreads(); // Vs, Ss free
    if (t + 1 < ntiles) load_tile(Vs, vbase, tile_start + PF_TILE);
    cp_async_commit();
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    if (r >= rows) continue;
    const int tok = r / group;
    const int head = kvh * group + (r - tok * group);
    const float inv = 1.f / l_s[r];
    T *dst = out + (qstart + qoff + tok) * out_stride + (long long)head * D;
#pragma unroll
    for (int k = 0; k < NCK; ++k) {
      const int c = tx + 16 * k;
      if (c < CH) {
        float v[V];
#pragma unroll
        for (int x = 0; x < V; ++x) v[x] = o[i][k][x] * inv;
        store_vec(dst + c * V, v);
      }
    }
  }
}

} // namespace spindle

#define SPINDLE_PREFILL(NAME, T, D, MIN_BLOCKS)                                                              \
  extern "C" __global__ void __launch_bounds__(spindle::PF_THREADS, MIN_BLOCKS)                           \
      prefill_attention_##NAME##_d##D(                                                                    \
      T *out, long long out_stride, const T *q, long long q_stride, const T *k_cache, const T *v_cache,     \
      const int *seq_qstart, const int *seq_qlen, const int *seq_ctx, const int *block_tables,              \
      int bt_stride, const int *work_seq, const int *work_qoff, int num_heads, int num_kv_heads,            \
      int block_size, float scale_log2, int tokens_per_cta, int window, float softcap_log2) {              \
    spindle::prefill_impl<T, D>(out, out_stride, q, q_stride, k_cache, v_cache, seq_qstart, seq_qlen,      \
                                seq_ctx, block_tables, bt_stride, work_seq, work_qoff, num_heads,          \
                                num_kv_heads, block_size, scale_log2, tokens_per_cta, window,              \
                                softcap_log2);                                                             \
  }

#define SPINDLE_PREFILL_ALL_D(NAME, T)                                                                        \
  SPINDLE_PREFILL(NAME, T, 64, 2)                                                                             \
  SPINDLE_PREFILL(NAME, T, 80, 2)                                                                             \
  SPINDLE_PREFILL(NAME, T, 96, 2)                                                                             \
  SPINDLE_PREFILL(NAME, T, 128, 2)                                                                            \
  SPINDLE_PREFILL(NAME, T, 256, 1)

SPINDLE_PREFILL_ALL_D(f32, float)
SPINDLE_PREFILL_ALL_D(f16, spindle::f16)
SPINDLE_PREFILL_ALL_D(bf16, spindle::bf16)
