//! The OpenAI (and vLLM-extension) wire types, defined once. Requests are parsed leniently, the
//! way OpenAI and vLLM accept them: unknown fields are ignored, `null` means "not given", and
//! fields with several shapes (`prompt`, `stop`, `messages[].content`) arrive as raw JSON and
//! are checked by [`crate::validation`] so the error names the field. Responses are serialized
//! with exactly the fields the official SDKs read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// `stream_options`: only meaningful with `stream: true`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct StreamOptions {
    /// Adds a final chunk with `choices: []` and the request's `usage`.
    pub include_usage: Option<bool>,
    /// vLLM extension: every chunk carries the usage so far.
    pub continuous_usage_stats: Option<bool>,
}

/// Sampling and streaming fields shared by chat and text completions (OpenAI's plus vLLM's
/// extras). Integers are read as `i64` so a negative value gets a range error naming the field
/// rather than a type error.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct CommonFields {
    /// `text`, `json_object` or `json_schema` (`{name, description?, schema, strict?}`).
    pub response_format: Option<Value>,
    /// vLLM's constraint object: exactly one of `json`, `regex`, `choice`, `grammar`,
    /// `json_object`, plus `disable_any_whitespace` / `whitespace_pattern`.
    pub structured_outputs: Option<Value>,
    pub n: Option<i64>,
    pub best_of: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub max_tokens: Option<i64>,
    pub min_tokens: Option<i64>,
    /// A string or a list of strings.
    pub stop: Option<Value>,
    pub stop_token_ids: Option<Vec<i64>>,
    /// Any JSON integer (OpenAI documents int64; u64 is accepted too).
    pub seed: Option<serde_json::Number>,
    /// Token id (as a string, as OpenAI sends it) → bias in [-100, 100].
    pub logit_bias: Option<BTreeMap<String, f64>>,
    pub ignore_eos: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    pub include_stop_str_in_output: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// vLLM extension: lower is served first under `--scheduling-policy priority`.
    pub priority: Option<i64>,
    /// vLLM: logprobs of the prompt tokens (top-k per position; the first is null).
    pub prompt_logprobs: Option<i64>,
    /// vLLM: only these token ids may be generated.
    pub allowed_token_ids: Option<Vec<i64>>,
    /// vLLM: words (strings) that may not be generated.
    pub bad_words: Option<Value>,
    /// vLLM: keep only this many prompt tokens (-1: the model's context).
    pub truncate_prompt_tokens: Option<i64>,
    /// `left` (keep the last tokens, vLLM's default for generation) or `right`.
    pub truncation_side: Option<String>,
    /// vLLM: logprob tokens as `token_id:{id}` strings.
    pub return_tokens_as_token_ids: Option<bool>,
    /// vLLM: the generated and prompt token ids in the response.
    pub return_token_ids: Option<bool>,
    /// vLLM: prefix-cache namespace (1 to 1024 characters).
    pub cache_salt: Option<String>,
    /// vLLM: the id the response carries (`cmpl-{request_id}`).
    pub request_id: Option<String>,
    /// With completions: the prompt is returned before the output (and its logprobs with
    /// `logprobs`); with chat: the last message, if it is the assistant's, before the answer.
    pub echo: Option<bool>,
    /// Legacy vLLM structured outputs (removed in vLLM 0.12), mapped onto `structured_outputs`.
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    pub guided_whitespace_pattern: Option<Value>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ChatCompletionRequest {
    /// Optional like in vLLM: absent means the first served name.
    pub model: Option<String>,
    /// A list of `{role, content, ...}` objects; checked in [`crate::template`].
    pub messages: Option<Value>,
    #[serde(flatten)]
    pub common: CommonFields,
    /// OpenAI's newer name for `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    /// vLLM extension: tokenize the rendered prompt with special tokens (default false: the
    /// template already has them).
    pub add_special_tokens: Option<bool>,
    /// Extra variables for the chat template (vLLM extension).
    pub chat_template_kwargs: Option<Map<String, Value>>,
    /// Passed to the chat template as `tools`.
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    /// At most one call when false (default true).
    pub parallel_tool_calls: Option<bool>,
    /// Passed to the chat template as `reasoning_effort`.
    pub reasoning_effort: Option<Value>,
    /// With a reasoning parser: false drops the reasoning from the answer (default true).
    pub include_reasoning: Option<bool>,
    /// Passed to the chat template as `documents` (RAG templates).
    pub documents: Option<Value>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct CompletionRequest {
    pub model: Option<String>,
    /// A string, a list of strings, a list of token ids, or a list of token-id lists.
    pub prompt: Option<Value>,
    #[serde(flatten)]
    pub common: CommonFields,
    /// Number of top alternatives per token (0 = only the chosen token's logprob).
    pub logprobs: Option<i64>,
    /// vLLM extension: add the BOS token when tokenizing text prompts (default true).
    pub add_special_tokens: Option<bool>,
}

/// `POST /tokenize` (vLLM): either a completion-style `prompt` or chat-style `messages`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<Value>,
    pub messages: Option<Value>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    pub return_token_strs: Option<bool>,
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub tools: Option<Value>,
}

/// `POST /detokenize` (vLLM).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Option<Vec<i64>>,
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

/// `{"error": {...}}`: the body of every failed request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The inner error object; `code` is the HTTP status, as vLLM reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorDetail {
    pub message: String,
    pub r#type: String,
    pub param: Option<String>,
    pub code: u16,
}

/// Cached prompt tokens, as OpenAI reports prefix-cache hits.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

/// Token accounting: the prompt counted once, completions summed over all choices.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct UsageInfo {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

impl UsageInfo {
    /// Build a usage object with `total_tokens` filled in.
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens }),
        }
    }
}

/// One alternative in chat-format logprobs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
}

/// One generated token in chat-format logprobs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// `choices[].logprobs` of a chat completion.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

/// `choices[].logprobs` of a text completion (the legacy parallel-array format).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// `null` for the first prompt token of an echoed prompt.
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    pub text_offset: Vec<usize>,
}

/// The assistant message of a non-streaming chat choice.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessageOut {
    pub role: String,
    /// The text; null when the answer is tool calls only (or thinking cut by `max_tokens`).
    pub content: Option<String>,
    pub refusal: Option<String>,
    pub tool_calls: Vec<Value>,
    /// A reasoning model's thinking (with a reasoning parser), under both names clients read.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reasoning: Option<String>,
}

/// vLLM's `stop_reason`: the stop string or stop token id that ended a choice, else null.
pub type StopReasonOut = Option<Value>;

/// One choice of a non-streaming chat completion.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    pub stop_reason: StopReasonOut,
    /// The generated token ids (`return_token_ids`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// `chat.completion`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: UsageInfo,
    pub system_fingerprint: Option<String>,
    /// vLLM: `[null, {"id": {"logprob", "rank", "decoded_token"}}, ...]` (`prompt_logprobs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Value>,
    /// The prompt's token ids (`return_token_ids`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}

/// The `delta` of a streamed chat chunk: `role` only on the first chunk of a choice.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Tool-call fragments: `{index, id, type, function: {name, arguments}}` first, then
    /// `{index, function: {arguments}}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
    /// Thinking, under both names clients read (with a reasoning parser).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reasoning: Option<String>,
}

impl ChatDelta {
    /// A delta of answer text and (possibly) thinking.
    pub fn text(content: Option<String>, reasoning: Option<String>) -> Self {
        Self {
            role: None,
            content,
            tool_calls: None,
            reasoning_content: reasoning.clone(),
            reasoning,
        }
    }
}

/// One choice of a streamed chat chunk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: StopReasonOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// `chat.completion.chunk`. `usage` is omitted unless the client asked for usage, then it is
/// `null` on every chunk but the final one (OpenAI's shape).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: Option<String>,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageInfo>>,
    /// On the first chunk only, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}

/// One choice of a text completion (streamed or not).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: StopReasonOut,
    /// vLLM: the prompt's logprobs (`prompt_logprobs`), on the first chunk of a stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Value>,
    /// `return_token_ids`: the prompt's ids (first chunk of a stream) and the generated ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// `text_completion`, non-streaming.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: UsageInfo,
    pub system_fingerprint: Option<String>,
}

/// `text_completion` chunk of a stream (same object name as OpenAI uses).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: Option<String>,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageInfo>>,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    pub root: String,
    pub parent: Option<String>,
    pub max_model_len: usize,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

/// `POST /tokenize` response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    pub token_strs: Option<Vec<String>>,
}

/// `POST /detokenize` response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

/// `GET /version` response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionResponse {
    pub version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_request_is_lenient() {
        let r: ChatCompletionRequest = serde_json::from_str(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"user":"x",
                "temperature":1,"stop":null,"stream_options":{"include_usage":true},
                "some_future_field":{"a":1},"top_k":-1,"seed":18446744073709551615}"#,
        )
        .unwrap();
        assert_eq!(r.common.temperature, Some(1.0));
        assert_eq!(r.common.top_k, Some(-1));
        assert_eq!(r.common.stop, None);
        assert_eq!(r.common.seed.and_then(|s| s.as_u64()), Some(u64::MAX));
        assert_eq!(r.common.stream_options.unwrap().include_usage, Some(true));
    }

    #[test]
    fn chunk_usage_is_tristate() {
        let mut c = ChatCompletionChunk {
            id: "x".into(),
            object: "chat.completion.chunk".into(),
            created: 0,
            model: "m".into(),
            system_fingerprint: None,
            choices: vec![],
            usage: None,
            prompt_logprobs: None,
            prompt_token_ids: None,
        };
        assert!(!serde_json::to_string(&c).unwrap().contains("usage"));
        c.usage = Some(None);
        assert!(serde_json::to_string(&c)
            .unwrap()
            .contains(r#""usage":null"#));
        c.usage = Some(Some(UsageInfo::new(3, 4, 1)));
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains(r#""total_tokens":7"#), "{s}");
        assert!(s.contains(r#""cached_tokens":1"#), "{s}");
    }

    #[test]
    fn delta_omits_absent_fields() {
        let d = ChatDelta::text(Some("a".into()), None);
        assert_eq!(serde_json::to_string(&d).unwrap(), r#"{"content":"a"}"#);
        let d = ChatDelta::text(None, Some("b".into()));
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            r#"{"reasoning_content":"b","reasoning":"b"}"#
        );
    }
}

/// `POST /v1/embeddings` (OpenAI's and vLLM's shape).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    /// A string, a list of strings, a list of token ids, or a list of token-id lists.
    pub input: Option<Value>,
    /// `float` (default) or `base64` (little-endian float32).
    pub encoding_format: Option<String>,
    /// Truncate each input to this many tokens (-1: the model's limit) instead of refusing it.
    pub truncate_prompt_tokens: Option<i64>,
    pub user: Option<String>,
    /// Add the model's special tokens (`[CLS]`/`[SEP]`) to text inputs (default true).
    pub add_special_tokens: Option<bool>,
}

/// `POST /v1/rerank`, `/rerank`, `/v2/rerank` (vLLM's / Jina's / Cohere's shape).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct RerankRequest {
    pub model: Option<String>,
    pub query: Option<Value>,
    pub documents: Option<Value>,
    /// Keep the best `top_n` results (absent or 0: all).
    pub top_n: Option<i64>,
    /// Include each document's text in its result (default true).
    pub return_documents: Option<bool>,
    pub truncate_prompt_tokens: Option<i64>,
}

/// `POST /v1/score`, `/score` (vLLM's shape): `text_1` against each of `text_2`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ScoreRequest {
    pub model: Option<String>,
    pub text_1: Option<Value>,
    pub text_2: Option<Value>,
    pub truncate_prompt_tokens: Option<i64>,
}
