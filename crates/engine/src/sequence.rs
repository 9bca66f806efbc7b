//! The output processor's bookkeeping for requests and their sequences. A request
//! (`RequestGroup`) owns its event channel and `n` sequences (choices); a `SeqOutput` is what a
//! sequence needs to turn tokens into text: its sampler RNG, detokenizer and stop checker. Tokens
//! and KV blocks live in the scheduler's [`crate::scheduler::SeqState`].

use std::time::Instant;

use tokio::sync::mpsc;

use crate::api::{EngineEvent, PromptTokenLogprob, SamplingParams, Usage};
use crate::detokenizer::IncrementalDetokenizer;
use crate::sampler::SequenceRng;
use crate::scheduler::SeqId;
use crate::stop::StopChecker;
use spindle_structured::Constraint;

/// One sequence's output state.
pub struct SeqOutput {
    /// The request this sequence belongs to.
    pub group: u64,
    /// Index among the request's `n` choices.
    pub choice: usize,
    pub rng: SequenceRng,
    pub detokenizer: IncrementalDetokenizer,
    pub stop: StopChecker,
    /// Structured-output state: masks this sequence's logits and follows its tokens.
    pub constraint: Option<Constraint>,
}

impl SeqOutput {
    pub fn new(
        group: u64,
        choice: usize,
        prompt: &[u32],
        params: &SamplingParams,
        fallback_seed: u64,
        constraint: Option<Constraint>,
    ) -> Self {
        Self {
            group,
            choice,
            rng: SequenceRng::new(params.seed, choice, fallback_seed),
            detokenizer: IncrementalDetokenizer::new(prompt, params.skip_special_tokens),
            stop: StopChecker::new(&params.stop, params.include_stop_str_in_output),
            constraint,
        }
    }
}

/// One request: its settings, channel back to the caller, and accounting across its choices.
pub struct RequestGroup {
    pub request_id: String,
    pub params: SamplingParams,
    pub events: mpsc::UnboundedSender<EngineEvent>,
    /// The length bound of every choice (resolved by `GenerateRequest::new`).
    pub max_tokens: usize,
    /// The first choice; the others are forked from it after the prompt's prefill.
    pub first_seq: SeqId,
    /// The constraint's initial state, for the choices forked later.
    pub constraint: Option<Constraint>,
    /// Seed for unseeded requests' RNGs, fixed at arrival.
    pub fallback_seed: u64,
    /// Choices not yet created (n > 1 children are forked after the prompt's prefill).
    pub pending_children: bool,
    pub num_live: usize,
    /// Prompt logprobs gathered so far (while asked for and not yet sent).
    pub prompt_logprobs: Option<Vec<Option<PromptTokenLogprob>>>,
    pub usage: Usage,
    pub arrived: Instant,
    pub first_scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
}
