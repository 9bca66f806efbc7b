//! Sizing the paged KV cache and choosing the attention backend for the model's device: the
//! CPU cache from `--kv-cache-memory` (or, without it, from the machine's available memory:
//! `host_memory.rs`), the CUDA cache from `--gpu-memory-utilization` after a
//! profiling forward pass (or an explicit block count for either).

use spindle_model::attention::cpu::CpuAttention;
use spindle_model::{
    AttentionBackend, CacheShape, CpuArithmetic, KvCacheDtypeChoice, KvDtype, LlamaModel,
    ModelError,
};

use crate::api::EngineError;
use crate::config::EngineConfig;

fn setup(e: ModelError) -> EngineError {
    EngineError::KvCacheSetup(std::sync::Arc::new(e))
}

/// Bytes of activations one step at `max_num_batched_tokens` may need on the GPU (hidden states,
/// fused projections, MLP or chosen experts, router logits, logits rows), doubled for
/// temporaries: the fallback when the profiling pass cannot measure (a driver without
/// stream-ordered allocation).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn activation_estimate(model: &LlamaModel, config: &EngineConfig) -> u64 {
    let c = model.config();
    let tokens = config.max_num_batched_tokens as u64;
    // A MoE token's MLP work is its chosen experts' (and the shared expert's) gate/up outputs.
    let mlp = match &c.moe {
        Some(m) => (m.top_k * 2 * m.expert_intermediate
            + 2 * m.shared_expert_intermediate.unwrap_or(0)
            + m.num_experts)
            .max(2 * c.intermediate_size),
        None => 2 * c.intermediate_size,
    };
    let per_token =
        (4 * c.hidden_size + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + mlp) as u64;
    let logits = (config.max_num_seqs as u64).min(tokens) * c.vocab_size as u64;
    2 * (tokens * per_token + logits) * model.dtype().size_in_bytes() as u64
}

/// Build the cache and backend for `model`, with `shape.num_blocks` filled in. On CUDA this runs
/// one profiling forward pass of up to `max_model_len` tokens first.
pub fn build(
    model: &LlamaModel,
    config: &EngineConfig,
    mut shape: CacheShape,
    max_model_len: usize,
) -> Result<(Box<dyn AttentionBackend>, CacheShape), EngineError> {
    if model.device().is_cuda() {
        return build_cuda(model, config, shape, max_model_len);
    }
    let dtype = cpu_kv_dtype(model, config.kv_cache_dtype);
    let bytes_per_block = shape.bytes_per_block(dtype.size_in_bytes()) as u64;
    shape.num_blocks = match (config.num_blocks_override, config.kv_cache_memory_bytes) {
        (Some(n), _) => n,
        (None, Some(bytes)) => (bytes / bytes_per_block) as usize,
        (None, None) => {
            // What every sequence at full length could use, and a share of the machine.
            let blocks_per_seq = max_model_len.div_ceil(shape.block_size.max(1)) as u64;
            let needed = (config.max_num_seqs as u64)
                .saturating_mul(blocks_per_seq)
                .saturating_mul(bytes_per_block);
            let available = crate::host_memory::available_bytes();
            let bytes = crate::host_memory::default_cpu_kv_bytes(available, needed);
            tracing::info!(
                cache_mib = bytes >> 20,
                available_mib = available.map(|a| a >> 20),
                needed_mib = needed >> 20,
                "KV cache sized from the machine (--kv-cache-memory not given); pages become resident as blocks are used"
            );
            (bytes / bytes_per_block) as usize
        }
    };
    let cache = CpuAttention::with_dtype(shape, dtype).map_err(setup)?;
    Ok((Box::new(cache), shape))
}

/// The CPU cache's element type for `--kv-cache-dtype`. `auto` is the model's dtype, as in
/// vLLM: bf16 where the linear layers multiply in bf16 (the CPU default), else f32.
fn cpu_kv_dtype(model: &LlamaModel, choice: KvCacheDtypeChoice) -> KvDtype {
    match choice {
        KvCacheDtypeChoice::Auto if model.cpu_arithmetic() == CpuArithmetic::Bf16 => KvDtype::Bf16,
        KvCacheDtypeChoice::Auto => KvDtype::F32,
        KvCacheDtypeChoice::BFloat16 => KvDtype::Bf16,
        KvCacheDtypeChoice::Float16 => KvDtype::F16,
        KvCacheDtypeChoice::Float32 => KvDtype::F32,
    }
}

/// Run one forward pass of the biggest step the scheduler can build (`max_num_batched_tokens`
/// prompt tokens of one sequence, capped at `max_model_len`, with logits for up to
/// `max_num_seqs` rows) on a cache just big enough for it, and return the peak device memory it
/// used beyond what was allocated before; `None` when the driver cannot report it.
#[cfg(feature = "cuda")]
fn profile_step_memory(
    model: &LlamaModel,
    config: &EngineConfig,
    shape: CacheShape,
    max_model_len: usize,
) -> Result<Option<u64>, EngineError> {
    use spindle_model::attention::cuda::{CudaAttention, PoolPeak};
    use spindle_model::{AttentionMetadata, ForwardBatch, SequenceSlice};
    let tokens = config.max_num_batched_tokens.min(max_model_len).max(1);
    let logit_rows = config.max_num_seqs.clamp(1, tokens);
    let mut small = shape;
    small.num_blocks = tokens.div_ceil(shape.block_size);
    let mut backend = CudaAttention::new(small, model.dtype(), model.device()).map_err(setup)?;
    let batch = ForwardBatch {
        token_ids: vec![0; tokens],
        positions: (0..tokens as u32).collect(),
        attention: AttentionMetadata {
            sequences: vec![SequenceSlice {
                query_start: 0,
                query_len: tokens,
                context_len: tokens,
                block_table: (0..small.num_blocks as u32).collect(),
            }],
            slot_mapping: (0..tokens as u32).collect(),
        },
        logit_rows: ((tokens - logit_rows) as u32..tokens as u32).collect(),
    };
    let Some(probe) = PoolPeak::start(model.device()).map_err(setup)? else {
        return Ok(None);
    };
    let logits = model
        .forward(&batch, &mut backend)
        .map_err(|e| EngineError::ProfilingPass {
            tokens,
            source: std::sync::Arc::new(e),
        })?;
    let peak = probe.finish(model.device()).map_err(setup)?;
    drop(logits);
    Ok(Some(peak))
}

#[cfg(feature = "cuda")]
fn build_cuda(
    model: &LlamaModel,
    config: &EngineConfig,
    mut shape: CacheShape,
    max_model_len: usize,
) -> Result<(Box<dyn AttentionBackend>, CacheShape), EngineError> {
    use spindle_model::attention::cuda::{cuda_memory_info, CudaAttention};
    let dtype = model.dtype();
    let matches_model = match config.kv_cache_dtype {
        KvCacheDtypeChoice::Auto => true,
        KvCacheDtypeChoice::BFloat16 => dtype == candle_core::DType::BF16,
        KvCacheDtypeChoice::Float16 => dtype == candle_core::DType::F16,
        KvCacheDtypeChoice::Float32 => dtype == candle_core::DType::F32,
    };
    if !matches_model {
        return Err(setup(ModelError::Unsupported(format!(
            "--kv-cache-dtype {} on CUDA: the CUDA cache holds the model dtype; pass --dtype {} instead",
            config.kv_cache_dtype, config.kv_cache_dtype
        ))));
    }
    let bytes_per_block = shape.bytes_per_block(dtype.size_in_bytes()) as u64;
    shape.num_blocks = match config.num_blocks_override {
        Some(n) => n,
        None => {
            // Measure one maximal step, as vLLM does before sizing its cache.
            let step = match profile_step_memory(model, config, shape, max_model_len)? {
                Some(peak) => {
                    tracing::info!(
                        peak_mib = peak >> 20,
                        "profiling pass: one step at --max-num-batched-tokens needs this much beyond the weights"
                    );
                    peak
                }
                None => {
                    let estimate = activation_estimate(model, config);
                    tracing::warn!(
                        estimate_mib = estimate >> 20,
                        "the driver reports no memory-pool statistics; reserving an estimate for activations"
                    );
                    estimate
                }
            };
            // Weights are loaded: what is used now is theirs (and other processes'). Keep the
            // total under `utilization`, minus room for one step's activations.
            let (free, total) = cuda_memory_info(model.device()).map_err(setup)?;
            let (free, total) = (free as u64, total as u64);
            let allowed =
                (total as f64 * config.gpu_memory_utilization.clamp(0.0, 1.0) as f64) as u64;
            let used = total.saturating_sub(free);
            let budget = allowed.saturating_sub(used).saturating_sub(step);
            (budget / bytes_per_block) as usize
        }
    };
    let backend = CudaAttention::new(shape, dtype, model.device()).map_err(setup)?;
    Ok((Box::new(backend), shape))
}

#[cfg(not(feature = "cuda"))]
fn build_cuda(
    _: &LlamaModel,
    _: &EngineConfig,
    _: CacheShape,
    _: usize,
) -> Result<(Box<dyn AttentionBackend>, CacheShape), EngineError> {
    Err(setup(ModelError::Unsupported(
        "the model is on a CUDA device but this build has no CUDA support: rebuild with `--features cuda`".into(),
    )))
}

/// Bytes one block takes on the backend `model` uses (for logs and errors).
pub fn bytes_per_block(model: &LlamaModel, config: &EngineConfig, shape: &CacheShape) -> usize {
    let elem = if model.device().is_cuda() {
        model.dtype().size_in_bytes()
    } else {
        cpu_kv_dtype(model, config.kv_cache_dtype).size_in_bytes()
    };
    shape.bytes_per_block(elem)
}
