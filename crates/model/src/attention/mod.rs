//! The attention interface between the model and the paged KV cache. The model hands over a
//! *flattened batch*: every sequence's new tokens concatenated, with per-token slots in the cache
//! and per-sequence block tables. One call covers prefill (many new tokens attending to a cached
//! prefix), chunked prefill and decode (one new token) in the same batch, so the engine never
//! has to split a batch by phase, and a CUDA backend can implement the same trait.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod kv_dtype;

use candle_core::Tensor;

use spindle_kernels::plan::{validate_sequences, SeqSpec};
use spindle_kernels::KernelError;

use crate::error::{ModelError, Result};

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

    /// The sequences as the kernels crate describes them (for its checks and launch plans).
    pub fn seq_specs(&self) -> Vec<SeqSpec<'_>> {
        self.sequences
            .iter()
            .map(|s| SeqSpec {
                query_start: s.query_start,
                query_len: s.query_len,
                context_len: s.context_len,
                block_table: &s.block_table,
            })
            .collect()
    }

    /// Check the metadata against a cache of `shape` and a batch of `tokens` new tokens, so a
    /// bad batch is an error before any backend indexes its cache with it.
    pub fn validate(&self, shape: &CacheShape, tokens: usize) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidBatch(m));
        if self.slot_mapping.len() != tokens {
            return bad(format!(
                "{} slots for {tokens} tokens",
                self.slot_mapping.len()
            ));
        }
        let capacity = shape.capacity_tokens();
        if let Some(slot) = self.slot_mapping.iter().find(|&&s| s as usize >= capacity) {
            return bad(format!(
                "slot {slot} is outside a cache of {capacity} slots"
            ));
        }
        validate_sequences(
            &self.seq_specs(),
            tokens,
            shape.block_size,
            shape.num_blocks,
        )
        .map_err(|e| {
            ModelError::InvalidBatch(match e {
                KernelError::InvalidBatch(m) => m,
                other => other.to_string(),
            })
        })?;
        Ok(())
    }
}

/// How one layer attends. Families differ here, and only here, inside attention: the score
/// scale (Gemma's `query_pre_attn_scalar`, Granite's `attention_multiplier`), Gemma 2's
/// soft-capping of scores, and sliding-window layers.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerAttention {
    /// Multiplier of `q · k` before the softmax.
    pub scale: f32,
    /// Scores become `cap * tanh(score / cap)` (after scaling), as Gemma 2 does.
    pub softcap: Option<f32>,
    /// A query at position `p` sees keys `p - window + 1 ..= p` only (transformers'
    /// `sliding_window` convention: the window counts the query's own key).
    pub window: Option<usize>,
    /// gpt-oss's attention sinks, one learned logit per query head: each head's softmax
    /// denominator gains `exp(sink)`, a key that is never attended to.
    pub sinks: Option<std::sync::Arc<[f32]>>,
}

impl LayerAttention {
    /// Plain causal attention with the usual `1 / sqrt(head_dim)` scale.
    pub fn causal(head_dim: usize) -> Self {
        Self {
            scale: 1.0 / (head_dim as f32).sqrt(),
            softcap: None,
            window: None,
            sinks: None,
        }
    }

    /// The first key position a query at `pos` sees.
    pub fn first_visible(&self, pos: usize) -> usize {
        match self.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        }
    }

    /// Reject values the kernels cannot honour (a zero window would see nothing).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidBatch(m));
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return bad(format!("attention scale {} must be positive", self.scale));
        }
        if self.softcap.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
            return bad(format!("soft-cap {:?} must be positive", self.softcap));
        }
        if self.window == Some(0) {
            return bad("a sliding window must hold at least one token".into());
        }
        if let Some(s) = &self.sinks {
            if s.iter().any(|x| !x.is_finite()) {
                return bad("attention sinks must be finite".into());
            }
        }
        Ok(())
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

/// The shape checks every backend applies to one layer's inputs, so a mismatch is an error
/// before any cache is indexed: `q` must be `[step_tokens, num_heads, head_dim]` with `num_heads`
/// a multiple of the cache's kv heads, `k`/`v` `[step_tokens, num_kv_heads, head_dim]`, and the
/// layer must have a cache. Returns `num_heads`.
pub fn check_layer_inputs(
    shape: &CacheShape,
    layer: usize,
    step_tokens: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<usize> {
    let CacheShape {
        num_layers,
        num_kv_heads,
        head_dim,
        ..
    } = *shape;
    let (tokens, num_heads, q_dim) = q.dims3()?;
    if tokens != step_tokens
        || q_dim != head_dim
        || num_heads % num_kv_heads.max(1) != 0
        || k.dims3()? != (tokens, num_kv_heads, head_dim)
        || k.dims() != v.dims()
    {
        return Err(ModelError::InvalidBatch(format!(
            "q {:?} / k {:?} / v {:?} do not match the step ({step_tokens} tokens) and the cache (kv heads {num_kv_heads}, head_dim {head_dim})",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if layer >= num_layers {
        return Err(ModelError::InvalidBatch(format!(
            "layer {layer} has no cache"
        )));
    }
    Ok(num_heads)
}

/// A paged-attention implementation that owns the KV cache it attends over.
///
/// Each forward pass first calls [`AttentionBackend::begin_step`] with the step's metadata: the
/// backend validates it once and prepares what every layer shares (the CUDA backend uploads its
/// launch plan). Then each layer calls [`AttentionBackend::attend`]: `q` is
/// `[tokens, num_heads, head_dim]`, `k`/`v` are `[tokens, num_kv_heads, head_dim]`; the backend
/// writes `k`/`v` into the cache at the step's slots, then computes causal attention of each
/// sequence's new tokens over its cached context (within the layer's window, with its scale
/// and soft-cap: [`LayerAttention`]) and returns `[tokens, num_heads, head_dim]`.
pub trait AttentionBackend: Send {
    /// Validate and prepare one step's metadata for `num_heads` query heads.
    fn begin_step(&mut self, metadata: &AttentionMetadata, num_heads: usize) -> Result<()>;

    /// One layer's attention within the step begun last.
    fn attend(
        &mut self,
        layer: usize,
        how: &LayerAttention,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor>;

    /// Copy whole blocks (all layers), `(src, dst)` pairs: copy-on-write after a fork.
    fn copy_blocks(&mut self, pairs: &[(u32, u32)]) -> Result<()>;

    fn shape(&self) -> CacheShape;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> CacheShape {
        CacheShape {
            num_layers: 1,
            num_blocks: 4,
            block_size: 4,
            num_kv_heads: 1,
            head_dim: 8,
        }
    }

    /// One sequence: 2 cached tokens plus 3 new ones in blocks 2 and 0.
    fn good() -> AttentionMetadata {
        AttentionMetadata {
            sequences: vec![SequenceSlice {
                query_start: 0,
                query_len: 3,
                context_len: 5,
                block_table: vec![2, 0],
            }],
            slot_mapping: vec![10, 11, 0],
        }
    }

    #[test]
    fn each_inconsistency_is_an_error() {
        assert!(good().validate(&shape(), 3).is_ok());
        type Breakage = Box<dyn Fn(&mut AttentionMetadata)>;
        let cases: Vec<(&str, Breakage)> = vec![
            (
                "slots for",
                Box::new(|m| {
                    m.slot_mapping.pop();
                }),
            ),
            ("outside a cache", Box::new(|m| m.slot_mapping[0] = 16)),
            ("inconsistent", Box::new(|m| m.sequences[0].query_start = 1)),
            ("inconsistent", Box::new(|m| m.sequences[0].context_len = 2)),
            ("cannot hold", Box::new(|m| m.sequences[0].context_len = 9)),
            (
                "outside the cache",
                Box::new(|m| m.sequences[0].block_table[1] = 4),
            ),
        ];
        for (want, break_it) in cases {
            let mut md = good();
            break_it(&mut md);
            let err = md.validate(&shape(), 3).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }
}
