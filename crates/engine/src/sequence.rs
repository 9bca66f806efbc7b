//! The output processor's bookkeeping for requests and their sequences. A request
//! (`RequestGroup`) owns its event channel and `n` sequences (choices); a `SeqOutput` is what a
//! sequence needs to turn tokens into text: its detokenizer and stop checker. Tokens and KV
//! blocks live in the scheduler's [`crate::scheduler::SeqState`], sampling state in the runner.

use std::time::Instant;

use tokio::sync::mpsc;

use crate::api::{EngineEvent, PromptTokenLogprob, SamplingParams, Usage};
use crate::detokenizer::IncrementalDetokenizer;
use crate::stop::StopChecker;

/// One sequence's output state.
pub struct SeqOutput {
    /// The request this sequence belongs to.
    pub group: u64,
    /// Index among the request's `n` choices.
    pub choice: usize,
    pub detokenizer: IncrementalDetokenizer,
    pub stop: StopChecker,
    /// Tokens emitted so far (stop strings wait for `min_tokens`).
    pub num_output: usize,
}

impl SeqOutput {
    pub fn new(group: u64, choice: usize, prompt: &[u32], params: &SamplingParams) -> Self {
        Self {
            group,
            choice,
            detokenizer: IncrementalDetokenizer::new(prompt, params.skip_special_tokens),
            stop: StopChecker::new(&params.stop, params.include_stop_str_in_output),
            num_output: 0,
        }
    }
}

/// One request: its settings, channel back to the caller, and accounting across its choices.
pub struct RequestGroup {
    pub request_id: String,
    pub params: SamplingParams,
    pub events: mpsc::UnboundedSender<EngineEvent>,
    /// Choices not yet finished.
    pub num_live: usize,
    /// Prompt logprobs gathered so far (while asked for and not yet sent).
    pub prompt_logprobs: Option<Vec<Option<PromptTokenLogprob>>>,
    pub usage: Usage,
    pub arrived: Instant,
    pub first_scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
}
