//! The engine's public request/response types: what a front end (HTTP server, `spindle
//! generate`, tests) hands to the engine thread and what it gets back. They carry no HTTP or
//! OpenAI wire details; the server maps them to the protocol.

use std::fmt;

/// Per-request generation settings with vLLM semantics. The server validates ranges before a
/// request gets here; the engine still clamps defensively and never panics on odd values.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Number of independent completions for the prompt; children share the prompt's KV blocks.
    pub n: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 (or -1 on the wire) disables it.
    pub top_k: usize,
    /// Drop tokens whose probability is below `min_p` times the top token's; 0 disables it.
    pub min_p: f32,
    /// vLLM/HF repetition penalty (>1 discourages tokens seen in prompt or output); 1 disables it.
    pub repetition_penalty: f32,
    /// OpenAI frequency penalty applied per occurrence in the output so far.
    pub frequency_penalty: f32,
    /// OpenAI presence penalty applied once to any token already in the output.
    pub presence_penalty: f32,
    /// Additive bias per token id, applied before all other processing.
    pub logit_bias: Vec<(u32, f32)>,
    /// Seed for this request's private RNG: same seed, same output, whatever else is batched.
    pub seed: Option<u64>,
    /// Upper bound of generated tokens (the engine also stops at max-model-len).
    pub max_tokens: usize,
    /// EOS and stop token ids are ignored until this many tokens were generated.
    pub min_tokens: usize,
    /// Keep generating past EOS (benchmarks).
    pub ignore_eos: bool,
    /// Stop strings, matched across token boundaries on the detokenized output.
    pub stop: Vec<String>,
    /// Extra token ids that end the sequence (besides the model's EOS ids).
    pub stop_token_ids: Vec<u32>,
    /// Keep the matched stop string in the output text.
    pub include_stop_str_in_output: bool,
    /// Leave special tokens out of the detokenized text.
    pub skip_special_tokens: bool,
    /// `Some(k)`: return the chosen token's logprob plus the top `k` alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            n: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            max_tokens: 16,
            min_tokens: 0,
            ignore_eos: false,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of up to `max_tokens` tokens: what tests and `spindle generate` use.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            max_tokens,
            ..Self::default()
        }
    }
}

/// One request for the engine: already tokenized and validated.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Caller-chosen id, used in logs and traces (the engine assigns its own internal id).
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    pub params: SamplingParams,
}

/// Why a sequence ended, spelled as OpenAI/vLLM report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// `max_tokens` or the model's context length.
    Length,
    /// The request was aborted (client gone or engine shutting down).
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What ended a sequence with `FinishReason::Stop`, as vLLM's `stop_reason`: `None` for EOS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Text(String),
    TokenId(u32),
}

/// Log-probability of one token (natural log).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
}

/// The chosen token's logprob and the top alternatives at that step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLogprobs {
    pub chosen: TokenLogprob,
    /// Most likely first; `k` entries where `SamplingParams::logprobs == Some(k)`.
    pub top: Vec<TokenLogprob>,
}

/// Incremental output for one choice: the tokens generated since the previous event.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceDelta {
    /// Which of the `n` completions this is.
    pub index: usize,
    pub token_ids: Vec<u32>,
    /// UTF-8-safe text delta; concatenating all deltas gives the final text.
    pub text: String,
    /// One entry per token in `token_ids` when logprobs were requested.
    pub logprobs: Vec<StepLogprobs>,
    /// Set on the last delta of this choice.
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
}

/// Token accounting for a whole request (all `n` choices).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// Wall-clock phases of one request, for latency metrics (seconds).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RequestTimings {
    pub queue: f64,
    pub prefill: f64,
    pub decode: f64,
    pub time_to_first_token: f64,
    pub e2e: f64,
}

/// Events on a request's private channel, in order: any number of `Delta`s, then exactly one of
/// `Finished` or `Error`.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    Delta(ChoiceDelta),
    Finished {
        usage: Usage,
        timings: RequestTimings,
    },
    Error(EngineError),
}

/// Errors the engine reports to a caller.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    /// Rejected before scheduling (e.g. prompt longer than the model's context).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The waiting queue is at `--max-waiting-requests`.
    #[error("the server is overloaded: {0} requests are waiting")]
    QueueFull(usize),
    /// The engine thread is gone (panicked, failed, or shut down).
    #[error("the engine is not running: {0}")]
    EngineDead(String),
    /// The model's forward pass failed.
    #[error("model execution failed: {0}")]
    Execution(String),
}
