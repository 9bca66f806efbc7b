//! Request validation: turn a parsed OpenAI request into engine [`SamplingParams`] with
//! vLLM-like range checks, so a bad value is a 400 naming the field instead of a surprise in
//! the engine. Limits are constants so they are documented in one place (see README).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::Value;
pub use spindle_engine::ModelLimits;
use spindle_engine::{GenerateRequest, RequestError, SamplingParams, SchedulingPolicy};

use crate::error::ApiError;
use crate::protocol::{ChatCompletionRequest, CommonFields, CompletionRequest};

/// Most completions per prompt (`n`).
pub const MAX_N: usize = 128;
/// Most alternatives per token (`logprobs` / `top_logprobs`), as vLLM's default `max_logprobs`.
pub const MAX_LOGPROBS: usize = 20;
/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 64;
/// Longest stop string, in bytes.
pub const MAX_STOP_STRING_BYTES: usize = 1024;
/// Most `stop_token_ids` per request.
pub const MAX_STOP_TOKEN_IDS: usize = 1024;
/// Most `logit_bias` entries per request.
pub const MAX_LOGIT_BIAS_ENTRIES: usize = 1024;
/// Most prompts in one `/v1/completions` request.
pub const MAX_PROMPTS: usize = 256;
/// `max_tokens` of a text completion that sends none (OpenAI's and vLLM's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// The outcome of validating everything that does not depend on the prompt. The prompt is
/// checked with these parameters against the model by [`build_request`], which gives the one
/// request type the engine takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    /// Engine parameters; `max_tokens` is what the client asked (or the endpoint's default),
    /// `None` filling the context.
    pub params: SamplingParams,
    /// Answer as SSE.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// `stream_options.continuous_usage_stats`.
    pub continuous_usage: bool,
    /// `response_format` / `structured_outputs`, parsed (compiled later, off the runtime).
    pub constraint: Option<crate::structured::RequestedConstraint>,
    /// Forced tool calls (`tool_choice` `required` or named); the constraint makes them valid.
    pub tools: Option<crate::tools::ToolMode>,
    /// `priority` (0 unless the priority policy is on).
    pub priority: i32,
    /// `bad_words`, tokenized with the prompt.
    pub bad_words: Vec<String>,
    /// `truncate_prompt_tokens` / `truncation_side`.
    pub truncation: Option<Truncation>,
    /// What the response carries besides the output.
    pub output: OutputFlags,
    /// `cache_salt`.
    pub cache_salt: Option<String>,
    /// `request_id`: the base of the response's id.
    pub request_id: Option<String>,
    /// Chat with `--reasoning-parser` (set once the prompt is rendered).
    pub reasoning: Option<ReasoningRequest>,
}

/// How a chat request's output is split into thinking and answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ReasoningRequest {
    pub parser: crate::reasoning::ReasoningParser,
    /// Where the prompt leaves the model.
    pub state: crate::reasoning::PromptState,
    /// `include_reasoning` (default true).
    pub include: bool,
    /// The end-of-thinking marker: constraints (structured outputs, forced tool calls) apply
    /// after it, unless the prompt already closed the thinking.
    pub end_marker: &'static str,
}

/// Request defaults from the model's `generation_config.json` (`--generation-config`) and
/// `--override-generation-config`: used for any of these a request does not set.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RequestDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// `max_new_tokens`: the default `max_tokens`, and a cap on the completions default of 16.
    pub max_tokens: Option<usize>,
}

impl RequestDefaults {
    /// Read the keys vLLM reads from a `generation_config.json` object; a key with a value out
    /// of range is an error naming it (a broken file must not silently change sampling).
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let Some(obj) = v.as_object() else {
            return Err("the generation config must be a JSON object".into());
        };
        let num = |k: &str| -> Result<Option<f64>, String> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .filter(|f| f.is_finite())
                    .map(Some)
                    .ok_or_else(|| format!("`{k}` must be a number")),
            }
        };
        let check = |k: &str, ok: fn(f64) -> bool| -> Result<Option<f64>, String> {
            match num(k)? {
                Some(x) if !ok(x) => Err(format!("`{k}` = {x} is out of range")),
                x => Ok(x),
            }
        };
        Ok(Self {
            temperature: check("temperature", |x| x >= 0.0)?.map(|x| x as f32),
            top_p: check("top_p", |x| x > 0.0 && x <= 1.0)?.map(|x| x as f32),
            top_k: check("top_k", |x| x >= -1.0 && x.fract() == 0.0)?.map(|x| {
                if x <= 0.0 {
                    0
                } else {
                    x as usize
                }
            }),
            min_p: check("min_p", |x| (0.0..=1.0).contains(&x))?.map(|x| x as f32),
            repetition_penalty: check("repetition_penalty", |x| x > 0.0)?.map(|x| x as f32),
            max_tokens: check("max_new_tokens", |x| x >= 1.0 && x.fract() == 0.0)?
                .map(|x| x as usize),
        })
    }

    /// `other`'s values on top of these.
    pub fn overridden_by(self, other: Self) -> Self {
        Self {
            temperature: other.temperature.or(self.temperature),
            top_p: other.top_p.or(self.top_p),
            top_k: other.top_k.or(self.top_k),
            min_p: other.min_p.or(self.min_p),
            repetition_penalty: other.repetition_penalty.or(self.repetition_penalty),
            max_tokens: other.max_tokens.or(self.max_tokens),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Fill what the request `c` left unset. `asked_max_tokens`: the request set
    /// `max_tokens` / `max_completion_tokens` (then its value stands).
    pub fn apply(&self, c: &CommonFields, asked_max_tokens: bool, v: &mut Validated) {
        /// The default into `slot` when the request left the field out.
        fn fill<T: Copy>(asked: bool, default: Option<T>, slot: &mut T) {
            if let (false, Some(d)) = (asked, default) {
                *slot = d;
            }
        }
        let p = &mut v.params;
        fill(
            c.temperature.is_some(),
            self.temperature,
            &mut p.temperature,
        );
        fill(c.top_p.is_some(), self.top_p, &mut p.top_p);
        fill(c.top_k.is_some(), self.top_k, &mut p.top_k);
        fill(c.min_p.is_some(), self.min_p, &mut p.min_p);
        fill(
            c.repetition_penalty.is_some(),
            self.repetition_penalty,
            &mut p.repetition_penalty,
        );
        if let (false, Some(m)) = (asked_max_tokens, self.max_tokens) {
            p.max_tokens = Some(p.max_tokens.map_or(m, |d| d.min(m)));
        }
    }
}

/// How to cut a prompt that is too long (`truncate_prompt_tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncation {
    /// Keep this many tokens (`None`: the model's context, vLLM's -1).
    pub keep: Option<usize>,
    /// Keep the first tokens (`right` truncation) instead of the last (vLLM's default, `left`).
    pub keep_first: bool,
}

impl Truncation {
    /// Cut `ids` to at most the kept number of tokens.
    pub fn apply(self, ids: &mut Vec<u32>, max_model_len: usize) {
        let keep = self.keep.unwrap_or(max_model_len);
        if ids.len() > keep {
            if self.keep_first {
                ids.truncate(keep);
            } else {
                ids.drain(..ids.len() - keep);
            }
        }
    }
}

/// Response options that do not change what the engine computes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputFlags {
    /// `echo`: the prompt (completions) or the assistant's last message (chat) comes first.
    pub echo: bool,
    /// `echo` with `max_tokens: 0`: the prompt only; the one token the engine generates is
    /// dropped (vLLM's log-likelihood scoring mode).
    pub echo_only: bool,
    /// `logprobs` of an echoed prompt (the engine's prompt logprobs, cut to this many).
    pub echo_logprobs: Option<usize>,
    /// `prompt_logprobs` as asked: the response's `prompt_logprobs` field.
    pub prompt_logprobs: Option<usize>,
    /// `return_tokens_as_token_ids`.
    pub tokens_as_ids: bool,
    /// `return_token_ids`.
    pub token_ids: bool,
}

/// Parse a JSON body into `T`. On a type error the offending top-level field is found by
/// re-parsing one field at a time (only on the error path), so `param` names it.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    parse_body(body, None)
}

/// Parse a request body of `endpoint` into `T`, after checking its fields against the
/// endpoint's contract ([`crate::fields`]): a refused field is a 400 naming it, an unknown one
/// is logged.
pub fn parse_request<T: DeserializeOwned>(
    body: &[u8],
    endpoint: crate::fields::Endpoint,
) -> Result<T, ApiError> {
    parse_body(body, Some(endpoint))
}

fn parse_body<T: DeserializeOwned>(
    body: &[u8],
    endpoint: Option<crate::fields::Endpoint>,
) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON in the request body: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object.",
        ));
    };
    if let Some(endpoint) = endpoint {
        crate::fields::check(endpoint, obj)?;
    }
    match T::deserialize(&value) {
        Ok(t) => Ok(t),
        Err(e) => {
            for (k, v) in obj {
                let mut single = serde_json::Map::new();
                single.insert(k.clone(), v.clone());
                let single = Value::Object(single);
                if let Err(field_err) = T::deserialize(&single) {
                    return Err(ApiError::invalid_param(
                        k,
                        format!("Invalid value for `{k}`: {field_err}"),
                    ));
                }
            }
            Err(ApiError::bad_request(format!("Invalid request: {e}")))
        }
    }
}

/// The served name a request addresses: absent means the first one; unknown is a 404.
pub fn resolve_model(requested: Option<&str>, served: &[String]) -> Result<String, ApiError> {
    match requested {
        None | Some("") => served
            .first()
            .cloned()
            .ok_or_else(|| ApiError::internal("no served model name configured")),
        Some(name) if served.iter().any(|s| s == name) => Ok(name.to_string()),
        Some(name) => Err(ApiError::model_not_found(name)),
    }
}

/// Validate a chat request's sampling fields.
pub fn chat_params(
    req: &ChatCompletionRequest,
    limits: ModelLimits,
    policy: SchedulingPolicy,
    tool_parser: Option<crate::tools::ToolParser>,
) -> Result<Validated, ApiError> {
    let top = match (req.logprobs, req.top_logprobs) {
        (_, Some(k)) if k < 0 || k as usize > MAX_LOGPROBS => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                format!("`top_logprobs` must be between 0 and {MAX_LOGPROBS}, got {k}."),
            ))
        }
        (Some(true), k) => Some(k.unwrap_or(0) as usize),
        (_, Some(k)) if k > 0 => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                "`logprobs` must be set to true when `top_logprobs` is used.",
            ))
        }
        _ => None,
    };
    let max_tokens = req.max_completion_tokens.or(req.common.max_tokens);
    let param = if req.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let tools = crate::tools::tool_mode(req, tool_parser)?;
    let mut v = common_params(&req.common, limits, policy, top, max_tokens, param)?;
    if let Some(spec) = tools.as_ref().and_then(|m| m.constraint()) {
        v.constraint = Some(crate::structured::RequestedConstraint {
            spec,
            param: "tools",
        });
    }
    if let Some(crate::tools::ToolMode::Auto { parser, .. }) = &tools {
        // The calls' markers are special tokens the answer must keep to be parsed.
        if parser.needs_special_tokens() {
            v.params.skip_special_tokens = false;
        }
    }
    v.tools = tools;
    Ok(v)
}

/// Validate a text-completion request's sampling fields (`suffix` and the other refused fields
/// are 400s of [`parse_request`]'s field check).
pub fn completion_params(
    req: &CompletionRequest,
    limits: ModelLimits,
    policy: SchedulingPolicy,
) -> Result<Validated, ApiError> {
    let echo = req.common.echo == Some(true);
    // `echo` with `max_tokens: 0` scores the prompt (lm-eval's log-likelihood requests): the
    // engine runs one token that the answer drops.
    let echo_only = echo && req.common.max_tokens == Some(0);
    let max_tokens = if echo_only {
        Some(1)
    } else {
        req.common.max_tokens
    };
    let top = match req.logprobs {
        None => None,
        Some(k) if k < 0 || k as usize > MAX_LOGPROBS => {
            return Err(ApiError::invalid_param(
                "logprobs",
                format!("`logprobs` must be between 0 and {MAX_LOGPROBS}, got {k}."),
            ))
        }
        Some(k) => Some(k as usize),
    };
    let mut v = common_params(&req.common, limits, policy, top, max_tokens, "max_tokens")?;
    if echo {
        v.output.echo_only = echo_only;
        v.output.echo_logprobs = top;
        if let Some(k) = top {
            let asked = v.params.prompt_logprobs.unwrap_or(0);
            v.params.prompt_logprobs = Some(asked.max(k));
        }
    }
    if v.params.max_tokens.is_none() {
        v.params.max_tokens = Some(DEFAULT_COMPLETION_MAX_TOKENS);
        // The default bounds min_tokens like an explicit max_tokens would (found by fuzzing:
        // min_tokens was silently cut to the default).
        if v.params.min_tokens > DEFAULT_COMPLETION_MAX_TOKENS {
            return Err(ApiError::invalid_param(
                "min_tokens",
                format!(
                    "`min_tokens` ({}) must be less than or equal to `max_tokens` (default {DEFAULT_COMPLETION_MAX_TOKENS}).",
                    v.params.min_tokens
                ),
            ));
        }
    }
    Ok(v)
}

/// A float field that stays finite as the engine's `f32` (found by fuzzing: 1e300 passed as a
/// finite f64 and became infinity).
fn finite(param: &str, v: f64) -> Result<f64, ApiError> {
    if v.is_finite() && (v as f32).is_finite() {
        Ok(v)
    } else {
        Err(ApiError::invalid_param(
            param,
            format!("`{param}` must be a finite number."),
        ))
    }
}

fn common_params(
    c: &CommonFields,
    limits: ModelLimits,
    policy: SchedulingPolicy,
    logprobs: Option<usize>,
    max_tokens: Option<i64>,
    max_tokens_param: &str,
) -> Result<Validated, ApiError> {
    let mut p = SamplingParams {
        logprobs,
        ..SamplingParams::default()
    };

    if let Some(n) = c.n {
        if n < 1 || n as usize > MAX_N {
            return Err(ApiError::invalid_param(
                "n",
                format!("`n` must be between 1 and {MAX_N}, got {n}."),
            ));
        }
        p.n = n as usize;
    }
    if let Some(b) = c.best_of {
        if b != p.n as i64 {
            return Err(ApiError::invalid_param(
                "best_of",
                format!("`best_of` different from `n` is not supported by this server (best_of={b}, n={}).", p.n),
            ));
        }
    }
    if let Some(t) = c.temperature {
        let t = finite("temperature", t)?;
        if t < 0.0 {
            return Err(ApiError::invalid_param(
                "temperature",
                format!("`temperature` must be >= 0, got {t}."),
            ));
        }
        p.temperature = t as f32;
    }
    if let Some(t) = c.top_p {
        let t = finite("top_p", t)?;
        if (t as f32) <= 0.0 || t > 1.0 {
            return Err(ApiError::invalid_param(
                "top_p",
                format!("`top_p` must be in (0, 1], got {t}."),
            ));
        }
        p.top_p = t as f32;
    }
    if let Some(k) = c.top_k {
        if k < -1 {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("`top_k` must be -1 (disabled) or at least 1, got {k}."),
            ));
        }
        p.top_k = if k <= 0 { 0 } else { k as usize };
    }
    if let Some(m) = c.min_p {
        let m = finite("min_p", m)?;
        if !(0.0..=1.0).contains(&m) {
            return Err(ApiError::invalid_param(
                "min_p",
                format!("`min_p` must be in [0, 1], got {m}."),
            ));
        }
        p.min_p = m as f32;
    }
    if let Some(r) = c.repetition_penalty {
        let r = finite("repetition_penalty", r)?;
        if (r as f32) <= 0.0 {
            return Err(ApiError::invalid_param(
                "repetition_penalty",
                format!("`repetition_penalty` must be > 0, got {r}."),
            ));
        }
        p.repetition_penalty = r as f32;
    }
    for (name, value, slot) in [
        (
            "frequency_penalty",
            c.frequency_penalty,
            &mut p.frequency_penalty,
        ),
        (
            "presence_penalty",
            c.presence_penalty,
            &mut p.presence_penalty,
        ),
    ] {
        if let Some(v) = value {
            let v = finite(name, v)?;
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::invalid_param(
                    name,
                    format!("`{name}` must be in [-2, 2], got {v}."),
                ));
            }
            *slot = v as f32;
        }
    }
    let requested_max_tokens = match max_tokens {
        None => None,
        Some(0) if c.echo == Some(true) => {
            return Err(ApiError::invalid_param(
                max_tokens_param,
                format!(
                    "`{max_tokens_param}: 0` with `echo` is only available on /v1/completions."
                ),
            ))
        }
        Some(m) if m < 1 => {
            return Err(ApiError::invalid_param(
                max_tokens_param,
                format!("`{max_tokens_param}` must be at least 1, got {m}."),
            ))
        }
        Some(m) => Some(m as usize),
    };
    if let Some(m) = c.min_tokens {
        if m < 0 {
            return Err(ApiError::invalid_param(
                "min_tokens",
                format!("`min_tokens` must be >= 0, got {m}."),
            ));
        }
        if let Some(max) = requested_max_tokens {
            if m as usize > max {
                return Err(ApiError::invalid_param(
                    "min_tokens",
                    format!("`min_tokens` ({m}) must be less than or equal to `{max_tokens_param}` ({max})."),
                ));
            }
        }
        p.min_tokens = m as usize;
    }
    p.stop = parse_stop(c.stop.as_ref())?;
    if let Some(ids) = &c.stop_token_ids {
        if ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(ApiError::invalid_param(
                "stop_token_ids",
                format!("At most {MAX_STOP_TOKEN_IDS} `stop_token_ids` are allowed."),
            ));
        }
        p.stop_token_ids = ids
            .iter()
            .map(|&id| token_id("stop_token_ids", id, limits.vocab_size))
            .collect::<Result<_, _>>()?;
    }
    if let Some(seed) = &c.seed {
        p.seed = Some(match (seed.as_u64(), seed.as_i64()) {
            (Some(u), _) => u,
            (None, Some(i)) => i as u64,
            _ => {
                return Err(ApiError::invalid_param(
                    "seed",
                    "`seed` must be an integer.",
                ))
            }
        });
    }
    if let Some(bias) = &c.logit_bias {
        p.logit_bias = parse_logit_bias(bias, limits.vocab_size)?;
    }
    if let Some(b) = c.ignore_eos {
        p.ignore_eos = b;
    }
    if let Some(b) = c.skip_special_tokens {
        p.skip_special_tokens = b;
    }
    if let Some(b) = c.include_stop_str_in_output {
        p.include_stop_str_in_output = b;
    }
    let stream = c.stream.unwrap_or(false);
    let (include_usage, continuous_usage) = match &c.stream_options {
        None => (false, false),
        Some(_) if !stream => {
            return Err(ApiError::invalid_param(
                "stream_options",
                "`stream_options` can only be set when `stream` is true.",
            ))
        }
        Some(o) => (
            o.include_usage.unwrap_or(false),
            o.continuous_usage_stats.unwrap_or(false),
        ),
    };
    p.max_tokens = requested_max_tokens;
    let prompt_logprobs = match c.prompt_logprobs {
        None => None,
        Some(k) if k < 0 || k as usize > MAX_LOGPROBS => {
            return Err(ApiError::invalid_param(
                "prompt_logprobs",
                format!("`prompt_logprobs` must be between 0 and {MAX_LOGPROBS}, got {k}."),
            ))
        }
        Some(k) => Some(k as usize),
    };
    p.prompt_logprobs = prompt_logprobs;
    if let Some(ids) = &c.allowed_token_ids {
        if ids.is_empty() {
            return Err(ApiError::invalid_param(
                "allowed_token_ids",
                "`allowed_token_ids` must not be empty.",
            ));
        }
        p.allowed_token_ids = ids
            .iter()
            .map(|&id| token_id("allowed_token_ids", id, limits.vocab_size))
            .collect::<Result<_, _>>()?;
    }
    let constraint = crate::structured::constraint_spec(c)?;
    Ok(Validated {
        params: p,
        stream,
        include_usage,
        continuous_usage,
        constraint,
        tools: None,
        priority: priority(c.priority, policy)?,
        bad_words: parse_bad_words(c.bad_words.as_ref())?,
        truncation: truncation(c.truncate_prompt_tokens, c.truncation_side.as_deref())?,
        output: OutputFlags {
            echo: c.echo == Some(true),
            prompt_logprobs,
            tokens_as_ids: c.return_tokens_as_token_ids == Some(true),
            token_ids: c.return_token_ids == Some(true),
            ..OutputFlags::default()
        },
        cache_salt: cache_salt(c.cache_salt.as_deref())?,
        request_id: request_id(c.request_id.as_deref(), "request_id")?,
        reasoning: None,
    })
}

/// Most `bad_words` per request, and the longest one in bytes.
pub const MAX_BAD_WORDS: usize = 128;
pub const MAX_BAD_WORD_BYTES: usize = 1024;

fn parse_bad_words(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = |m: String| ApiError::invalid_param("bad_words", m);
    let words: Vec<String> = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|w| w.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("`bad_words` must be a string or a list of strings.".into()))?,
        Some(_) => {
            return Err(bad(
                "`bad_words` must be a string or a list of strings.".into()
            ))
        }
    };
    if words.len() > MAX_BAD_WORDS {
        return Err(bad(format!(
            "At most {MAX_BAD_WORDS} `bad_words` are allowed."
        )));
    }
    if words
        .iter()
        .any(|w| w.trim().is_empty() || w.len() > MAX_BAD_WORD_BYTES)
    {
        return Err(bad(format!(
            "Every bad word must be non-blank and at most {MAX_BAD_WORD_BYTES} bytes."
        )));
    }
    Ok(words)
}

fn truncation(keep: Option<i64>, side: Option<&str>) -> Result<Option<Truncation>, ApiError> {
    let keep_first = match side {
        None | Some("left") => false,
        Some("right") => true,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "truncation_side",
                format!("`truncation_side` must be `left` or `right`, got `{other}`."),
            ))
        }
    };
    match keep {
        None => Ok(None),
        Some(-1) => Ok(Some(Truncation {
            keep: None,
            keep_first,
        })),
        Some(k) if k >= 1 => Ok(Some(Truncation {
            keep: Some(usize::try_from(k).unwrap_or(usize::MAX)),
            keep_first,
        })),
        Some(k) => Err(ApiError::invalid_param(
            "truncate_prompt_tokens",
            format!("`truncate_prompt_tokens` must be -1 or at least 1, got {k}."),
        )),
    }
}

/// Longest `cache_salt` (vLLM's bound).
pub const MAX_CACHE_SALT_CHARS: usize = 1024;

fn cache_salt(salt: Option<&str>) -> Result<Option<String>, ApiError> {
    match salt {
        None => Ok(None),
        Some(s) if s.is_empty() || s.chars().count() > MAX_CACHE_SALT_CHARS => {
            Err(ApiError::invalid_param(
                "cache_salt",
                format!("`cache_salt` must be 1 to {MAX_CACHE_SALT_CHARS} characters."),
            ))
        }
        Some(s) => Ok(Some(s.to_string())),
    }
}

/// Longest caller-chosen request id (body `request_id` or `X-Request-Id`).
pub const MAX_REQUEST_ID_CHARS: usize = 256;

/// A caller-chosen request id: printable ASCII without spaces, at most
/// [`MAX_REQUEST_ID_CHARS`], so it is safe in ids, logs and headers.
pub fn request_id(id: Option<&str>, param: &str) -> Result<Option<String>, ApiError> {
    match id {
        None => Ok(None),
        Some(s)
            if s.is_empty()
                || s.len() > MAX_REQUEST_ID_CHARS
                || !s.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Err(ApiError::invalid_param(
                param,
                format!("`{param}` must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters without spaces."),
            ))
        }
        Some(s) => Ok(Some(s.to_string())),
    }
}

/// `priority`: any 32-bit integer under the priority policy; under FCFS only 0, as in vLLM
/// (a silently ignored priority would hide a misconfigured server).
fn priority(value: Option<i64>, policy: SchedulingPolicy) -> Result<i32, ApiError> {
    let Some(v) = value else { return Ok(0) };
    let v = i32::try_from(v).map_err(|_| {
        ApiError::invalid_param(
            "priority",
            format!("`priority` must be a 32-bit integer, got {v}."),
        )
    })?;
    if v != 0 && policy != SchedulingPolicy::Priority {
        return Err(ApiError::invalid_param(
            "priority",
            format!("Got priority {v} but priority scheduling is not enabled; start the server with --scheduling-policy priority."),
        ));
    }
    Ok(v)
}

fn token_id(param: &str, id: i64, vocab: usize) -> Result<u32, ApiError> {
    if id < 0 || id as u64 >= vocab as u64 {
        return Err(ApiError::invalid_param(
            param,
            format!("Token id {id} in `{param}` is out of range for a vocabulary of {vocab}."),
        ));
    }
    Ok(id as u32)
}

fn parse_stop(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let list: Vec<String> = match stop {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => out.push(s.clone()),
                    _ => {
                        return Err(ApiError::invalid_param(
                            "stop",
                            "`stop` must be a string or a list of strings.",
                        ))
                    }
                }
            }
            out
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                "stop",
                "`stop` must be a string or a list of strings.",
            ))
        }
    };
    if list.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid_param(
            "stop",
            format!("At most {MAX_STOP_STRINGS} stop strings are allowed."),
        ));
    }
    if let Some(s) = list.iter().find(|s| s.len() > MAX_STOP_STRING_BYTES) {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "Stop strings must be at most {MAX_STOP_STRING_BYTES} bytes (got {}).",
                s.len()
            ),
        ));
    }
    // An empty stop string can never be meant: drop it rather than stop at once.
    Ok(list.into_iter().filter(|s| !s.is_empty()).collect())
}

fn parse_logit_bias(
    bias: &BTreeMap<String, f64>,
    vocab: usize,
) -> Result<Vec<(u32, f32)>, ApiError> {
    if bias.len() > MAX_LOGIT_BIAS_ENTRIES {
        return Err(ApiError::invalid_param(
            "logit_bias",
            format!("At most {MAX_LOGIT_BIAS_ENTRIES} `logit_bias` entries are allowed."),
        ));
    }
    let mut out = Vec::with_capacity(bias.len());
    for (key, &value) in bias {
        let Ok(id) = key.trim().parse::<i64>() else {
            return Err(ApiError::invalid_param(
                "logit_bias",
                format!("`logit_bias` keys must be token ids, got {key:?}."),
            ));
        };
        let id = token_id("logit_bias", id, vocab)?;
        if !value.is_finite() || !(-100.0..=100.0).contains(&value) {
            return Err(ApiError::invalid_param(
                "logit_bias",
                format!("`logit_bias` values must be in [-100, 100], got {value} for token {id}."),
            ));
        }
        out.push((id, value as f32));
    }
    Ok(out)
}

/// One prompt of a text completion.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Text, tokenized by the server.
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// `prompt` as a string, a list of strings, a list of token ids, or a list of token-id lists.
pub fn parse_prompt(prompt: Option<&Value>, vocab: usize) -> Result<Vec<PromptInput>, ApiError> {
    parse_text_or_tokens(prompt, "prompt", "prompts", vocab, MAX_PROMPTS)
}

/// A field (`param`) holding a string, a list of strings, a list of token ids, or a list of
/// token-id lists, as `/v1/completions`' `prompt` and `/v1/embeddings`' `input` do: at least
/// one item, at most `max_items` (`noun` names them in the error), no empty token list, ids
/// below `vocab`.
pub fn parse_text_or_tokens(
    value: Option<&Value>,
    param: &str,
    noun: &str,
    vocab: usize,
    max_items: usize,
) -> Result<Vec<PromptInput>, ApiError> {
    let bad = || {
        ApiError::invalid_param(
            param,
            format!("`{param}` must be a string, a list of strings, a list of token ids, or a list of token-id lists."),
        )
    };
    let empty = || ApiError::invalid_param(param, format!("`{param}` must not be empty."));
    let ids = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        if items.is_empty() {
            return Err(empty());
        }
        items
            .iter()
            .map(|v| {
                v.as_i64()
                    .ok_or_else(bad)
                    .and_then(|id| token_id(param, id, vocab))
            })
            .collect()
    };
    let items = match value {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                param,
                format!("`{param}` is required."),
            ))
        }
        Some(Value::String(s)) => vec![PromptInput::Text(s.clone())],
        Some(Value::Array(items)) if items.is_empty() => return Err(empty()),
        Some(Value::Array(items)) => match &items[0] {
            Value::String(_) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(|s| PromptInput::Text(s.to_string()))
                        .ok_or_else(bad)
                })
                .collect::<Result<_, _>>()?,
            Value::Number(_) => vec![PromptInput::Tokens(ids(items)?)],
            Value::Array(_) => items
                .iter()
                .map(|v| {
                    v.as_array()
                        .ok_or_else(bad)
                        .and_then(|a| ids(a))
                        .map(PromptInput::Tokens)
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(bad()),
        },
        Some(_) => return Err(bad()),
    };
    if items.len() > max_items {
        return Err(ApiError::invalid_param(
            param,
            format!("At most {max_items} {noun} per request."),
        ));
    }
    Ok(items)
}

/// Check a tokenized prompt with the validated parameters against the model and build the
/// engine's request: an empty prompt, an unknown token id, or a prompt and `max_tokens` over the
/// context are a 400 stating the numbers (vLLM's wording). `prompt_word` is "messages" for chat,
/// "prompt" for completions.
pub fn build_request(
    request_id: String,
    prompt_ids: Vec<u32>,
    params: &SamplingParams,
    limits: ModelLimits,
    prompt_word: &str,
) -> Result<GenerateRequest, ApiError> {
    GenerateRequest::new(request_id, prompt_ids, params.clone(), limits)
        .map_err(|e| request_error(e, prompt_word))
}

fn request_error(e: RequestError, prompt_word: &str) -> ApiError {
    let max_model_len = |m: usize| format!("This model's maximum context length is {m} tokens.");
    match e {
        RequestError::EmptyPrompt => {
            ApiError::invalid_param("prompt", "The prompt is empty after tokenization.")
        }
        RequestError::TokenOutOfRange { id, vocab_size } => ApiError::invalid_param(
            "prompt",
            format!("Token id {id} is out of range for a vocabulary of {vocab_size}."),
        ),
        RequestError::ContextExceeded {
            prompt_tokens,
            max_tokens,
            max_model_len: m,
        } => ApiError::invalid_param(
            if prompt_word == "messages" { "messages" } else { "prompt" },
            format!(
                "{} However, you requested {} tokens ({prompt_tokens} in the {prompt_word}, {max_tokens} in the completion). Please reduce the length of the {prompt_word} or completion.",
                max_model_len(m),
                prompt_tokens + max_tokens
            ),
        ),
        RequestError::PromptTooLong {
            prompt_tokens,
            max_model_len: m,
        } => ApiError::invalid_param(
            prompt_word,
            format!(
                "{} However, your request has {prompt_tokens} input tokens. Please reduce the length of the input {prompt_word}.",
                max_model_len(m)
            ),
        ),
        RequestError::ZeroChoices => ApiError::invalid_param("n", "`n` must be at least 1."),
        RequestError::ZeroMaxTokens => {
            ApiError::invalid_param("max_tokens", "`max_tokens` must be at least 1.")
        }
        // Embedding-request errors; generation requests never produce them.
        e @ (RequestError::NoInputs
        | RequestError::EmptyInput { .. }
        | RequestError::InputTooLong { .. }) => ApiError::invalid_param("prompt", e.to_string()),
    }
}

/// Tokenize request's `tokens` for `/detokenize`.
pub fn detokenize_ids(tokens: Option<&[i64]>, vocab: usize) -> Result<Vec<u32>, ApiError> {
    let Some(tokens) = tokens else {
        return Err(ApiError::invalid_param("tokens", "`tokens` is required."));
    };
    tokens
        .iter()
        .map(|&t| token_id("tokens", t, vocab))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::StatusCode;
    use serde_json::json;

    const LIMITS: ModelLimits = ModelLimits {
        vocab_size: 1000,
        max_model_len: 100,
    };
    const LIMITS_10: ModelLimits = ModelLimits {
        vocab_size: 10,
        max_model_len: 100,
    };

    fn chat(body: Value) -> Result<Validated, ApiError> {
        let req: ChatCompletionRequest = parse_json(body.to_string().as_bytes())?;
        chat_params(&req, LIMITS, SchedulingPolicy::Fcfs, None)
    }

    fn completion(body: Value) -> Result<Validated, ApiError> {
        let req: CompletionRequest = parse_request(
            body.to_string().as_bytes(),
            crate::fields::Endpoint::Completions,
        )?;
        completion_params(&req, LIMITS, SchedulingPolicy::Fcfs)
    }

    #[test]
    fn priority_needs_the_priority_policy() {
        assert_eq!(
            chat(json!({"messages": [], "priority": 0}))
                .unwrap()
                .priority,
            0
        );
        let e = chat(json!({"messages": [], "priority": 3})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("priority"));
        assert!(
            e.message.contains("--scheduling-policy priority"),
            "{}",
            e.message
        );
        let req: CompletionRequest = parse_json(
            json!({"prompt": "x", "priority": -7})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let v = completion_params(&req, LIMITS, SchedulingPolicy::Priority).unwrap();
        assert_eq!(v.priority, -7);
        let req: CompletionRequest = parse_json(
            json!({"prompt": "x", "priority": 1u64 << 40})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let e = completion_params(&req, LIMITS, SchedulingPolicy::Priority).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("priority"));
    }

    #[test]
    fn valid_chat_maps_every_field() {
        let v = chat(json!({
            "messages": [], "n": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1,
            "repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": -0.5,
            "max_completion_tokens": 7, "max_tokens": 99, "min_tokens": 2, "stop": ["a", ""],
            "stop_token_ids": [3], "seed": -1, "logit_bias": {"5": 10}, "ignore_eos": true,
            "skip_special_tokens": false, "include_stop_str_in_output": true, "logprobs": true,
            "top_logprobs": 3, "stream": true, "stream_options": {"include_usage": true}
        }))
        .unwrap();
        let p = &v.params;
        assert_eq!((p.n, p.top_k, p.min_tokens), (2, 5, 2));
        assert_eq!(p.max_tokens, Some(7));
        assert_eq!(p.stop, vec!["a".to_string()]);
        assert_eq!(p.stop_token_ids, vec![3]);
        assert_eq!(p.seed, Some(u64::MAX));
        assert_eq!(p.logit_bias, vec![(5, 10.0)]);
        assert!(p.ignore_eos && !p.skip_special_tokens && p.include_stop_str_in_output);
        assert_eq!(p.logprobs, Some(3));
        assert!(v.stream && v.include_usage);
    }

    #[test]
    fn defaults() {
        let v = chat(json!({"messages": []})).unwrap();
        assert_eq!(
            v.params,
            SamplingParams {
                max_tokens: None,
                ..SamplingParams::default()
            }
        );
        let v = completion(json!({"prompt": "x"})).unwrap();
        assert_eq!(v.params.max_tokens, Some(DEFAULT_COMPLETION_MAX_TOKENS));
        assert_eq!(
            chat(json!({"top_k": -1, "logprobs": true}))
                .unwrap()
                .params
                .logprobs,
            Some(0)
        );
        assert_eq!(chat(json!({"top_k": 0})).unwrap().params.top_k, 0);
    }

    #[test]
    fn every_bad_value_is_a_400_naming_the_param() {
        let cases: Vec<(Value, &str)> = vec![
            (json!({"temperature": -0.1}), "temperature"),
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"min_p": 1.5}), "min_p"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"frequency_penalty": 3}), "frequency_penalty"),
            (json!({"presence_penalty": -3}), "presence_penalty"),
            (json!({"n": 0}), "n"),
            (json!({"n": 129}), "n"),
            (json!({"n": 1.5}), "n"),
            (json!({"best_of": 3}), "best_of"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (
                json!({"max_completion_tokens": -1}),
                "max_completion_tokens",
            ),
            (json!({"min_tokens": 5, "max_tokens": 2}), "min_tokens"),
            (json!({"min_tokens": -1}), "min_tokens"),
            (json!({"stop": 5}), "stop"),
            (json!({"stop": [1]}), "stop"),
            (json!({"stop": vec!["x"; 65]}), "stop"),
            (json!({"stop": "x".repeat(1025)}), "stop"),
            (json!({"stop_token_ids": [1000]}), "stop_token_ids"),
            (json!({"stop_token_ids": [-1]}), "stop_token_ids"),
            (json!({"logit_bias": {"abc": 1}}), "logit_bias"),
            (json!({"logit_bias": {"1000": 1}}), "logit_bias"),
            (json!({"logit_bias": {"1": 101}}), "logit_bias"),
            (json!({"seed": 1.5}), "seed"),
            (
                json!({"top_logprobs": 21, "logprobs": true}),
                "top_logprobs",
            ),
            (json!({"top_logprobs": 2}), "top_logprobs"),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (json!({"tools": []}), "tools"),
            (json!({"stream": "yes"}), "stream"),
        ];
        for (body, param) in cases {
            let e = chat(body.clone()).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
        for (body, param) in [
            (json!({"suffix": "x"}), "suffix"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"prompt_logprobs": 21}), "prompt_logprobs"),
            (json!({"prompt_logprobs": -1}), "prompt_logprobs"),
            (json!({"allowed_token_ids": []}), "allowed_token_ids"),
            (json!({"allowed_token_ids": [1000]}), "allowed_token_ids"),
            (json!({"bad_words": 3}), "bad_words"),
            (json!({"bad_words": [" "]}), "bad_words"),
            (
                json!({"truncate_prompt_tokens": 0}),
                "truncate_prompt_tokens",
            ),
            (json!({"truncation_side": "middle"}), "truncation_side"),
            (json!({"cache_salt": ""}), "cache_salt"),
            (json!({"cache_salt": "x".repeat(1025)}), "cache_salt"),
            (json!({"request_id": "a b"}), "request_id"),
            (json!({"logprobs": 21}), "logprobs"),
            (json!({"logprobs": -1}), "logprobs"),
        ] {
            let e = completion(body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
    }

    #[test]
    fn echo_with_zero_max_tokens_scores_the_prompt() {
        let v = completion(json!({"prompt": "x", "echo": true, "max_tokens": 0, "logprobs": 2}))
            .unwrap();
        assert_eq!(v.params.max_tokens, Some(1));
        assert!(v.output.echo && v.output.echo_only);
        assert_eq!(v.output.echo_logprobs, Some(2));
        assert_eq!(v.params.prompt_logprobs, Some(2));
        assert_eq!(v.output.prompt_logprobs, None);
        let v =
            completion(json!({"prompt": "x", "echo": true, "prompt_logprobs": 5, "logprobs": 1}))
                .unwrap();
        assert_eq!(
            (v.params.prompt_logprobs, v.output.prompt_logprobs),
            (Some(5), Some(5))
        );
        assert!(!v.output.echo_only);
        let e = chat(json!({"messages": [], "echo": true, "max_tokens": 0})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
    }

    #[test]
    fn generation_config_defaults_fill_only_what_the_request_leaves_unset() {
        let d = RequestDefaults::from_json(&json!({"temperature": 0.2, "top_p": 0.9, "top_k": 50,
            "max_new_tokens": 8, "do_sample": true, "eos_token_id": 2}))
        .unwrap();
        assert_eq!(
            (d.temperature, d.top_p, d.top_k, d.max_tokens),
            (Some(0.2), Some(0.9), Some(50), Some(8))
        );
        let req: CompletionRequest = parse_json(
            json!({"prompt": "x", "temperature": 1.0})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let mut v = completion_params(&req, LIMITS, SchedulingPolicy::Fcfs).unwrap();
        d.apply(&req.common, req.common.max_tokens.is_some(), &mut v);
        assert_eq!(
            (v.params.temperature, v.params.top_p, v.params.top_k),
            (1.0, 0.9, 50)
        );
        // The completions default of 16 is capped by max_new_tokens; an explicit value stands.
        assert_eq!(v.params.max_tokens, Some(8));
        let req: ChatCompletionRequest = parse_json(
            json!({"messages": [], "max_completion_tokens": 30})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let mut v = chat_params(&req, LIMITS, SchedulingPolicy::Fcfs, None).unwrap();
        d.apply(&req.common, true, &mut v);
        assert_eq!(v.params.max_tokens, Some(30));
        let o = RequestDefaults::from_json(&json!({"temperature": 0.7})).unwrap();
        assert_eq!(d.overridden_by(o).temperature, Some(0.7));
        for bad in [
            json!({"top_p": 0}),
            json!({"temperature": "hot"}),
            json!({"top_k": 1.5}),
            json!([1]),
        ] {
            assert!(RequestDefaults::from_json(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn truncation_keeps_the_last_tokens_by_default() {
        let mut ids = vec![1, 2, 3, 4, 5];
        let t = truncation(Some(3), None).unwrap().unwrap();
        t.apply(&mut ids, 100);
        assert_eq!(ids, vec![3, 4, 5]);
        let mut ids = vec![1, 2, 3, 4, 5];
        truncation(Some(2), Some("right"))
            .unwrap()
            .unwrap()
            .apply(&mut ids, 100);
        assert_eq!(ids, vec![1, 2]);
        let mut ids = vec![1, 2, 3, 4, 5];
        truncation(Some(-1), None)
            .unwrap()
            .unwrap()
            .apply(&mut ids, 4);
        assert_eq!(ids, vec![2, 3, 4, 5]);
    }

    #[test]
    fn fuzz_findings_are_rejected() {
        // Finite as f64, infinite or zero as the engine's f32.
        for (body, param) in [
            (json!({"temperature": 1e70}), "temperature"),
            (json!({"top_p": 1e-50}), "top_p"),
            (json!({"repetition_penalty": 1e-60}), "repetition_penalty"),
            (json!({"repetition_penalty": 1e300}), "repetition_penalty"),
            (json!({"min_p": -1e-300}), "min_p"),
        ] {
            let e = chat(body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
        // min_tokens above the completions' default max_tokens.
        let e = completion(json!({"prompt": "x", "min_tokens": 17})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("min_tokens"));
        assert!(completion(json!({"prompt": "x", "min_tokens": 16})).is_ok());
    }

    #[test]
    fn malformed_bodies() {
        for body in ["", "{", "[1]", "\"x\"", "null"] {
            let e = parse_json::<ChatCompletionRequest>(body.as_bytes()).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
        }
    }

    #[test]
    fn model_resolution() {
        let served = vec!["a".to_string(), "b".to_string()];
        assert_eq!(resolve_model(None, &served).unwrap(), "a");
        assert_eq!(resolve_model(Some("b"), &served).unwrap(), "b");
        let e = resolve_model(Some("zz"), &served).unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.error_type(), "NotFoundError");
        assert_eq!(e.message, "The model `zz` does not exist.");
    }

    #[test]
    fn prompt_shapes() {
        let p = |v: Value| parse_prompt(Some(&v), 1000);
        assert_eq!(
            p(json!("hi")).unwrap(),
            vec![PromptInput::Text("hi".into())]
        );
        assert_eq!(p(json!(["a", "b"])).unwrap().len(), 2);
        assert_eq!(
            p(json!([1, 2])).unwrap(),
            vec![PromptInput::Tokens(vec![1, 2])]
        );
        assert_eq!(p(json!([[1], [2, 3]])).unwrap().len(), 2);
        for bad in [
            json!([]),
            json!([[]]),
            json!([1, "a"]),
            json!([1000]),
            json!(5),
            json!([{"a": 1}]),
            json!(null),
        ] {
            let e = p(bad.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("prompt"), "{bad}");
        }
        let build = |ids: Vec<u32>| {
            build_request(
                "r".into(),
                ids,
                &SamplingParams::default(),
                LIMITS_10,
                "prompt",
            )
        };
        assert!(build(vec![]).is_err());
        assert!(build(vec![10]).is_err());
        assert!(build(vec![9]).is_ok());
    }

    #[test]
    fn context_length_messages_state_the_numbers() {
        let build = |n: usize, max: Option<usize>, word: &str| {
            let params = SamplingParams {
                max_tokens: max,
                ..SamplingParams::default()
            };
            build_request("r".into(), vec![1; n], &params, LIMITS, word)
        };
        assert_eq!(build(10, None, "messages").unwrap().max_tokens(), 90);
        assert_eq!(build(10, Some(90), "messages").unwrap().max_tokens(), 90);
        let e = build(10, Some(91), "messages").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert_eq!(
            e.message,
            "This model's maximum context length is 100 tokens. However, you requested 101 tokens (10 in the messages, 91 in the completion). Please reduce the length of the messages or completion."
        );
        let e = build(100, None, "prompt").unwrap_err();
        assert!(
            e.message.contains("your request has 100 input tokens"),
            "{}",
            e.message
        );
        // min_tokens is bounded by the resolved max_tokens.
        let params = SamplingParams {
            max_tokens: None,
            min_tokens: 95,
            ..SamplingParams::default()
        };
        let r = build_request("r".into(), vec![1; 10], &params, LIMITS, "prompt").unwrap();
        assert_eq!((r.max_tokens(), r.params().min_tokens), (90, 90));
    }

    #[test]
    fn detokenize_ids_checked() {
        assert_eq!(detokenize_ids(Some(&[1, 2]), 10).unwrap(), vec![1, 2]);
        assert!(detokenize_ids(Some(&[10]), 10).is_err());
        assert!(detokenize_ids(None, 10).is_err());
    }
}
