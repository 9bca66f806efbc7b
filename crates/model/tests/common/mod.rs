//! Helpers shared by the model crate's integration tests.

#![allow(dead_code)]

pub mod gguf_write;
pub mod hash_weights;
pub mod tiny;

use std::path::PathBuf;

use candle_core::Tensor;
use spindle_model::attention::cpu::CpuAttention;
use spindle_model::{AttentionMetadata, CacheShape, ForwardBatch, LlamaModel, SequenceSlice};

/// The default model, fetched by `scripts/fetch-model.sh`.
pub fn default_model_path() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A CPU cache big enough for a few sequences of `max_tokens`.
pub fn cpu_cache(model: &LlamaModel, num_blocks: usize, block_size: usize) -> CpuAttention {
    cpu_cache_of(model, num_blocks, block_size, spindle_model::KvDtype::F32)
}

/// [`cpu_cache`] holding `dtype`.
pub fn cpu_cache_of(
    model: &LlamaModel,
    num_blocks: usize,
    block_size: usize,
    dtype: spindle_model::KvDtype,
) -> CpuAttention {
    let c = model.config();
    CpuAttention::with_dtype(
        CacheShape {
            num_layers: c.num_layers,
            num_blocks,
            block_size,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        },
        dtype,
    )
    .expect("allocate cache")
}

/// Runs sequences through the paged forward pass with a trivial block assignment: sequence `i`
/// owns blocks `[i * blocks_per_seq, (i + 1) * blocks_per_seq)`.
pub struct PagedRunner {
    pub cache: CpuAttention,
    pub block_size: usize,
    pub blocks_per_seq: usize,
}

impl PagedRunner {
    pub fn new(model: &LlamaModel, num_seqs: usize, max_tokens: usize, block_size: usize) -> Self {
        Self::with_kv_dtype(
            model,
            num_seqs,
            max_tokens,
            block_size,
            spindle_model::KvDtype::F32,
        )
    }

    /// A runner whose cache holds `dtype`.
    #[allow(dead_code)]
    pub fn with_kv_dtype(
        model: &LlamaModel,
        num_seqs: usize,
        max_tokens: usize,
        block_size: usize,
        dtype: spindle_model::KvDtype,
    ) -> Self {
        let blocks_per_seq = max_tokens.div_ceil(block_size);
        Self {
            cache: cpu_cache_of(model, num_seqs * blocks_per_seq, block_size, dtype),
            block_size,
            blocks_per_seq,
        }
    }

    fn table(&self, seq: usize, context_len: usize) -> Vec<u32> {
        let first = seq * self.blocks_per_seq;
        (first..first + context_len.div_ceil(self.block_size))
            .map(|b| b as u32)
            .collect()
    }

    /// One step: `chunks[i] = (sequence index, tokens already cached, new tokens)`.
    /// Returns logits of each chunk's last token, `[chunks, vocab]`.
    pub fn step(&mut self, model: &LlamaModel, chunks: &[(usize, usize, Vec<u32>)]) -> Tensor {
        let mut batch = ForwardBatch::default();
        let mut md = AttentionMetadata::default();
        for (seq, cached, new) in chunks {
            let start = batch.token_ids.len();
            let context_len = cached + new.len();
            let table = self.table(*seq, context_len);
            for (i, &tok) in new.iter().enumerate() {
                let pos = cached + i;
                batch.token_ids.push(tok);
                batch.positions.push(pos as u32);
                md.slot_mapping.push(
                    table[pos / self.block_size] * self.block_size as u32
                        + (pos % self.block_size) as u32,
                );
            }
            md.sequences.push(SequenceSlice {
                query_start: start,
                query_len: new.len(),
                context_len,
                block_table: table,
            });
            batch.logit_rows.push((batch.token_ids.len() - 1) as u32);
        }
        batch.attention = md;
        model.forward(&batch, &mut self.cache).expect("forward")
    }
}

/// Row-wise log-softmax of `[rows, vocab]` logits, as plain vectors.
pub fn log_softmax_rows(logits: &Tensor) -> Vec<Vec<f32>> {
    let rows: Vec<Vec<f32>> = logits.to_vec2().expect("logits to vec");
    rows.into_iter()
        .map(|row| {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
            let lse = max as f64 + sum.ln();
            row.iter().map(|&x| (x as f64 - lse) as f32).collect()
        })
        .collect()
}

pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// vLLM's `check_logprobs_close` on one greedy continuation: tokens equal up to the first
/// divergence, and there each side's token is among the other's top 5. `want[i]` and
/// `want_top5[i]` are the reference's token and top 5 at step `i`. Returns the number of steps
/// matched before a divergence, or the failing step's description.
pub fn logprobs_close(
    model: &LlamaModel,
    prompt: &[u32],
    want: &[u32],
    want_top5: &[Vec<u32>],
) -> Result<usize, String> {
    let mut runner = PagedRunner::new(model, 1, prompt.len() + want.len() + 1, 16);
    let mut logits = runner.step(model, &[(0, 0, prompt.to_vec())]);
    for (step, (&w, top)) in want.iter().zip(want_top5).enumerate() {
        let len = prompt.len() + step;
        let row: Vec<f32> = logits.to_vec2::<f32>().expect("logits").remove(0);
        let got = argmax(&row);
        if got != w {
            let mut ids: Vec<u32> = (0..row.len() as u32).collect();
            ids.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
            ids.truncate(5);
            if top.contains(&got) && ids.contains(&w) {
                return Ok(step);
            }
            return Err(format!(
                "step {step}: ours {got} (top-5 {ids:?}) vs reference {w} (top-5 {top:?})"
            ));
        }
        logits = runner.step(model, &[(0, len, vec![got])]);
    }
    Ok(want.len())
}
