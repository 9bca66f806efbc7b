//! Engine settings: the scheduler and KV-cache knobs vLLM users know, plus the model to load.

use std::sync::Arc;
use std::time::Duration;

use spindle_model::LoadOptions;

use crate::trace::StepObserver;

/// How the engine thread is set up. Defaults follow `vllm serve`.
#[derive(Clone)]
pub struct EngineConfig {
    pub model: LoadOptions,
    /// Most sequences in one batch (`--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Token budget of one iteration, prefill and decode together (`--max-num-batched-tokens`).
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block (`--block-size`).
    pub block_size: usize,
    /// KV-cache size in bytes on CPU (`--kv-cache-memory`); `None` picks a default.
    pub kv_cache_memory_bytes: Option<u64>,
    /// Fraction of GPU memory for weights + activations + KV (`--gpu-memory-utilization`).
    pub gpu_memory_utilization: f32,
    /// Explicit number of KV blocks, overriding the memory-based sizing.
    pub num_blocks_override: Option<usize>,
    pub enable_prefix_caching: bool,
    /// Global seed for requests that bring none.
    pub seed: u64,
    /// New requests are refused (`QueueFull`) while this many wait; 0 means unbounded.
    pub max_waiting_requests: usize,
    /// Optional per-step callback (metrics, tests' traces).
    pub observer: Option<Arc<dyn StepObserver>>,
    /// The engine wakes at least this often while idle, to refresh its heartbeat.
    pub heartbeat_interval: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            model: LoadOptions::default(),
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            block_size: 16,
            kv_cache_memory_bytes: None,
            gpu_memory_utilization: 0.9,
            num_blocks_override: None,
            enable_prefix_caching: true,
            seed: 0,
            max_waiting_requests: 0,
            observer: None,
            heartbeat_interval: Duration::from_millis(250),
        }
    }
}
