//! Engine-side counters and gauges, kept as atomics so the metrics endpoint can read them from
//! any thread without a round trip to the engine.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live numbers the engine thread updates every iteration. Counters only grow.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub num_running: AtomicU64,
    pub num_waiting: AtomicU64,
    /// Of `num_waiting`, background work (batch-job lines): it does not count against
    /// `--max-waiting-requests`, which protects interactive clients.
    pub num_waiting_background: AtomicU64,
    /// KV-cache blocks in use (cached-but-free blocks do not count), and the total.
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    /// Tokens the KV cache can hold (blocks x block size), fixed at start-up.
    pub kv_capacity_tokens: AtomicU64,
    pub prompt_tokens_total: AtomicU64,
    pub generation_tokens_total: AtomicU64,
    pub preemptions_total: AtomicU64,
    /// Prompt tokens looked up in, and found in, the prefix cache.
    pub prefix_cache_queries_total: AtomicU64,
    pub prefix_cache_hits_total: AtomicU64,
    pub iterations_total: AtomicU64,
    /// Speculative decoding (vLLM's `spec_decode_*`): drafts verified, their tokens, accepted
    /// tokens, and accepted tokens by draft position (index 0 = the first draft token).
    pub spec_drafts: AtomicU64,
    pub spec_draft_tokens: AtomicU64,
    pub spec_accepted_tokens: AtomicU64,
    pub spec_accepted_per_pos: [AtomicU64; crate::spec::MAX_SPECULATIVE_TOKENS],
    /// Requests handed to the channel, and those the engine has taken off it.
    pub(crate) submitted: AtomicU64,
    pub(crate) received: AtomicU64,
}

impl EngineStats {
    /// Requests waiting, including those still in the channel: what `vllm:num_requests_waiting`
    /// should show.
    pub fn num_waiting_total(&self) -> usize {
        self.num_waiting.load(Ordering::Relaxed) as usize + self.num_submitted_unseen()
    }

    /// Fraction (0..=1) of KV blocks in use, as `vllm:kv_cache_usage_perc` reports it.
    pub fn kv_cache_usage(&self) -> f64 {
        let total = self.kv_blocks_total.load(Ordering::Relaxed);
        if total == 0 {
            return 0.0;
        }
        self.kv_blocks_used.load(Ordering::Relaxed) as f64 / total as f64
    }

    /// Requests sent but not yet picked up by the engine thread (they count as waiting).
    pub fn num_submitted_unseen(&self) -> usize {
        let sent = self.submitted.load(Ordering::Relaxed);
        let seen = self.received.load(Ordering::Relaxed);
        sent.saturating_sub(seen) as usize
    }
}
