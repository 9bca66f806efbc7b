//! Sizing the paged KV cache and choosing the attention backend for the model's device: the
//! CPU cache from `--kv-cache-memory`, the CUDA cache from `--gpu-memory-utilization` (or an
//! explicit block count for either).

use spindle_model::attention::cpu::CpuAttention;
use spindle_model::{AttentionBackend, CacheShape, LlamaModel};

use crate::api::EngineError;
use crate::config::EngineConfig;

/// Default CPU KV-cache budget when `--kv-cache-memory` is not given (vLLM's CPU default).
pub const DEFAULT_CPU_KV_CACHE_BYTES: u64 = 4 << 30;

fn dead(e: impl std::fmt::Display) -> EngineError {
    EngineError::EngineDead(e.to_string())
}

/// Bytes of activations one step at `max_num_batched_tokens` may need on the GPU (hidden states,
/// fused projections, MLP, logits rows), doubled for temporaries. Reserved before the cache is
/// sized. An estimate: no profiling pass has been run on hardware yet.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn activation_reserve(model: &LlamaModel, config: &EngineConfig) -> u64 {
    let c = model.config();
    let tokens = config.max_num_batched_tokens as u64;
    let per_token = (4 * c.hidden_size
        + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        + 2 * c.intermediate_size) as u64;
    let logits = (config.max_num_seqs as u64).min(tokens) * c.vocab_size as u64;
    2 * (tokens * per_token + logits) * model.dtype().size_in_bytes() as u64
}

/// Build the cache and backend for `model`, with `shape.num_blocks` filled in.
pub fn build(
    model: &LlamaModel,
    config: &EngineConfig,
    mut shape: CacheShape,
) -> Result<(Box<dyn AttentionBackend>, CacheShape), EngineError> {
    if model.device().is_cuda() {
        return build_cuda(model, config, shape);
    }
    // The CPU cache is always f32 (see spindle_model::attention::cpu).
    let bytes_per_block = shape.bytes_per_block(std::mem::size_of::<f32>()) as u64;
    shape.num_blocks = match config.num_blocks_override {
        Some(n) => n,
        None => {
            (config
                .kv_cache_memory_bytes
                .unwrap_or(DEFAULT_CPU_KV_CACHE_BYTES)
                / bytes_per_block) as usize
        }
    };
    Ok((Box::new(CpuAttention::new(shape).map_err(dead)?), shape))
}

#[cfg(feature = "cuda")]
fn build_cuda(
    model: &LlamaModel,
    config: &EngineConfig,
    mut shape: CacheShape,
) -> Result<(Box<dyn AttentionBackend>, CacheShape), EngineError> {
    use spindle_model::attention::cuda::{cuda_memory_info, CudaAttention};
    let dtype = model.dtype();
    let bytes_per_block = shape.bytes_per_block(dtype.size_in_bytes()) as u64;
    shape.num_blocks = match config.num_blocks_override {
        Some(n) => n,
        None => {
            // Weights are loaded: what is used now is theirs (and other processes'). Keep the
            // total under `utilization`, minus room for one step's activations.
            let (free, total) = cuda_memory_info(model.device()).map_err(dead)?;
            let (free, total) = (free as u64, total as u64);
            let allowed =
                (total as f64 * config.gpu_memory_utilization.clamp(0.0, 1.0) as f64) as u64;
            let used = total.saturating_sub(free);
            let budget = allowed
                .saturating_sub(used)
                .saturating_sub(activation_reserve(model, config));
            (budget / bytes_per_block) as usize
        }
    };
    let backend = CudaAttention::new(shape, dtype, model.device()).map_err(dead)?;
    Ok((Box::new(backend), shape))
}

#[cfg(not(feature = "cuda"))]
fn build_cuda(
    _: &LlamaModel,
    _: &EngineConfig,
    _: CacheShape,
) -> Result<(Box<dyn AttentionBackend>, CacheShape), EngineError> {
    Err(dead("the model is on a CUDA device but this build has no CUDA support: rebuild with `--features cuda`"))
}

/// Bytes one block takes on the backend `model` uses (for logs and errors).
pub fn bytes_per_block(model: &LlamaModel, shape: &CacheShape) -> usize {
    let elem = if model.device().is_cuda() {
        model.dtype().size_in_bytes()
    } else {
        std::mem::size_of::<f32>()
    };
    shape.bytes_per_block(elem)
}
