//! What one stage of a step hands to the next, as plain data (vLLM V1's `ModelRunnerOutput`
//! and `EngineCoreOutput`): the runner's sampled tokens go to the scheduler's
//! `update_from_output`, whose per-sequence updates go to the output processor. No stage calls
//! back into an earlier one.

use crate::api::{EngineError, PromptTokenLogprob, StepLogprobs, StopReason};
use crate::scheduler::SeqId;

/// What the runner sampled for one sequence this step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampledSeq {
    pub id: SeqId,
    /// The accepted draft tokens followed by one token sampled by the target (at least one).
    pub tokens: Vec<u32>,
    /// One entry per token when logprobs were asked for, else empty.
    pub logprobs: Vec<StepLogprobs>,
    /// Draft tokens verified this step, and how many of them were accepted.
    pub num_draft: usize,
    pub num_accepted: usize,
    /// The structured-output constraint is complete after the last token.
    pub constraint_finished: bool,
    /// Tokens proposed for the next step (speculative decoding), verified then.
    pub next_draft: Vec<u32>,
}

/// Prompt logprobs the runner computed for positions `first_position..` of one sequence:
/// entry `i` is the logprob of prompt token `first_position + i + 1`.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprobsPart {
    pub seq: SeqId,
    pub first_position: usize,
    pub prompt_len: usize,
    pub logprobs: Vec<PromptTokenLogprob>,
}

/// The runner's result of one step.
#[derive(Debug, Default)]
pub struct RunnerOutput {
    /// Every sequence that sampled, in batch order (forked `n > 1` choices after their parent).
    pub sampled: Vec<SampledSeq>,
    pub prompt_logprobs: Vec<PromptLogprobsPart>,
    /// Sequences whose sampling failed (a constraint error, unusable logits): their requests end.
    pub failed: Vec<(SeqId, EngineError)>,
}

/// Why the scheduler ended a sequence while appending its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// EOS or a stop token id (its own reason), after `min_tokens`: the token is not shown.
    Token(Option<StopReason>),
    /// The structured output is complete.
    Complete,
    /// `max_tokens` or the context is reached.
    Length,
}

/// One sequence's new tokens after `update_from_output`, for the output processor.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqUpdate {
    pub id: SeqId,
    /// Appended tokens, cut after the one that ended the sequence.
    pub tokens: Vec<u32>,
    pub logprobs: Vec<StepLogprobs>,
    /// Set when the last token ended the sequence (its blocks are already freed).
    pub stopped: Option<Stopped>,
}
