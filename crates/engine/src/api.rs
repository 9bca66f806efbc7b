//! The engine's public request/response types: what a front end (HTTP server, `spindle
//! generate`, tests) hands to the engine thread and what it gets back. They carry no HTTP or
//! OpenAI wire details; the server maps them to the protocol.

use std::fmt;
use std::sync::Arc;

use spindle_model::ModelError;
use spindle_structured::{Constraint, StructuredError};

use crate::detokenizer::DetokenizeError;
pub use crate::scheduler::{SchedulingPolicy, Urgency};

/// Per-request generation settings with vLLM semantics. The server validates ranges before a
/// request gets here; the engine still clamps defensively and never panics on odd values.
/// The length bound is resolved against the prompt by [`GenerateRequest::new`].
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
    /// Most tokens to generate as asked; `None` fills the context (vLLM's `max_tokens=None`).
    /// [`GenerateRequest::max_tokens`] is the bound the engine applies.
    pub max_tokens: Option<usize>,
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
    /// `Some(k)`: the logprob of every prompt token after the first, with its rank and the top
    /// `k` alternatives, sent once as [`EngineEvent::PromptLogprobs`] before the first delta
    /// (raw log-softmax of the model's logits, as vLLM reports them). Such a request reads
    /// nothing from the prefix cache: cached positions have no logits.
    pub prompt_logprobs: Option<usize>,
    /// When not empty, only these token ids may be sampled (vLLM's `allowed_token_ids`).
    pub allowed_token_ids: Vec<u32>,
    /// Token sequences that may not appear in the output (vLLM's `bad_words`, tokenized): the
    /// last token of each is masked whenever the output so far ends with the others.
    pub bad_words: Vec<Vec<u32>>,
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
            max_tokens: Some(16),
            min_tokens: 0,
            ignore_eos: false,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            logprobs: None,
            prompt_logprobs: None,
            allowed_token_ids: Vec::new(),
            bad_words: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of up to `max_tokens` tokens: what tests and `spindle generate` use.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            max_tokens: Some(max_tokens),
            ..Self::default()
        }
    }
}

/// What the model imposes on every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelLimits {
    /// Token ids must be below this.
    pub vocab_size: usize,
    /// Prompt plus output may not exceed this.
    pub max_model_len: usize,
}

/// The KV-cache settings the engine actually uses (after sizing), for metrics such as
/// `vllm:cache_config_info` and for routers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the cache.
    pub num_blocks: usize,
    pub enable_prefix_caching: bool,
}

/// What the loaded model serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// A decoder: completions and chat.
    Generate,
    /// An embedding model (an encoder with pooling): `/v1/embeddings`, rerank, score.
    Embed {
        /// Length of every vector.
        dimensions: usize,
    },
}

/// Why a request cannot run on this model, with the numbers a client needs to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {id} is out of range for a vocabulary of {vocab_size}")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    #[error("n must be at least 1")]
    ZeroChoices,
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    /// The prompt alone fills the context (no `max_tokens` was asked for).
    #[error("the prompt has {prompt_tokens} tokens, the model's context is {max_model_len}")]
    PromptTooLong {
        prompt_tokens: usize,
        max_model_len: usize,
    },
    /// An embedding request without any input.
    #[error("the input is empty")]
    NoInputs,
    /// Input `index` of an embedding request has no tokens.
    #[error("input {index} is empty")]
    EmptyInput { index: usize },
    /// Input `index` of an embedding request is longer than the model takes.
    #[error("input {index} has {tokens} tokens, more than the model's limit of {max_model_len}")]
    InputTooLong {
        index: usize,
        tokens: usize,
        max_model_len: usize,
    },
    /// The prompt plus the asked `max_tokens` exceed the context.
    #[error("{prompt_tokens} prompt tokens plus max_tokens {max_tokens} exceed the model's context of {max_model_len}")]
    ContextExceeded {
        prompt_tokens: usize,
        max_tokens: usize,
        max_model_len: usize,
    },
}

/// One request for the engine, tokenized and checked against the model's limits. It can only be
/// built by [`GenerateRequest::new`], so the engine trusts it without validating again.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    request_id: String,
    prompt_token_ids: Vec<u32>,
    params: SamplingParams,
    max_tokens: usize,
    constraint: Option<Constraint>,
    urgency: Urgency,
    cache_salt: Option<Arc<str>>,
}

impl GenerateRequest {
    /// Check `prompt_token_ids` and `params` against `limits` and fix the length bound:
    /// `params.max_tokens` if the context holds it, else an error; `None` fills the context.
    /// `min_tokens` is capped at the bound. `request_id` is the caller's (logs and traces).
    pub fn new(
        request_id: impl Into<String>,
        prompt_token_ids: Vec<u32>,
        mut params: SamplingParams,
        limits: ModelLimits,
    ) -> Result<Self, RequestError> {
        let prompt_tokens = prompt_token_ids.len();
        let max_model_len = limits.max_model_len;
        if prompt_tokens == 0 {
            return Err(RequestError::EmptyPrompt);
        }
        if let Some(&id) = prompt_token_ids
            .iter()
            .find(|&&t| t as usize >= limits.vocab_size)
        {
            return Err(RequestError::TokenOutOfRange {
                id,
                vocab_size: limits.vocab_size,
            });
        }
        if params.n == 0 {
            return Err(RequestError::ZeroChoices);
        }
        let max_tokens = match params.max_tokens {
            Some(0) => return Err(RequestError::ZeroMaxTokens),
            Some(m) if prompt_tokens.saturating_add(m) > max_model_len => {
                return Err(RequestError::ContextExceeded {
                    prompt_tokens,
                    max_tokens: m,
                    max_model_len,
                })
            }
            Some(m) => m,
            None if prompt_tokens >= max_model_len => {
                return Err(RequestError::PromptTooLong {
                    prompt_tokens,
                    max_model_len,
                })
            }
            None => max_model_len - prompt_tokens,
        };
        params.min_tokens = params.min_tokens.min(max_tokens);
        Ok(Self {
            request_id: request_id.into(),
            prompt_token_ids,
            params,
            max_tokens,
            constraint: None,
            urgency: Urgency::default(),
            cache_salt: None,
        })
    }

    /// Keep this request's prefix-cache entries apart from every request with another salt
    /// (vLLM's `cache_salt`): it hits only blocks computed under the same salt, so one tenant
    /// cannot learn from timing what another's prompts were.
    pub fn with_cache_salt(mut self, salt: impl Into<Arc<str>>) -> Self {
        self.cache_salt = Some(salt.into());
        self
    }

    /// The prefix-cache namespace (`None`: the shared one).
    pub fn cache_salt(&self) -> Option<&str> {
        self.cache_salt.as_deref()
    }

    /// Constrain the output (structured outputs): every sampled token must be allowed by
    /// `constraint`, and the sequence stops once the constrained output is complete. Compile
    /// it off the engine thread (`spindle_structured::GrammarCompiler`).
    pub fn with_constraint(mut self, constraint: Constraint) -> Self {
        self.constraint = Some(constraint);
        self
    }

    /// Serve this request at `priority` (lower first, vLLM's convention; used under the
    /// priority scheduling policy).
    pub fn with_priority(mut self, priority: i32) -> Self {
        self.urgency.priority = priority;
        self
    }

    /// Mark this request as background work (a batch-job line): it runs only on capacity no
    /// interactive request wants, and interactive requests may preempt it.
    pub fn in_background(mut self) -> Self {
        self.urgency.background = true;
        self
    }

    /// How urgent the request is (its priority and whether it is background work).
    pub fn urgency(&self) -> Urgency {
        self.urgency
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    pub fn prompt_token_ids(&self) -> &[u32] {
        &self.prompt_token_ids
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Most tokens each choice generates: at least 1, and prompt + bound fit the context.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub(crate) fn into_parts(
        self,
    ) -> (String, Vec<u32>, SamplingParams, usize, Option<Constraint>) {
        (
            self.request_id,
            self.prompt_token_ids,
            self.params,
            self.max_tokens,
            self.constraint,
        )
    }
}

/// One embedding request: token inputs checked against the model's limits. Built only by
/// [`EmbedRequest::new`], so the engine trusts it.
#[derive(Debug, Clone)]
pub struct EmbedRequest {
    request_id: String,
    inputs: Vec<Vec<u32>>,
}

impl EmbedRequest {
    /// Check every input: at least one, none empty, ids in the vocabulary, none longer than the
    /// model's limit (truncation, if wanted, happens before).
    pub fn new(
        request_id: impl Into<String>,
        inputs: Vec<Vec<u32>>,
        limits: ModelLimits,
    ) -> Result<Self, RequestError> {
        if inputs.is_empty() {
            return Err(RequestError::NoInputs);
        }
        for (index, ids) in inputs.iter().enumerate() {
            if ids.is_empty() {
                return Err(RequestError::EmptyInput { index });
            }
            if ids.len() > limits.max_model_len {
                return Err(RequestError::InputTooLong {
                    index,
                    tokens: ids.len(),
                    max_model_len: limits.max_model_len,
                });
            }
            if let Some(&id) = ids.iter().find(|&&t| t as usize >= limits.vocab_size) {
                return Err(RequestError::TokenOutOfRange {
                    id,
                    vocab_size: limits.vocab_size,
                });
            }
        }
        Ok(Self {
            request_id: request_id.into(),
            inputs,
        })
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    pub fn inputs(&self) -> &[Vec<u32>] {
        &self.inputs
    }

    /// Tokens over all inputs.
    pub fn num_tokens(&self) -> usize {
        self.inputs.iter().map(Vec::len).sum()
    }

    pub(crate) fn into_parts(self) -> (String, Vec<Vec<u32>>) {
        (self.request_id, self.inputs)
    }
}

/// Why a sequence ended, spelled as OpenAI/vLLM report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// `max_tokens` or the model's context length.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
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

/// One prompt token's log-probability (see [`SamplingParams::prompt_logprobs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTokenLogprob {
    /// The prompt token and its logprob given the tokens before it.
    pub token: TokenLogprob,
    /// 1 + the number of tokens the model found strictly more likely there.
    pub rank: usize,
    /// Most likely first.
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

/// Events on a request's private channel, in order: `PromptLogprobs` if asked for, any number of `Delta`s (generation) or one
/// `Embeddings` (embedding), then exactly one of `Finished` or `Error`.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// The prompt's logprobs, one entry per prompt token (the first is `None`: nothing precedes
    /// it); sent once, before the first `Delta`, when `prompt_logprobs` was asked for.
    PromptLogprobs(Vec<Option<PromptTokenLogprob>>),
    Delta(ChoiceDelta),
    /// One vector per input, in input order.
    Embeddings(Vec<Vec<f32>>),
    Finished {
        usage: Usage,
        timings: RequestTimings,
    },
    Error(EngineError),
}

/// Why a row could not be sampled; the engine aborts the affected sequence with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SamplerError {
    /// The model returned a zero-width row.
    #[error("the logits row is empty")]
    EmptyLogits,
    /// Every logit is NaN or −inf: the forward pass produced garbage.
    #[error("every logit is NaN or -inf")]
    NoUsableLogits,
}

/// Errors the engine reports to a caller. Cloneable, since one failure can end several
/// requests (a failed batch, a dead engine); sources are shared.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The request does not fit the model (prompt longer than the context, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(#[from] RequestError),
    /// The waiting queue is at `--max-waiting-requests`.
    #[error("the server is overloaded: {0} requests are waiting")]
    QueueFull(usize),
    /// The engine thread is gone (panicked, failed, hung, or shut down).
    #[error("the engine is not running: {0}")]
    EngineDead(String),
    /// The model could not be loaded (missing file, bad config, unsupported tensors, ...).
    #[error("loading the model failed: {0}")]
    Load(Arc<ModelError>),
    /// The KV cache cannot hold one sequence of the model's full context.
    #[error(
        "the KV cache holds {capacity_tokens} tokens ({num_blocks} blocks of {block_size}), less than the {needed_tokens} one sequence needs (max_model_len {max_model_len}): \
         raise --kv-cache-memory / --gpu-memory-utilization (each block needs {block_kib} KiB) or lower --max-model-len"
    )]
    KvCacheTooSmall {
        capacity_tokens: usize,
        num_blocks: usize,
        block_size: usize,
        /// `max_model_len`, or for a model whose every layer slides, its window plus a step.
        needed_tokens: usize,
        max_model_len: usize,
        block_kib: usize,
    },
    /// The KV cache could not be allocated or sized.
    #[error("setting up the KV cache failed: {0}")]
    KvCacheSetup(Arc<ModelError>),
    /// The profiling pass that sizes the GPU cache failed.
    #[error("the profiling forward pass ({tokens} tokens) failed: {source}; lower --max-num-batched-tokens")]
    ProfilingPass {
        tokens: usize,
        source: Arc<ModelError>,
    },
    /// The request asks for something this model does not do (generation from an embedding
    /// model, or embeddings from a decoder).
    #[error("{0}")]
    WrongModelKind(&'static str),
    /// The engine thread could not be started.
    #[error("cannot start the engine thread: {0}")]
    Spawn(String),
    /// The model's forward pass (or a cache operation) failed.
    #[error("model execution failed: {0}")]
    Model(Arc<ModelError>),
    /// A logits row could not be sampled.
    #[error("sampling failed: {0}")]
    Sampler(#[from] SamplerError),
    /// A structured-output constraint failed while decoding (it admits no continuation).
    #[error("structured output: {0}")]
    Constraint(#[from] StructuredError),
    /// A generated token could not be turned into text.
    #[error("detokenization failed: {0}")]
    Detokenize(#[from] DetokenizeError),
    /// The scheduler handed the runner a sequence position it has no token or slot for (a bug).
    #[error("sequence {seq} has no token or cache slot for position {position}")]
    SchedulerMismatch { seq: u64, position: usize },
    /// The draft model of `--speculative-config` cannot be used.
    #[error("{0}")]
    DraftModel(Arc<crate::spec::DraftModelError>),
    /// A test asked the engine to fail ([`crate::FaultInjection`]).
    #[error("injected fault: {0}")]
    InjectedFault(&'static str),
}

impl EngineError {
    /// Wrap a model error from a forward pass or cache operation.
    pub fn model(e: ModelError) -> Self {
        Self::Model(Arc::new(e))
    }

    /// Wrap a model error from loading.
    pub fn load(e: ModelError) -> Self {
        Self::Load(Arc::new(e))
    }
}
