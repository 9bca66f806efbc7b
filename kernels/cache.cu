// Paged KV-cache maintenance: write the step's new K/V rows at their slots, and copy whole blocks
// (copy-on-write after a fork).
//
// Cache layout, per layer and for K and V alike (same as the CPU backend):
//   [num_blocks, num_kv_heads, block_size, head_dim]
// so the keys of one head inside a block are contiguous and a head's row is head_dim elements.
#include "common.cuh"

namespace spindle {

// One CTA per new token; threads stride over (kv head, 16-byte chunk). Every access is a 16-byte
// vector and consecutive threads touch consecutive chunks of a head's row, so loads from the
// token's K/V rows and stores into the cache row are coalesced. Both loads are issued before
// either store. Requires head_dim * sizeof(T) % 16 == 0 and 16-byte aligned rows (the host checks).
template <typename T>
__device__ __forceinline__ void reshape_and_cache_impl(const T *__restrict__ key,   // [tokens, key_stride]
                                                       const T *__restrict__ value, // [tokens, value_stride]
                                                       T *__restrict__ key_cache, T *__restrict__ value_cache,
                                                       const uint32_t *__restrict__ slot_mapping, // [tokens]
                                                       int num_kv_heads, int head_dim, int block_size,
                                                       long long key_stride, long long value_stride) {
  constexpr int V = Vec<T>::N;
  const int token = blockIdx.x;
  const uint32_t slot = slot_mapping[token];
  if (slot == 0xffffffffu) return; // padding token: nothing to store
  const long long block = slot / (uint32_t)block_size;
  const int offset = (int)(slot % (uint32_t)block_size);
  const int chunks_per_head = head_dim / V;
  const int total = num_kv_heads * chunks_per_head;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int head = i / chunks_per_head;
    const int chunk = i - head * chunks_per_head;
    const long long src_k = token * key_stride + (long long)head * head_dim + chunk * V;
    const long long src_v = token * value_stride + (long long)head * head_dim + chunk * V;
    const long long dst = ((block * num_kv_heads + head) * block_size + offset) * (long long)head_dim + chunk * V;
    const uint4 k = __ldg(reinterpret_cast<const uint4 *>(key + src_k));
    const uint4 v = __ldg(reinterpret_cast<const uint4 *>(value + src_v));
    *reinterpret_cast<uint4 *>(key_cache + dst) = k;
    *reinterpret_cast<uint4 *>(value_cache + dst) = v;
  }
}

} // namespace spindle

#define SPINDLE_RESHAPE_AND_CACHE(NAME, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(256)                                                         \
      reshape_and_cache_##NAME(const T *key, const T *value, T *key_cache, T *value_cache,                  \
                               const uint32_t *slot_mapping, int num_kv_heads, int head_dim, int block_size, \
                               long long key_stride, long long value_stride) {                              \
    spindle::reshape_and_cache_impl<T>(key, value, key_cache, value_cache, slot_mapping, num_kv_heads,     \
                                       head_dim, block_size, key_stride, value_stride);                     \
  }

SPINDLE_RESHAPE_AND_CACHE(f32, float)
SPINDLE_RESHAPE_AND_CACHE(f16, spindle::f16)
SPINDLE_RESHAPE_AND_CACHE(bf16, spindle::bf16)

// Copy whole blocks in every cache buffer (all layers, K and V): grid = (num_pairs, num_buffers).
// `buffers[b]` is the device address of buffer b; `pairs` holds (src, dst) block indices. The host
// guarantees no block is both a source and a destination in one launch (no ordering between CTAs).
// Dtype-agnostic: moves 16-byte words; a block is block_bytes long (a multiple of 16).
extern "C" __global__ void __launch_bounds__(256)
    copy_blocks(const unsigned long long *buffers, const uint32_t *pairs, long long block_bytes) {
  uint4 *base = reinterpret_cast<uint4 *>(buffers[blockIdx.y]);
  const long long words = block_bytes / 16;
  const long long src = (long long)pairs[2 * blockIdx.x] * words;
  const long long dst = (long long)pairs[2 * blockIdx.x + 1] * words;
  for (long long i = threadIdx.x; i < words; i += blockDim.x) base[dst + i] = base[src + i];
}
