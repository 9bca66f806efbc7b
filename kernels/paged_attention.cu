// Paged attention for decode: one new query token per sequence attending to its whole cached
// context through the block table.
//
// Grid: x = num_kv_heads * head_chunks, y = decode entry (sequence), z = context partition.
// One CTA serves all query heads of one KV head (GQA group, up to DECODE_MAX_HEADS at a time), so
// each K/V row is read from memory once per group rather than once per query head.
//
// The context is walked in tiles of DECODE_TILE keys. K and V tiles are brought into shared memory
// with cp.async (16-byte copies, many in flight, zero-filled past the end), the next K tile is
// requested while the current tile's softmax and P*V run, and softmax is online (running max and
// sum per head), so one CTA handles any context length.
//
// "v1" is gridDim.z == 1 with partition_size >= every context: the CTA normalises and writes the
// output. "v2" (split-K, for long contexts or few sequences) gives each CTA one partition of
// partition_size keys; it writes its unnormalised partial output plus (max, sum), and
// paged_decode_reduce_* merges the partitions. Scores are kept in base 2 (q is pre-scaled by
// softmax_scale * log2 e), accumulation is fp32.
#include "common.cuh"

namespace spindle {

constexpr int DECODE_THREADS = 128;
constexpr int DECODE_TILE = 64;
constexpr int DECODE_MAX_HEADS = 16;

// Shared-memory plan of the decode kernel (byte offsets). Rust mirrors BYTES in
// crates/kernels/src/attention.rs (decode_smem_bytes); the kernel traps if given less.
template <typename T, int D> struct DecodeSmem {
  static constexpr int V = Vec<T>::N;
  static constexpr int CH = D / V;  // 16-byte chunks in a head row
  static constexpr int ROW = D + V; // padded tile row, in elements of T (kills bank conflicts)
  static constexpr int Q_OFF = 0;   // float [DECODE_MAX_HEADS][D]
  static constexpr int K_OFF = Q_OFF + DECODE_MAX_HEADS * D * 4;
  static constexpr int V_OFF = K_OFF + DECODE_TILE * ROW * (int)sizeof(T);
  static constexpr int S_OFF = V_OFF + DECODE_TILE * ROW * (int)sizeof(T); // float [MAX_HEADS][TILE]
  static constexpr int M_OFF = S_OFF + DECODE_MAX_HEADS * DECODE_TILE * 4; // m, l, alpha
  static constexpr int BYTES = M_OFF + 3 * DECODE_MAX_HEADS * 4;
  static_assert(D % V == 0, "head_dim must be a multiple of the 16-byte vector");
};

__device__ __forceinline__ unsigned dynamic_smem_bytes() {
#ifdef SPINDLE_EMULATE
  return emu_dynamic_smem_bytes();
#else
  unsigned r;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  return r;
#endif
}

template <typename T, int D>
__device__ __forceinline__ void paged_decode_impl(
    T *__restrict__ out, long long out_stride,         // [tokens, num_heads * D] (row stride)
    float *__restrict__ part_out,                      // [entries, num_heads, max_parts, D] (v2)
    float *__restrict__ part_ml,                       // [entries, num_heads, max_parts, 2] (v2)
    const T *__restrict__ q, long long q_stride,       // [tokens, q_stride], heads contiguous
    const T *__restrict__ k_cache, const T *__restrict__ v_cache,
    const int *__restrict__ entry_token,               // [entries] row of the query in q/out
    const int *__restrict__ entry_ctx,                 // [entries] context length
    const int *__restrict__ block_tables, int bt_stride, // [entries, bt_stride]
    int num_heads, int num_kv_heads, int block_size, float scale_log2, int partition_size, int max_parts,
    int heads_per_cta,
    int window,         // > 0: the query sees its last `window` keys only (sliding-window layers)
    float softcap_log2) { // > 0: scores become c * tanh(s / c) (Gemma 2), c in the base-2 domain
  using S = DecodeSmem<T, D>;
  constexpr int V = S::V, CH = S::CH, ROW = S::ROW;
  constexpr int NS = (DECODE_MAX_HEADS * CH + DECODE_THREADS - 1) / DECODE_THREADS; // P*V slots per thread
  constexpr int SK = DECODE_MAX_HEADS / 2; // heads per thread in the score phase
  SPINDLE_DYNAMIC_SMEM(smem);
  if (dynamic_smem_bytes() < (unsigned)S::BYTES) __trap();
  float *Qs = reinterpret_cast<float *>(smem + S::Q_OFF);
  T *Ks = reinterpret_cast<T *>(smem + S::K_OFF);
  T *Vs = reinterpret_cast<T *>(smem + S::V_OFF);
  float *Ss = reinterpret_cast<float *>(smem + S::S_OFF);
  float *m_s = reinterpret_cast<float *>(smem + S::M_OFF);
  float *l_s = m_s + DECODE_MAX_HEADS;
  float *a_s = l_s + DECODE_MAX_HEADS;

  const int tid = threadIdx.x;
  const int group = num_heads / num_kv_heads;
  const int head_chunks = (group + heads_per_cta - 1) / heads_per_cta;
  const int kvh = blockIdx.x / head_chunks;
  const int g0 = (blockIdx.x - kvh * head_chunks) * heads_per_cta;
  const int gc = min(heads_per_cta, group - g0);
  const int e = blockIdx.y;
  const int part = blockIdx.z;
  const int ctx = entry_ctx[e];
  const int lo = window > 0 ? max(0, ctx - window) : 0; // first key in the window
  // v1 starts at the window's tile; a v2 partition below the window masks every key and leaves
  // (m = -inf, l = 0), which the merge weighs 0.
  const int start = gridDim.z == 1 ? lo / DECODE_TILE * DECODE_TILE : part * partition_size;
  if (start >= ctx) return; // this sequence has fewer partitions than the grid
  const int end = min(ctx, start + partition_size);
  const int ntiles = (end - start + DECODE_TILE - 1) / DECODE_TILE;
  const long long token = entry_token[e];
  const int *table = block_tables + (long long)e * bt_stride;
  const long long head_stride = (long long)block_size * D;
  const long long block_stride = (long long)num_kv_heads * head_stride;
  const T *kbase = k_cache + kvh * head_stride;
  const T *vbase = v_cache + kvh * head_stride;

  // DECODE_TILE rows x CH chunks of 16 bytes; rows at or past `end` are zero-filled, unread.
  auto load_tile = [&](T *dst, const T *base, int tile_start) {
    load_kv_tile<DECODE_TILE, DECODE_THREADS, D, V, CH, ROW>(dst, base, tile_start, end, table,
                                                            block_size, block_stride, tid);
  };

  load_tile(Ks, kbase, start);
  cp_async_commit();
  load_tile(Vs, vbase, start);
  cp_async_commit();

  // The group's query rows, pre-scaled into the base-2 softmax domain.
  for (int i = tid; i < gc * CH; i += DECODE_THREADS) {
    const int g = i / CH;
    const int c = i - g * CH;
    const int head = kvh * group + g0 + g;
    float v[V];
    load_global(q + token * q_stride + (long long)head * D + c * V, v);
#pragma unroll
    for (int x = 0; x < V; ++x) Qs[g * D + c * V + x] = v[x] * scale_log2;
  }
  if (tid < DECODE_MAX_HEADS) {
    m_s[tid] = neg_inf();
    l_s[tid] = 0.f;
    a_s[tid] = 0.f;
  }

  // P*V ownership: "slots" are (head, 16-byte chunk) pairs of the output. With fewer slots than
  // threads, kg_count thread sets split the tile's keys and are summed at the end.
  const int slots = gc * CH;
  const int kg_count = slots >= DECODE_THREADS ? 1 : DECODE_THREADS / slots;
  int kg = 0;
  int my_g[NS], my_c[NS];
  bool my_valid[NS];
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    int slot;
    if (kg_count == 1) {
      slot = tid + s * DECODE_THREADS;
      my_valid[s] = slot < slots;
    } else {
      kg = tid / slots;
      slot = tid - kg * slots;
      my_valid[s] = s == 0 && kg < kg_count;
    }
    my_g[s] = slot / CH;
    my_c[s] = slot - my_g[s] * CH;
  }
  float acc[NS][V];
#pragma unroll
  for (int s = 0; s < NS; ++s)
#pragma unroll
    for (int x = 0; x < V; ++x) acc[s][x] = 0.f;

  const int half = tid / DECODE_TILE; // score phase: thread = (key j, every other head)
  const int j = tid - half * DECODE_TILE;
  const int warp = tid >> 5, lane = tid & 31;

  for (int t = 0; t < ntiles; ++t) {
    const int tile_start = start + t * DECODE_TILE;
    cp_async_wait<1>(); // K(t) has landed; V(t) may still be in flight
    __syncthreads();

    // Scores of key j against the group's heads half, half + 2, ...
    {
      float s[SK];
#pragma unroll
      for (int k = 0; k < SK; ++k) s[k] = 0.f;
      const T *krow = Ks + j * ROW;
#pragma unroll 2
      for (int c = 0; c < CH; ++c) {
        float kf[V];
        load_plain(krow + c * V, kf);
#pragma unroll
        for (int k = 0; k < SK; ++k) {
          const int g = half + 2 * k;
          if (g < gc) {
            const float *qr = Qs + g * D + c * V;
#pragma unroll
            for (int x = 0; x < V; ++x) s[k] = fmaf(qr[x], kf[x], s[k]);
          }
        }
      }
      const bool visible = tile_start + j < end && tile_start + j >= lo;
#pragma unroll
      for (int k = 0; k < SK; ++k) {
        const int g = half + 2 * k;
        if (softcap_log2 > 0.f) s[k] = softcap_log2 * tanhf(s[k] / softcap_log2);
        if (g < gc) Ss[g * DECODE_TILE + j] = visible ? s[k] : neg_inf();
      }
    }
    __syncthreads(); // Ss complete; Ks free
    if (t + 1 < ntiles) load_tile(Ks, kbase, tile_start + DECODE_TILE);
    cp_async_commit();

    // Online softmax, one warp per head row.
    for (int g = warp; g < gc; g += DECODE_THREADS / 32)
      online_softmax_row(Ss + g * DECODE_TILE, m_s[g], l_s[g], a_s[g], lane);
    cp_async_wait<1>(); // V(t) has landed; K(t+1) may still be in flight
    __syncthreads();

    // acc = acc * alpha + P * V
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      if (my_valid[s]) {
        const float a = a_s[my_g[s]];
#pragma unroll
        for (int x = 0; x < V; ++x) acc[s][x] *= a;
      }
    }
#pragma unroll 2
    for (int jj = kg; jj < DECODE_TILE; jj += kg_count) {
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        if (my_valid[s]) {
          const float p = Ss[my_g[s] * DECODE_TILE + jj];
          float vf[V];
          load_plain(Vs + jj * ROW + my_c[s] * V, vf);
#pragma unroll
          for (int x = 0; x < V; ++x) acc[s][x] = fmaf(p, vf[x], acc[s][x]);
        }
      }
    }
    __syncthreads(); // Vs and Ss free
    if (t + 1 < ntiles) load_tile(Vs, vbase, tile_start + DECODE_TILE);
    cp_async_commit();
  }
  cp_async_wait<0>();

  // Sum the key-split partial accumulators (reusing the K tile as scratch).
  if (kg_count > 1) {
    float *red = reinterpret_cast<float *>(smem + S::K_OFF); // [kg_count][slots][V] <= 128 * V floats
    if (my_valid[0]) {
      const int slot = tid - kg * slots;
#pragma unroll
      for (int x = 0; x < V; ++x) red[(kg * slots + slot) * V + x] = acc[0][x];
    }
    __syncthreads();
    my_valid[0] = tid < slots;
    if (my_valid[0]) {
#pragma unroll
      for (int x = 0; x < V; ++x) acc[0][x] = 0.f;
      for (int k = 0; k < kg_count; ++k)
#pragma unroll
        for (int x = 0; x < V; ++x) acc[0][x] += red[(k * slots + tid) * V + x];
      my_g[0] = tid / CH;
      my_c[0] = tid - my_g[0] * CH;
    }
  }

#pragma unroll
  for (int s = 0; s < NS; ++s) {
    if (!my_valid[s]) continue;
    const int g = my_g[s], c = my_c[s];
    const int head = kvh * group + g0 + g;
    if (gridDim.z == 1) {
      const float inv = 1.f / l_s[g];
      float o[V];
#pragma unroll
      for (int x = 0; x < V; ++x) o[x] = acc[s][x] * inv;
      store_vec(out + token * out_stride + (long long)head * D + c * V, o);
    } else {
      const long long row = ((long long)e * num_heads + head) * max_parts + part;
      float4 *po = reinterpret_cast<float4 *>(part_out + row * D + c * V);
#pragma unroll
      for (int x = 0; x < V / 4; ++x)
        po[x] = make_float4(acc[s][4 * x], acc[s][4 * x + 1], acc[s][4 * x + 2], acc[s][4 * x + 3]);
      if (c == 0) {
        part_ml[row * 2] = m_s[g];
        part_ml[row * 2 + 1] = l_s[g];
      }
    }
  }
}

// Merge the partitions of v2: grid = (num_heads, entries), DECODE_THREADS threads,
// dynamic shared memory = (max_parts + 32) floats.
template <typename T, int D>
__device__ __forceinline__ void paged_decode_reduce_impl(T *__restrict__ out, long long out_stride,
                                                         const float *__restrict__ part_out,
                                                         const float *__restrict__ part_ml,
                                                         const int *__restrict__ entry_token,
                                                         const int *__restrict__ entry_ctx, int num_heads,
                                                         int partition_size, int max_parts) {
  SPINDLE_DYNAMIC_SMEM(smem);
  float *w = reinterpret_cast<float *>(smem);
  float *scratch = w + max_parts;
  const int head = blockIdx.x, e = blockIdx.y, tid = threadIdx.x;
  const int nparts = (entry_ctx[e] + partition_size - 1) / partition_size;
  const long long row0 = ((long long)e * num_heads + head) * max_parts;
  const float *ml = part_ml + row0 * 2;
  float m = neg_inf();
  for (int p = 0; p < nparts; ++p) m = fmaxf(m, ml[2 * p]);
  float l_part = 0.f;
  for (int p = tid; p < nparts; p += blockDim.x) {
    const float wp = exp2f(ml[2 * p] - m);
    w[p] = wp;
    l_part += wp * ml[2 * p + 1];
  }
  const float l = block_sum(l_part, scratch); // also orders the w[] writes before the reads below
  const float inv = 1.f / l;
  const long long token = entry_token[e];
  for (int d = tid; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int p = 0; p < nparts; ++p) acc = fmaf(w[p], part_out[(row0 + p) * D + d], acc);
    out[token * out_stride + (long long)head * D + d] = from_float<T>(acc * inv);
  }
}

} // namespace spindle

#define SPINDLE_DECODE(NAME, T, D, MIN_BLOCKS)                                                                        \
  extern "C" __global__ void __launch_bounds__(spindle::DECODE_THREADS, MIN_BLOCKS) paged_decode_##NAME##_d##D( \
      T *out, long long out_stride, float *part_out, float *part_ml, const T *q, long long q_stride,          \
      const T *k_cache, const T *v_cache, const int *entry_token, const int *entry_ctx,                       \
      const int *block_tables, int bt_stride, int num_heads, int num_kv_heads, int block_size,               \
      float scale_log2, int partition_size, int max_parts, int heads_per_cta, int window,                    \
      float softcap_log2) {                                                                                   \
    spindle::paged_decode_impl<T, D>(out, out_stride, part_out, part_ml, q, q_stride, k_cache, v_cache,      \
                                     entry_token, entry_ctx, block_tables, bt_stride, num_heads,             \
                                     num_kv_heads, block_size, scale_log2, partition_size, max_parts,        \
                                     heads_per_cta, window, softcap_log2);                                   \
  }                                                                                                           \
  extern "C" __global__ void __launch_bounds__(spindle::DECODE_THREADS) paged_decode_reduce_##NAME##_d##D(   \
      T *out, long long out_stride, const float *part_out, const float *part_ml, const int *entry_token,     \
      const int *entry_ctx, int num_heads, int partition_size, int max_parts) {                              \
    spindle::paged_decode_reduce_impl<T, D>(out, out_stride, part_out, part_ml, entry_token, entry_ctx,      \
                                            num_heads, partition_size, max_parts);                           \
  }

// MIN_BLOCKS caps registers for occupancy: 4 CTAs per SM (128 registers) for 16-bit types, 2 for
// f32, whose larger tiles allow only 2 CTAs of shared memory anyway (and which spill at 128).
#define SPINDLE_DECODE_ALL_D(NAME, T, MIN_BLOCKS)                                                             \
  SPINDLE_DECODE(NAME, T, 64, MIN_BLOCKS)                                                                     \
  SPINDLE_DECODE(NAME, T, 80, MIN_BLOCKS)                                                                     \
  SPINDLE_DECODE(NAME, T, 96, MIN_BLOCKS)                                                                     \
  SPINDLE_DECODE(NAME, T, 128, MIN_BLOCKS)                                                                    \
  SPINDLE_DECODE(NAME, T, 256, MIN_BLOCKS)

SPINDLE_DECODE_ALL_D(f32, float, 2)
SPINDLE_DECODE_ALL_D(f16, spindle::f16, 4)
SPINDLE_DECODE_ALL_D(bf16, spindle::bf16, 4)
