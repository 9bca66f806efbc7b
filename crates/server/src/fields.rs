//! The request contract, field by field: every top-level field of vLLM's and OpenAI's request
//! models for `/v1/chat/completions`, `/v1/completions` and `/v1/embeddings`, with what spindle
//! does with it. A field is honoured, refused with a 400 naming it (unless it carries its
//! neutral value, e.g. `use_beam_search: false`), or accepted and ignored on purpose because it
//! cannot change the output. A field outside the table is ignored with a warning in the log, as
//! vLLM does. `docs/api.md` renders this table; a test keeps the two equal.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// Which endpoint's request model a body follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }

    /// The endpoint's fields, in the order of the docs table.
    pub fn fields(self) -> &'static [Field] {
        match self {
            Endpoint::ChatCompletions => CHAT,
            Endpoint::Completions => COMPLETIONS,
            Endpoint::Embeddings => EMBEDDINGS,
        }
    }

    pub const ALL: [Endpoint; 3] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
    ];
}

/// A value of a refused field that asks for nothing, so it is accepted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Neutral {
    /// `null`, `false`, `""`, `[]`, `{}`.
    Empty,
    /// Only `null` (both `true` and `false` ask for something).
    Null,
    /// Empty or this number (e.g. `length_penalty: 1.0`).
    Number(f64),
    /// Empty or this string.
    Text(&'static str),
}

/// What spindle does with a field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Treatment {
    /// The field has its documented effect.
    Honoured,
    /// Accepted without effect: it cannot change the output (the reason says why).
    Ignored(&'static str),
    /// A 400 naming the field unless its value is `neutral` (the reason says why).
    Refused { why: &'static str, neutral: Neutral },
}

impl Treatment {
    /// The word in the docs table's status column.
    pub fn word(self) -> &'static str {
        match self {
            Treatment::Honoured => "honoured",
            Treatment::Ignored(_) => "ignored",
            Treatment::Refused { .. } => "refused",
        }
    }
}

/// One request field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Field {
    pub name: &'static str,
    pub treatment: Treatment,
}

const fn h(name: &'static str) -> Field {
    Field {
        name,
        treatment: Treatment::Honoured,
    }
}

const fn ignored(name: &'static str, why: &'static str) -> Field {
    Field {
        name,
        treatment: Treatment::Ignored(why),
    }
}

const fn refused(name: &'static str, why: &'static str) -> Field {
    Field {
        name,
        treatment: Treatment::Refused {
            why,
            neutral: Neutral::Empty,
        },
    }
}

const fn refused_unless(name: &'static str, why: &'static str, neutral: Neutral) -> Field {
    Field {
        name,
        treatment: Treatment::Refused { why, neutral },
    }
}

const NO_EFFECT_USER: &str = "an end-user id for abuse monitoring; it cannot change the output";
const NO_BEAM: &str = "beam search is not implemented";
const NO_WATERMARK: &str = "watermarking is not implemented";
const NO_KV_TRANSFER: &str =
    "disaggregated prefill is not used; one server computes the whole request";
const NO_XARGS: &str = "no request extensions (logits processors) are installed";
const NO_REPETITION: &str = "repetition detection is not implemented";
const NO_THINKING: &str = "thinking budgets are not implemented";
const NO_TOKEN_LOGPROBS: &str =
    "logprobs for a fixed token list are not implemented; use `logprobs`";
const NO_SESSION: &str = "routing metadata for external routers; it cannot change the output";
const STREAM_INTERVAL: &str = "every token is streamed as it is generated; the interval only batches chunks, not what they hold";
const RENDER_ONLY: &str = "only meaningful on vLLM's render endpoints";
const NO_MOE: &str = "no routed-expert data is returned";
const NO_MEDIA: &str = "text-only models: media content parts are refused where they appear";

/// Fields both generation endpoints share (vLLM's sampling and extra parameters).
const GENERATION: [Field; 52] = [
    h("model"),
    h("frequency_penalty"),
    h("logit_bias"),
    h("logprobs"),
    h("max_tokens"),
    h("n"),
    h("presence_penalty"),
    h("response_format"),
    h("seed"),
    h("stop"),
    h("stream"),
    h("stream_options"),
    h("temperature"),
    h("top_p"),
    ignored("user", NO_EFFECT_USER),
    refused_unless("use_beam_search", NO_BEAM, Neutral::Empty),
    h("top_k"),
    h("min_p"),
    h("repetition_penalty"),
    refused_unless("watermarking", NO_WATERMARK, Neutral::Empty),
    refused_unless("length_penalty", NO_BEAM, Neutral::Number(1.0)),
    h("stop_token_ids"),
    h("include_stop_str_in_output"),
    h("ignore_eos"),
    h("min_tokens"),
    h("skip_special_tokens"),
    h("spaces_between_special_tokens"),
    h("truncate_prompt_tokens"),
    h("truncation_side"),
    h("prompt_logprobs"),
    refused("logprob_token_ids", NO_TOKEN_LOGPROBS),
    h("allowed_token_ids"),
    h("bad_words"),
    h("echo"),
    h("add_special_tokens"),
    h("structured_outputs"),
    h("priority"),
    h("request_id"),
    ignored("session_id", NO_SESSION),
    h("return_tokens_as_token_ids"),
    h("return_token_ids"),
    ignored("routed_experts_prompt_start", NO_MOE),
    ignored("return_token_offsets", RENDER_ONLY),
    ignored("return_mm_kwargs", RENDER_ONLY),
    h("cache_salt"),
    ignored("kv_transfer_params", NO_KV_TRANSFER),
    ignored("ec_transfer_params", NO_KV_TRANSFER),
    refused("vllm_xargs", NO_XARGS),
    refused("repetition_detection", NO_REPETITION),
    refused_unless("thinking_token_budget", NO_THINKING, Neutral::Number(-1.0)),
    ignored("stream_interval", STREAM_INTERVAL),
    ignored("metadata", "stored-completion metadata; nothing is stored"),
];

const CHAT_ONLY: [Field; 26] = [
    h("messages"),
    h("top_logprobs"),
    h("max_completion_tokens"),
    h("tools"),
    h("tool_choice"),
    h("parallel_tool_calls"),
    h("reasoning_effort"),
    h("include_reasoning"),
    h("add_generation_prompt"),
    h("continue_final_message"),
    h("documents"),
    refused(
        "chat_template",
        "per-request chat templates are not trusted (as vLLM without --trust-request-chat-template); start the server with --chat-template",
    ),
    h("chat_template_kwargs"),
    ignored("media_io_kwargs", NO_MEDIA),
    ignored("mm_processor_kwargs", NO_MEDIA),
    refused("return_prompt_text", "not implemented; /v1/chat/completions/render gives the prompt's token ids"),
    ignored("store", "nothing is stored"),
    ignored("service_tier", "one service tier"),
    ignored("prompt_cache_key", "prefix caching is automatic; use `cache_salt` to isolate tenants"),
    ignored("safety_identifier", NO_EFFECT_USER),
    refused_unless("modalities", "only text output", Neutral::Text("text")),
    refused("audio", "only text output"),
    refused("prediction", "predicted outputs are not implemented"),
    refused("web_search_options", "no hosted tools"),
    refused_unless("verbosity", "not a reasoning model API", Neutral::Text("medium")),
    refused("functions", "the deprecated `functions` API is not supported; use `tools`"),
];

const COMPLETIONS_ONLY: [Field; 10] = [
    h("prompt"),
    refused("suffix", "fill-in-the-middle is not implemented"),
    h("best_of"),
    refused("prompt_embeds", "prompt embeddings are not accepted"),
    h("guided_json"),
    h("guided_regex"),
    h("guided_choice"),
    h("guided_grammar"),
    h("guided_whitespace_pattern"),
    ignored(
        "guided_decoding_backend",
        "one backend (llguidance) compiles every constraint",
    ),
];

const fn concat<const A: usize, const B: usize, const C: usize>(
    a: [Field; A],
    b: [Field; B],
) -> [Field; C] {
    let mut out = [h(""); C];
    let mut i = 0;
    while i < A {
        out[i] = a[i];
        i += 1;
    }
    let mut j = 0;
    while j < B {
        out[A + j] = b[j];
        j += 1;
    }
    out
}

static CHAT_ALL: [Field; 78] = concat(GENERATION, CHAT_ONLY);
static COMPLETIONS_ALL: [Field; 62] = concat(GENERATION, COMPLETIONS_ONLY);
const CHAT: &[Field] = &CHAT_ALL;
const COMPLETIONS: &[Field] = &COMPLETIONS_ALL;

const EMBEDDINGS: &[Field] = &[
    h("model"),
    h("input"),
    h("encoding_format"),
    refused(
        "dimensions",
        "only matryoshka models can shorten their vectors, and spindle serves none",
    ),
    ignored("user", NO_EFFECT_USER),
    h("truncate_prompt_tokens"),
    h("add_special_tokens"),
    refused_unless(
        "priority",
        "embedding requests are served in arrival order",
        Neutral::Number(0.0),
    ),
    ignored("request_id", "embedding responses carry their own id"),
    ignored("mm_processor_kwargs", NO_MEDIA),
    ignored("kv_transfer_params", NO_KV_TRANSFER),
    refused_unless(
        "normalize",
        "normalization follows the model's sentence-transformers modules",
        Neutral::Null,
    ),
    refused_unless(
        "embed_dtype",
        "vectors are float32",
        Neutral::Text("float32"),
    ),
    refused_unless(
        "endianness",
        "base64 vectors are little-endian float32",
        Neutral::Text("native"),
    ),
    refused("vllm_xargs", NO_XARGS),
];

/// Whether `value` asks for nothing (see [`Neutral`]).
fn is_neutral(value: &Value, neutral: Neutral) -> bool {
    if neutral == Neutral::Null {
        return value.is_null();
    }
    let empty = match value {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    };
    empty
        || match neutral {
            Neutral::Empty | Neutral::Null => false,
            Neutral::Number(n) => value.as_f64() == Some(n),
            Neutral::Text(t) => value.as_str() == Some(t) || value == &Value::from(vec![t]),
        }
}

/// Look a field up in an endpoint's table.
pub fn lookup(endpoint: Endpoint, name: &str) -> Option<&'static Field> {
    endpoint.fields().iter().find(|f| f.name == name)
}

/// Check a request body's top-level fields: a refused field with a non-neutral value is a 400
/// naming it; a field in no table is logged and ignored.
pub fn check(endpoint: Endpoint, body: &Map<String, Value>) -> Result<(), ApiError> {
    for (name, value) in body {
        match lookup(endpoint, name).map(|f| f.treatment) {
            None => tracing::warn!(
                endpoint = endpoint.path(),
                field = %name,
                "ignoring a request field that neither vLLM nor OpenAI define"
            ),
            Some(Treatment::Refused { why, neutral }) if !is_neutral(value, neutral) => {
                return Err(ApiError::invalid_param(
                    name,
                    format!("`{name}` is not supported by this server: {why}."),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The docs table of one endpoint, as `docs/api.md` holds it.
pub fn markdown_table(endpoint: Endpoint) -> String {
    let mut out = format!(
        "### `{}`\n\n| field | status | notes |\n|---|---|---|\n",
        endpoint.path()
    );
    for f in endpoint.fields() {
        let note = match f.treatment {
            Treatment::Honoured => String::new(),
            Treatment::Ignored(why) => why.to_string(),
            Treatment::Refused { why, neutral } => match neutral {
                Neutral::Empty => why.to_string(),
                Neutral::Null => format!("{why} (only `null` is accepted)"),
                Neutral::Number(n) => format!("{why} (`{n}` is accepted)"),
                Neutral::Text(t) => format!("{why} (`\"{t}\"` is accepted)"),
            },
        };
        out.push_str(&format!(
            "| `{}` | {} | {} |\n",
            f.name,
            f.treatment.word(),
            note
        ));
    }
    out
}

#[cfg(test)]
mod tests;
