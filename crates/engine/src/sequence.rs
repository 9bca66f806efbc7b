//! The engine's bookkeeping for requests and their sequences. A request (`RequestGroup`) owns
//! its event channel and `n` sequences (choices); a `Sequence` is one growing token list with its
//! KV blocks, sampler state, detokenizer and stop checker.

use std::time::Instant;

use tokio::sync::mpsc;

use crate::api::{EngineEvent, FinishReason, SamplingParams, StopReason, Usage};
use crate::block_manager::BlockTable;
use crate::detokenizer::IncrementalDetokenizer;
use crate::sampler::SequenceRng;
use crate::stop::StopChecker;

/// Engine-internal id of a sequence.
pub type SeqId = u64;

/// One completion being generated.
pub struct Sequence {
    pub id: SeqId,
    /// The request this sequence belongs to.
    pub group: u64,
    /// Index among the request's `n` choices.
    pub choice: usize,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose K/V are in the cache (prefix-cache hits included).
    pub num_computed: usize,
    /// KV blocks; `None` while waiting or after preemption.
    pub table: Option<BlockTable>,
    pub rng: SequenceRng,
    pub detokenizer: IncrementalDetokenizer,
    pub stop: StopChecker,
    /// Order of admission to the running set; the most recent is preempted first.
    pub admitted_at: u64,
    pub finished: Option<(FinishReason, Option<StopReason>)>,
}

impl Sequence {
    pub fn num_output(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    pub fn output_ids(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Tokens still to run through the model before the next token can be sampled.
    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }
}

/// One request: its settings, channel back to the caller, and accounting across its choices.
pub struct RequestGroup {
    pub request_id: String,
    pub params: SamplingParams,
    pub events: mpsc::UnboundedSender<EngineEvent>,
    pub prompt: Vec<u32>,
    /// Largest `max_tokens` that still fits the context.
    pub max_tokens: usize,
    /// Seed for unseeded requests' RNGs, fixed at arrival.
    pub fallback_seed: u64,
    /// Choices not yet created (n > 1 children are forked after the prompt's prefill).
    pub pending_children: bool,
    pub num_live: usize,
    pub usage: Usage,
    pub arrived: Instant,
    pub first_scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
}
