//! The attention interface between the model and the paged KV cache. The model hands over a
//! *flattened batch*: every sequence's new tokens concatenated, with per-token slots in the cache
//! and per-sequence block tables. One call covers prefill (many new tokens attending to a cached
//! prefix), chunked prefill and decode (one new token) in the same batch, so the engine never
//! has to split a batch by phase, and a CUDA backend can implement the same trait.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use candle_core::Tensor;

use crate::error::Result;

/// Where one sequence's new tokens sit in the flattened batch and in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceSlice {
    /// Index of the sequence's first new token in the flattened batch.
    pub query_start: usize,
    /// Number of new tokens this step (1 for decode).
    pub query_len: usize,
    /// Tokens in the cache after this step's writes (cached prefix + new tokens).
    pub context_len: usize,
    /// Cache blocks holding positions `0..context_len`, in order.
    pub block_table: Vec<u32>,
}

/// Per-step metadata every attention layer needs. Built once per step by the engine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttentionMetadata {
    pub sequences: Vec<SequenceSlice>,
    /// Cache slot (`block * block_size + offset`) each new token's K/V is written to.
    pub slot_mapping: Vec<u32>,
}

impl AttentionMetadata {
    /// Total new tokens in the flattened batch.
    pub fn num_tokens(&self) -> usize {
        self.slot_mapping.len()
    }
}

/// Shape of the paged cache a backend allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl CacheShape {
    /// Bytes one block occupies across all layers (K and V), at `bytes_per_element`.
    pub fn bytes_per_block(&self, bytes_per_element: usize) -> usize {
        2 * self.num_layers
            * self.block_size
            * self.num_kv_heads
            * self.head_dim
            * bytes_per_element
    }

    /// Token capacity of the whole cache.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }
}

/// A paged-attention implementation that owns the KV cache it attends over.
///
/// `q` is `[tokens, num_heads, head_dim]`, `k`/`v` are `[tokens, num_kv_heads, head_dim]`; the
/// backend first writes `k`/`v` into the cache at `metadata.slot_mapping`, then computes causal
/// attention of each sequence's new tokens over its cached context and returns
/// `[tokens, num_heads, head_dim]`.
pub trait AttentionBackend: Send {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        metadata: &AttentionMetadata,
    ) -> Result<Tensor>;

    /// Copy whole blocks (all layers), `(src, dst)` pairs: copy-on-write after a fork.
    fn copy_blocks(&mut self, pairs: &[(u32, u32)]) -> Result<()>;

    fn shape(&self) -> CacheShape;
}
