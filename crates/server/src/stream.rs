//! Turning a request's engine streams into OpenAI responses: one [`Generation`] owns the
//! request's engine streams (one per prompt), so dropping it — the client went away, hyper
//! dropped the handler future or the response body — drops the streams, and the engine aborts
//! the requests and frees their KV blocks. Streaming wraps it in [`SseBody`];
//! non-streaming awaits [`Generation::collect`].

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use serde_json::{json, Value};
use spindle_engine::{
    ChoiceDelta, EngineEvent, FinishReason, PromptTokenLogprob, RequestStream, StepLogprobs,
    StopReason, TokenLogprob,
};
use spindle_model::TokenizerBundle;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::protocol::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatDelta,
    ChatLogprobs, ChatMessageOut, ChatTokenLogprob, ChatTopLogprob, CompletionChoice,
    CompletionChunk, CompletionLogprobs, CompletionResponse, UsageInfo,
};
use crate::reasoning::ReasoningSplitter;
use crate::sse;
use crate::validation::OutputFlags;

/// Which OpenAI endpoint's shapes to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

/// Response-level fields repeated in every chunk.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    /// Which endpoint answered.
    pub kind: Kind,
    /// `chatcmpl-…` / `cmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The served name the client used.
    pub model: String,
    /// Identifies the serving configuration.
    pub system_fingerprint: Option<String>,
}

/// Output options of one request.
#[derive(Debug, Clone)]
pub struct OutputOptions {
    /// Completions per prompt.
    pub n: usize,
    /// Whether logprobs were requested (the engine returns them per token).
    pub logprobs: bool,
    /// `stream_options.include_usage`: a final usage chunk.
    pub include_usage: bool,
    /// `stream_options.continuous_usage_stats`: usage on every chunk.
    pub continuous_usage: bool,
    /// Forced tool calls: the (constrained) text is held back and answered as `tool_calls`.
    pub tools: Option<crate::tools::ToolMode>,
    /// Echo, prompt logprobs, token ids.
    pub flags: OutputFlags,
    /// Chat with `--reasoning-parser`: how to split, where the prompt leaves the model, and
    /// whether the answer carries the reasoning (`include_reasoning`).
    pub reasoning: Option<crate::validation::ReasoningRequest>,
}

/// What the response may repeat of one prompt.
#[derive(Debug, Clone, Default)]
pub struct PromptInfo {
    /// Prompt tokens (usage, metrics).
    pub len: usize,
    /// The prompt's token ids, kept only when the response repeats them (`return_token_ids`,
    /// echoed logprobs).
    pub ids: Option<Vec<u32>>,
    /// The text `echo` puts before the output.
    pub echo: Option<String>,
}

struct Slot {
    stream: Option<RequestStream>,
    prompt: PromptInfo,
    /// The engine's prompt logprobs, once they arrived.
    prompt_logprobs: Option<Vec<Option<PromptTokenLogprob>>>,
}

impl Slot {
    fn prompt_tokens(&self) -> usize {
        self.prompt.len
    }
}

#[derive(Default)]
struct ChoiceState {
    text: String,
    tokens: usize,
    finish_reason: Option<FinishReason>,
    stop_reason: Option<StopReason>,
    chat_logprobs: Vec<ChatTokenLogprob>,
    completion_logprobs: CompletionLogprobs,
    /// Characters of token text so far (completions' `text_offset`).
    text_offset: usize,
    last_delta: Option<Instant>,
    /// Bytes of `text` already streamed as content (tool modes hold the rest back).
    streamed: usize,
    /// Generated token ids (`return_token_ids`).
    token_ids: Vec<u32>,
    /// The stream sent this choice's first chunk (echo, prompt logprobs, prompt ids).
    opened: bool,
    /// Splits thinking from the answer (with a reasoning parser).
    splitter: Option<ReasoningSplitter>,
    /// The thinking so far (non-streaming).
    reasoning: String,
}

/// What one engine event means for the response.
enum Step {
    /// `delta.text` is the answer's part; `reasoning` the thinking's (dropped unless included).
    Delta {
        choice: usize,
        delta: ChoiceDelta,
        reasoning: String,
    },
    Continue,
    Failed(ApiError),
}

/// One client request in flight: its engine streams and everything needed to answer.
pub struct Generation {
    meta: ResponseMeta,
    opts: OutputOptions,
    tokenizer: Arc<TokenizerBundle>,
    metrics: Arc<Metrics>,
    slots: Vec<Slot>,
    next_poll: usize,
    choices: Vec<ChoiceState>,
    cached_tokens: usize,
}

impl Generation {
    /// `streams[i]` is the engine request for prompt `i`, whose prompt had `prompt_tokens[i]`
    /// tokens. Choice indices are `prompt * n + k`, as OpenAI numbers batched prompts.
    pub fn new(
        meta: ResponseMeta,
        opts: OutputOptions,
        streams: Vec<(RequestStream, PromptInfo)>,
        tokenizer: Arc<TokenizerBundle>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let total = streams.len() * opts.n;
        let splitter = opts
            .reasoning
            .as_ref()
            .map(|r| ReasoningSplitter::new(r.parser, r.state));
        let choice = || ChoiceState {
            splitter: splitter.clone(),
            ..ChoiceState::default()
        };
        Self {
            meta,
            opts,
            tokenizer,
            metrics,
            slots: streams
                .into_iter()
                .map(|(s, prompt)| Slot {
                    stream: Some(s),
                    prompt,
                    prompt_logprobs: None,
                })
                .collect(),
            next_poll: 0,
            choices: (0..total).map(|_| choice()).collect(),
            cached_tokens: 0,
        }
    }

    /// Abort whatever is still running (drops the engine streams).
    fn abort_all(&mut self) {
        for slot in &mut self.slots {
            slot.stream = None;
        }
    }

    /// The next event of any still-running engine stream (round-robin for fairness);
    /// `None` once every stream has ended.
    pub(crate) fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<(usize, Option<EngineEvent>)>> {
        let count = self.slots.len();
        let mut any_open = false;
        for k in 0..count {
            let i = (self.next_poll + k) % count;
            let Some(stream) = self.slots[i].stream.as_mut() else {
                continue;
            };
            any_open = true;
            // `recv` is cancel-safe: a pending future can be dropped and recreated next poll
            // (the channel keeps the waker).
            let polled = {
                let mut fut = std::pin::pin!(stream.recv());
                fut.as_mut().poll(cx)
            };
            if let Poll::Ready(ev) = polled {
                if matches!(
                    ev,
                    None | Some(EngineEvent::Finished { .. }) | Some(EngineEvent::Error(_))
                ) {
                    self.slots[i].stream = None;
                }
                self.next_poll = (i + 1) % count;
                return Poll::Ready(Some((i, ev)));
            }
        }
        if any_open {
            Poll::Pending
        } else {
            Poll::Ready(None)
        }
    }

    fn apply(&mut self, slot: usize, event: Option<EngineEvent>) -> Step {
        match event {
            Some(EngineEvent::PromptLogprobs(lp)) => {
                self.slots[slot].prompt_logprobs = Some(lp);
                Step::Continue
            }
            Some(EngineEvent::Delta(mut delta)) => {
                if self.opts.flags.echo_only {
                    // Scoring the prompt: the one token generated for it is not part of the
                    // answer, which ends at the prompt with `length`.
                    delta.token_ids.clear();
                    delta.text.clear();
                    delta.logprobs.clear();
                    if delta.finish_reason.is_some() {
                        delta.finish_reason = Some(FinishReason::Length);
                        delta.stop_reason = None;
                    }
                }
                if delta.index >= self.opts.n {
                    return Step::Failed(ApiError::internal(format!(
                        "engine returned choice index {} for n = {}",
                        delta.index, self.opts.n
                    )));
                }
                let choice = slot * self.opts.n + delta.index;
                delta.index = choice;
                let now = Instant::now();
                let state = &mut self.choices[choice];
                if !delta.token_ids.is_empty() {
                    if let Some(prev) = state.last_delta {
                        self.metrics
                            .observe_inter_token(now.duration_since(prev).as_secs_f64());
                    }
                    state.last_delta = Some(now);
                }
                state.tokens += delta.token_ids.len();
                if self.opts.flags.token_ids {
                    state.token_ids.extend(&delta.token_ids);
                }
                if delta.finish_reason.is_some() {
                    state.finish_reason = delta.finish_reason;
                    state.stop_reason = delta.stop_reason.clone();
                }
                let reasoning = self.split_reasoning(choice, &mut delta);
                Step::Delta {
                    choice,
                    delta,
                    reasoning,
                }
            }
            Some(EngineEvent::Finished { usage, timings }) => {
                let n = self.opts.n;
                let generated: usize = self.choices[slot * n..(slot + 1) * n]
                    .iter()
                    .map(|c| c.tokens)
                    .sum();
                self.metrics
                    .observe_request(&timings, self.slots[slot].prompt_tokens(), generated);
                for c in &self.choices[slot * n..(slot + 1) * n] {
                    if let Some(r @ (FinishReason::Stop | FinishReason::Length)) = c.finish_reason {
                        self.metrics.count_success(r.as_str());
                    }
                }
                self.cached_tokens += usage.cached_tokens;
                Step::Continue
            }
            // The engine died with this request in flight: a server error (500) for this request;
            // new requests are refused with 503 at submission.
            Some(EngineEvent::Error(spindle_engine::EngineError::EngineDead(reason))) => {
                Step::Failed(ApiError::internal(format!(
                    "The engine died while processing the request: {reason}"
                )))
            }
            Some(EngineEvent::Error(e)) => Step::Failed(e.into()),
            Some(EngineEvent::Embeddings(_)) => Step::Failed(ApiError::internal(
                "The engine sent embeddings for a generation request.",
            )),
            None => Step::Failed(ApiError::internal(
                "The engine stopped before finishing the request.",
            )),
        }
    }

    /// With a reasoning parser: leave the answer's part of `delta.text` there and return the
    /// thinking's (empty when the request leaves it out).
    fn split_reasoning(&mut self, choice: usize, delta: &mut ChoiceDelta) -> String {
        let include = self.opts.reasoning.as_ref().is_some_and(|r| r.include);
        let Some(splitter) = self.choices[choice].splitter.as_mut() else {
            return String::new();
        };
        let mut split = splitter.push(&delta.text);
        if delta.finish_reason.is_some() {
            let rest = splitter.finish();
            split.reasoning.push_str(&rest.reasoning);
            split.content.push_str(&rest.content);
        }
        delta.text = split.content;
        match include {
            true => split.reasoning,
            false => String::new(),
        }
    }

    /// Token accounting: each prompt counted once, completions summed over all choices.
    pub fn usage(&self) -> UsageInfo {
        let prompt: usize = self.slots.iter().map(Slot::prompt_tokens).sum();
        let completion: usize = self.choices.iter().map(|c| c.tokens).sum();
        UsageInfo::new(prompt, completion, self.cached_tokens)
    }

    // ----- token text for logprobs -----

    fn token_text(&self, id: u32) -> (String, Option<Vec<u8>>) {
        if self.opts.flags.tokens_as_ids {
            let text = format!("token_id:{id}");
            let bytes = text.as_bytes().to_vec();
            return (text, Some(bytes));
        }
        let text = self
            .tokenizer
            .decode(&[id], false)
            .ok()
            .or_else(|| self.tokenizer.id_to_token(id))
            .unwrap_or_default();
        let bytes = token_bytes(&text, self.tokenizer.id_to_token(id).as_deref());
        (text, Some(bytes))
    }

    fn chat_logprobs(&self, steps: &[StepLogprobs]) -> Vec<ChatTokenLogprob> {
        steps
            .iter()
            .map(|s| {
                let (token, bytes) = self.token_text(s.chosen.token_id);
                ChatTokenLogprob {
                    token,
                    logprob: clamp_logprob(s.chosen.logprob),
                    bytes,
                    top_logprobs: s
                        .top
                        .iter()
                        .map(|t| {
                            let (token, bytes) = self.token_text(t.token_id);
                            ChatTopLogprob {
                                token,
                                logprob: clamp_logprob(t.logprob),
                                bytes,
                            }
                        })
                        .collect(),
                }
            })
            .collect()
    }

    fn completion_logprobs(
        &self,
        steps: &[StepLogprobs],
        offset: &mut usize,
    ) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        for s in steps {
            self.push_completion_token(
                &mut out,
                offset,
                s.chosen.token_id,
                Some((&s.chosen, &s.top)),
            );
        }
        out
    }

    /// One token in completions' logprobs format: its text and offset, and (unless it is an
    /// echoed prompt's first token, which has none) its logprob and the map of the top
    /// alternatives plus itself.
    fn push_completion_token(
        &self,
        out: &mut CompletionLogprobs,
        offset: &mut usize,
        id: u32,
        scored: Option<(&TokenLogprob, &[TokenLogprob])>,
    ) {
        let (token, _) = self.token_text(id);
        out.text_offset.push(*offset);
        *offset += token.chars().count();
        match scored {
            Some((chosen, top)) => {
                let mut map = std::collections::BTreeMap::new();
                for t in top {
                    let (tok, _) = self.token_text(t.token_id);
                    map.entry(tok).or_insert(clamp_logprob(t.logprob));
                }
                map.entry(token.clone())
                    .or_insert(clamp_logprob(chosen.logprob));
                out.token_logprobs.push(Some(clamp_logprob(chosen.logprob)));
                out.top_logprobs.push(Some(map));
            }
            None => {
                out.token_logprobs.push(None);
                out.top_logprobs.push(None);
            }
        }
        out.tokens.push(token);
    }

    // ----- the prompt: echo, prompt logprobs, prompt ids -----

    /// An echoed prompt in completions' logprobs format: every prompt token, the first with
    /// null logprobs, each later one with its logprob and the top `k` (from the engine's
    /// prompt logprobs). Offsets start at 0.
    fn echo_logprobs(&self, slot: usize, k: usize) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        let mut offset = 0;
        let s = &self.slots[slot];
        let lps = s.prompt_logprobs.as_deref().unwrap_or_default();
        for (i, &id) in s.prompt.ids.iter().flatten().enumerate() {
            let scored = lps
                .get(i)
                .and_then(Option::as_ref)
                .map(|lp| (&lp.token, &lp.top[..k.min(lp.top.len())]));
            self.push_completion_token(&mut out, &mut offset, id, scored);
        }
        out
    }

    /// vLLM's `prompt_logprobs`: per position null or `{id: {logprob, rank, decoded_token}}`
    /// with the prompt token and the top `k`.
    fn prompt_logprobs_json(&self, slot: usize) -> Option<Value> {
        let k = self.opts.flags.prompt_logprobs?;
        let lps = self.slots[slot].prompt_logprobs.as_ref()?;
        let entry = |id: u32, logprob: f32, rank: usize| json!({"logprob": clamp_logprob(logprob), "rank": rank, "decoded_token": self.token_text(id).0});
        Some(Value::Array(
            lps.iter()
                .map(|p| {
                    let Some(p) = p else { return Value::Null };
                    let mut map = serde_json::Map::new();
                    for (i, t) in p.top.iter().take(k).enumerate() {
                        map.insert(t.token_id.to_string(), entry(t.token_id, t.logprob, i + 1));
                    }
                    map.insert(
                        p.token.token_id.to_string(),
                        entry(p.token.token_id, p.token.logprob, p.rank),
                    );
                    Value::Object(map)
                })
                .collect(),
        ))
    }

    fn prompt_ids(&self, slot: usize) -> Option<Vec<u32>> {
        if !self.opts.flags.token_ids {
            return None;
        }
        self.slots[slot].prompt.ids.clone()
    }

    fn echo_text(&self, slot: usize) -> Option<&str> {
        self.slots[slot].prompt.echo.as_deref()
    }

    // ----- streaming -----

    fn chunk_usage(&self) -> Option<Option<UsageInfo>> {
        if !self.opts.include_usage {
            None
        } else if self.opts.continuous_usage {
            Some(Some(self.usage()))
        } else {
            Some(None)
        }
    }

    /// The opening chunks of a chat stream: one `{"role": "assistant", "content": ""}` delta per
    /// choice (the content is the echoed last message with `echo`); the first carries the
    /// prompt's ids with `return_token_ids`.
    fn opening_chunks(&self) -> Vec<Bytes> {
        if self.meta.kind != Kind::Chat {
            return Vec::new();
        }
        (0..self.choices.len())
            .map(|index| {
                let slot = index / self.opts.n;
                let content = self.echo_text(slot).unwrap_or_default().to_string();
                self.chat_chunk_with(
                    vec![ChatChunkChoice {
                        index,
                        delta: ChatDelta {
                            role: Some("assistant".into()),
                            ..ChatDelta::text(Some(content), None)
                        },
                        logprobs: None,
                        finish_reason: None,
                        stop_reason: None,
                        token_ids: None,
                    }],
                    None,
                    if index == 0 { self.prompt_ids(0) } else { None },
                )
            })
            .collect()
    }

    fn chat_chunk(&self, choices: Vec<ChatChunkChoice>) -> Bytes {
        self.chat_chunk_with(choices, None, None)
    }

    fn chat_chunk_with(
        &self,
        choices: Vec<ChatChunkChoice>,
        prompt_logprobs: Option<Value>,
        prompt_token_ids: Option<Vec<u32>>,
    ) -> Bytes {
        sse::event(&ChatCompletionChunk {
            id: self.meta.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.meta.created,
            model: self.meta.model.clone(),
            system_fingerprint: self.meta.system_fingerprint.clone(),
            choices,
            usage: self.chunk_usage(),
            prompt_logprobs,
            prompt_token_ids,
        })
    }

    /// A completion stream's first chunk of a choice, when it has something of the prompt to
    /// send: the echoed prompt (and its logprobs), `prompt_logprobs`, the prompt's ids.
    fn completion_opening(&mut self, choice: usize) -> Option<Bytes> {
        let slot = choice / self.opts.n;
        let flags = self.opts.flags;
        if !(flags.echo || flags.prompt_logprobs.is_some() || flags.token_ids) {
            return None;
        }
        let text = self.echo_text(slot).unwrap_or_default().to_string();
        let logprobs = match (flags.echo, flags.echo_logprobs) {
            (true, Some(k)) => Some(self.echo_logprobs(slot, k)),
            _ => None,
        };
        // The generated tokens' offsets follow the echoed text, as in the non-streamed answer.
        self.choices[choice].text_offset = text.chars().count();
        Some(self.completion_chunk(
            vec![CompletionChoice {
                index: choice,
                text,
                logprobs,
                finish_reason: None,
                stop_reason: None,
                prompt_logprobs: self.prompt_logprobs_json(slot),
                prompt_token_ids: self.prompt_ids(slot),
                token_ids: None,
            }],
            self.chunk_usage(),
        ))
    }

    fn completion_chunk(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<Option<UsageInfo>>,
    ) -> Bytes {
        sse::event(&CompletionChunk {
            id: self.meta.id.clone(),
            object: "text_completion".into(),
            created: self.meta.created,
            model: self.meta.model.clone(),
            system_fingerprint: self.meta.system_fingerprint.clone(),
            choices,
            usage,
        })
    }

    /// One chat chunk of a tool-mode choice: content, tool-call fragments or the finish (no
    /// logprobs: the text is not streamed token by token).
    fn tool_mode_chunk(
        &self,
        index: usize,
        content: Option<String>,
        tool_calls: Option<Vec<Value>>,
        finish_reason: Option<String>,
        stop_reason: Option<Value>,
    ) -> Bytes {
        self.chat_chunk(vec![ChatChunkChoice {
            index,
            delta: ChatDelta {
                tool_calls,
                ..ChatDelta::text(content, None)
            },
            logprobs: None,
            finish_reason,
            stop_reason,
            token_ids: None,
        }])
    }

    /// The SSE event for one delta, or `None` when it carries nothing to show.
    fn delta_chunk(
        &mut self,
        choice: usize,
        delta: &ChoiceDelta,
        reasoning: String,
    ) -> Option<Bytes> {
        let finished = delta.finish_reason.is_some();
        let has_ids = self.opts.flags.token_ids && !delta.token_ids.is_empty();
        let quiet = delta.text.is_empty() && reasoning.is_empty() && delta.logprobs.is_empty();
        if quiet && !finished && !has_ids {
            return None;
        }
        let finish_reason = delta.finish_reason.map(|r| r.as_str().to_string());
        let stop_reason = finished.then(|| stop_reason_value(&delta.stop_reason));
        match self.meta.kind {
            Kind::Chat if self.opts.tools.is_some() => {
                // Thinking goes out as it comes; the answer may hold a call and waits.
                let thinking = (!reasoning.is_empty()).then(|| {
                    self.chat_chunk(vec![ChatChunkChoice {
                        index: choice,
                        delta: ChatDelta::text(None, Some(reasoning)),
                        logprobs: None,
                        finish_reason: None,
                        stop_reason: None,
                        token_ids: None,
                    }])
                });
                let answer = self.tool_delta_chunk(choice, delta, finish_reason, stop_reason);
                match (thinking, answer) {
                    (Some(t), Some(a)) => Some([t, a].concat().into()),
                    (t, a) => t.or(a),
                }
            }
            Kind::Chat => {
                let logprobs = self.opts.logprobs.then(|| ChatLogprobs {
                    content: self.chat_logprobs(&delta.logprobs),
                });
                let content = (!delta.text.is_empty()).then(|| delta.text.clone());
                let reasoning = (!reasoning.is_empty()).then_some(reasoning);
                let first = !std::mem::replace(&mut self.choices[choice].opened, true);
                let prompt_logprobs = if first && choice == 0 {
                    self.prompt_logprobs_json(0)
                } else {
                    None
                };
                Some(self.chat_chunk_with(
                    vec![ChatChunkChoice {
                        index: choice,
                        delta: ChatDelta::text(content, reasoning),
                        logprobs,
                        finish_reason,
                        stop_reason,
                        token_ids: self.opts.flags.token_ids.then(|| delta.token_ids.clone()),
                    }],
                    prompt_logprobs,
                    None,
                ))
            }
            Kind::Completion => {
                self.completion_delta_chunk(choice, delta, finish_reason, stop_reason)
            }
        }
    }

    /// A tool-mode choice's answer text: held back while it may be a call.
    fn tool_delta_chunk(
        &mut self,
        choice: usize,
        delta: &ChoiceDelta,
        finish_reason: Option<String>,
        stop_reason: Option<Value>,
    ) -> Option<Bytes> {
        let finished = delta.finish_reason.is_some();
        // Text that may be (part of) a tool call is not content: it is held back until
        // the choice ends, then sent as tool-call deltas, or as content if it is none.
        self.choices[choice].text.push_str(&delta.text);
        let mode = self.opts.tools.as_ref()?;
        if !finished {
            let state = &mut self.choices[choice];
            let safe = mode.content_prefix_len(&state.text);
            if safe <= state.streamed {
                return None;
            }
            let content = state.text[state.streamed..safe].to_string();
            state.streamed = safe;
            return Some(self.tool_mode_chunk(choice, Some(content), None, None, None));
        }
        let text = std::mem::take(&mut self.choices[choice].text);
        let streamed = std::mem::take(&mut self.choices[choice].streamed);
        let parsed = mode.parse_answer(&text);
        let mut out = Vec::new();
        let (rest, finish) = match parsed {
            Some(p) if !p.calls.is_empty() => {
                // Content before the calls that was still held back.
                let rest = p.unsent_content(&text, streamed).to_string();
                if !rest.is_empty() {
                    out.extend_from_slice(&self.tool_mode_chunk(
                        choice,
                        Some(rest),
                        None,
                        None,
                        None,
                    ));
                }
                for (i, call) in p.calls.iter().enumerate() {
                    let head = json!({"index": i, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}});
                    let args = json!({"index": i, "function": {"arguments": call.arguments}});
                    for part in [head, args] {
                        out.extend_from_slice(&self.tool_mode_chunk(
                            choice,
                            None,
                            Some(vec![part]),
                            None,
                            None,
                        ));
                    }
                }
                (None, Some("tool_calls".to_string()))
            }
            _ => (
                text.get(streamed.min(text.len())..).map(str::to_string),
                finish_reason,
            ),
        };
        out.extend_from_slice(&self.tool_mode_chunk(
            choice,
            rest.filter(|t| !t.is_empty()),
            None,
            finish,
            stop_reason,
        ));
        Some(Bytes::from(out))
    }

    /// A completion choice's chunk (its opening first).
    fn completion_delta_chunk(
        &mut self,
        choice: usize,
        delta: &ChoiceDelta,
        finish_reason: Option<String>,
        stop_reason: Option<Value>,
    ) -> Option<Bytes> {
        let mut out = Vec::new();
        if !std::mem::replace(&mut self.choices[choice].opened, true) {
            if let Some(opening) = self.completion_opening(choice) {
                out.extend_from_slice(&opening);
            }
        }
        let logprobs = if self.opts.logprobs {
            let mut offset = self.choices[choice].text_offset;
            let lp = self.completion_logprobs(&delta.logprobs, &mut offset);
            self.choices[choice].text_offset = offset;
            Some(lp)
        } else {
            None
        };
        out.extend_from_slice(&self.completion_chunk(
            vec![CompletionChoice {
                index: choice,
                text: delta.text.clone(),
                logprobs,
                finish_reason,
                stop_reason,
                prompt_logprobs: None,
                prompt_token_ids: None,
                token_ids: self.opts.flags.token_ids.then(|| delta.token_ids.clone()),
            }],
            self.chunk_usage(),
        ));
        Some(Bytes::from(out))
    }

    /// The closing events: the usage chunk (if asked for) and `[DONE]`.
    fn closing_chunks(&self) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(2);
        if self.opts.include_usage {
            let usage = Some(Some(self.usage()));
            out.push(match self.meta.kind {
                Kind::Chat => sse::event(&ChatCompletionChunk {
                    id: self.meta.id.clone(),
                    object: "chat.completion.chunk".into(),
                    created: self.meta.created,
                    model: self.meta.model.clone(),
                    system_fingerprint: self.meta.system_fingerprint.clone(),
                    choices: Vec::new(),
                    usage,
                    prompt_logprobs: None,
                    prompt_token_ids: None,
                }),
                Kind::Completion => self.completion_chunk(Vec::new(), usage),
            });
        }
        out.push(Bytes::from_static(sse::DONE));
        out
    }

    // ----- non-streaming -----

    fn accumulate(&mut self, choice: usize, delta: ChoiceDelta) {
        if self.opts.logprobs && !delta.logprobs.is_empty() {
            match self.meta.kind {
                Kind::Chat => {
                    let lp = self.chat_logprobs(&delta.logprobs);
                    self.choices[choice].chat_logprobs.extend(lp);
                }
                Kind::Completion => {
                    let mut offset = self.choices[choice].text_offset;
                    let lp = self.completion_logprobs(&delta.logprobs, &mut offset);
                    let state = &mut self.choices[choice];
                    state.text_offset = offset;
                    state.completion_logprobs.tokens.extend(lp.tokens);
                    state
                        .completion_logprobs
                        .token_logprobs
                        .extend(lp.token_logprobs);
                    state
                        .completion_logprobs
                        .top_logprobs
                        .extend(lp.top_logprobs);
                    state.completion_logprobs.text_offset.extend(lp.text_offset);
                }
            }
        }
        self.choices[choice].text.push_str(&delta.text);
    }

    /// Await every engine stream to its end and build the JSON response body. Dropping this
    /// future (client gone) drops the streams and aborts the engine requests.
    pub async fn collect(mut self) -> Result<Vec<u8>, ApiError> {
        while let Some((slot, event)) = std::future::poll_fn(|cx| self.poll_event(cx)).await {
            match self.apply(slot, event) {
                Step::Delta {
                    choice,
                    delta,
                    reasoning,
                } => {
                    self.choices[choice].reasoning.push_str(&reasoning);
                    self.accumulate(choice, delta)
                }
                Step::Continue => {}
                Step::Failed(e) => return Err(e),
            }
        }
        let usage = self.usage();
        let meta = self.meta.clone();
        let body = match meta.kind {
            Kind::Chat => serde_json::to_vec(&self.chat_response(meta, usage)),
            Kind::Completion => serde_json::to_vec(&self.completion_response(meta, usage)),
        };
        body.map_err(|e| ApiError::internal(format!("serializing the response failed: {e}")))
    }
}

impl Generation {
    fn chat_response(&mut self, meta: ResponseMeta, usage: UsageInfo) -> ChatCompletionResponse {
        let logprobs = self.opts.logprobs;
        let tools = self.opts.tools.clone();
        let token_ids = self.opts.flags.token_ids;
        let echo = self.echo_text(0).map(str::to_string);
        let prompt_logprobs = self.prompt_logprobs_json(0);
        let prompt_token_ids = self.prompt_ids(0);
        ChatCompletionResponse {
            id: meta.id,
            object: "chat.completion".into(),
            created: meta.created,
            model: meta.model,
            choices: std::mem::take(&mut self.choices)
                .into_iter()
                .enumerate()
                .map(|(index, c)| {
                    let parsed = tools
                        .as_ref()
                        .and_then(|t| t.parse_answer(&c.text))
                        .filter(|p| !p.calls.is_empty());
                    let finish_reason = match &parsed {
                        Some(_) => Some("tool_calls".to_string()),
                        None => c.finish_reason.map(|r| r.as_str().to_string()),
                    };
                    let (content, calls) = match parsed {
                        Some(p) => (p.content, p.calls),
                        None => (Some(c.text), Vec::new()),
                    };
                    let content = match (&echo, content) {
                        (Some(e), Some(t)) => Some(format!("{e}{t}")),
                        (Some(e), None) => Some(e.clone()),
                        (None, c) => c,
                    };
                    // A reasoning model that only thought (cut by max_tokens) has no answer.
                    let reasoned = c.splitter.is_some();
                    let content = content.filter(|t| !(reasoned && t.is_empty()));
                    let reasoning = (!c.reasoning.is_empty()).then_some(c.reasoning);
                    ChatChoice {
                        index,
                        message: ChatMessageOut {
                            role: "assistant".into(),
                            content,
                            refusal: None,
                            tool_calls: calls
                                .iter()
                                .map(crate::tools::ToolCallOut::to_json)
                                .collect(),
                            reasoning_content: reasoning.clone(),
                            reasoning,
                        },
                        logprobs: logprobs.then_some(ChatLogprobs {
                            content: c.chat_logprobs,
                        }),
                        finish_reason,
                        stop_reason: Some(stop_reason_value(&c.stop_reason)),
                        token_ids: token_ids.then_some(c.token_ids),
                    }
                })
                .collect(),
            usage,
            system_fingerprint: meta.system_fingerprint,
            prompt_logprobs,
            prompt_token_ids,
        }
    }

    fn completion_response(&mut self, meta: ResponseMeta, usage: UsageInfo) -> CompletionResponse {
        let logprobs = self.opts.logprobs;
        let flags = self.opts.flags;
        let n = self.opts.n;
        // What each prompt contributes, computed once for its `n` choices.
        let prompts: Vec<_> = (0..self.slots.len())
            .map(|slot| {
                let echo = self.echo_text(slot).unwrap_or_default().to_string();
                let echo_lp = match (flags.echo && logprobs, flags.echo_logprobs) {
                    (true, Some(k)) => Some(self.echo_logprobs(slot, k)),
                    (true, None) => Some(CompletionLogprobs::default()),
                    (false, _) => None,
                };
                (
                    echo,
                    echo_lp,
                    self.prompt_logprobs_json(slot),
                    self.prompt_ids(slot),
                )
            })
            .collect();
        let choices = std::mem::take(&mut self.choices)
            .into_iter()
            .enumerate()
            .map(|(index, c)| {
                let (echo, echo_lp, prompt_logprobs, prompt_token_ids) = &prompts[index / n];
                let mut lp = c.completion_logprobs;
                if let Some(all) = echo_lp {
                    // The prompt's tokens come first; the generated offsets follow the echo.
                    let mut all = all.clone();
                    let shift = echo.chars().count();
                    all.tokens.extend(lp.tokens);
                    all.token_logprobs.extend(lp.token_logprobs);
                    all.top_logprobs.extend(lp.top_logprobs);
                    all.text_offset
                        .extend(lp.text_offset.into_iter().map(|o| o + shift));
                    lp = all;
                }
                CompletionChoice {
                    index,
                    text: if flags.echo {
                        format!("{echo}{}", c.text)
                    } else {
                        c.text
                    },
                    logprobs: logprobs.then_some(lp),
                    finish_reason: c.finish_reason.map(|r| r.as_str().to_string()),
                    stop_reason: Some(stop_reason_value(&c.stop_reason)),
                    prompt_logprobs: prompt_logprobs.clone(),
                    prompt_token_ids: prompt_token_ids.clone(),
                    token_ids: flags.token_ids.then_some(c.token_ids),
                }
            })
            .collect();
        CompletionResponse {
            id: meta.id,
            object: "text_completion".into(),
            created: meta.created,
            model: meta.model,
            choices,
            usage,
            system_fingerprint: meta.system_fingerprint,
        }
    }
}

fn stop_reason_value(r: &Option<StopReason>) -> Value {
    match r {
        None => Value::Null,
        Some(StopReason::Text(s)) => Value::String(s.clone()),
        Some(StopReason::TokenId(id)) => Value::from(*id),
    }
}

/// `-inf` is not JSON: clamp like vLLM does.
fn clamp_logprob(lp: f32) -> f32 {
    if lp.is_nan() || lp < -9999.0 {
        -9999.0
    } else {
        lp
    }
}

/// The raw bytes of a token for logprobs' `bytes`: its UTF-8 text, unless the token is a
/// partial UTF-8 sequence (decoded as U+FFFD), then from the vocabulary entry: a `<0xNN>`
/// byte-fallback token or a GPT-2 byte-level string.
fn token_bytes(text: &str, raw: Option<&str>) -> Vec<u8> {
    if !text.contains('\u{FFFD}') {
        return text.as_bytes().to_vec();
    }
    let Some(raw) = raw else {
        return text.as_bytes().to_vec();
    };
    if let Some(hex) = raw.strip_prefix("<0x").and_then(|r| r.strip_suffix('>')) {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            return vec![b];
        }
    }
    let map = byte_level_map();
    let bytes: Option<Vec<u8>> = raw.chars().map(|c| map.get(&c).copied()).collect();
    bytes.unwrap_or_else(|| text.as_bytes().to_vec())
}

/// GPT-2's byte-to-printable-character table, inverted.
fn byte_level_map() -> &'static HashMap<char, u8> {
    static MAP: OnceLock<HashMap<char, u8>> = OnceLock::new();
    MAP.get_or_init(|| {
        let printable = |b: u32| {
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b)
        };
        let mut map = HashMap::with_capacity(256);
        let mut extra = 0u32;
        for b in 0u32..256 {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            if let Some(c) = char::from_u32(c) {
                map.insert(c, b as u8);
            }
        }
        map
    })
}

/// A streaming response body: pulls engine events when hyper asks for data and turns them into
/// SSE events. Owning the [`Generation`] means a disconnect (hyper drops the body) aborts the
/// engine requests at once; nothing else keeps the streams alive.
pub struct SseBody {
    generation: Generation,
    pending: VecDeque<Bytes>,
    finished: bool,
}

/// Coalesce ready events into frames of at most this many bytes (fewer writes under load).
const MAX_FRAME: usize = 16 * 1024;

impl SseBody {
    /// Start a stream: the chat role chunks are ready to send immediately.
    pub fn new(generation: Generation) -> Self {
        let pending = generation.opening_chunks().into();
        Self {
            generation,
            pending,
            finished: false,
        }
    }

    fn fail(&mut self, err: ApiError) {
        tracing::warn!(id = %self.generation.meta.id, error = %err.message, "stream failed");
        self.generation.abort_all();
        self.pending.push_back(sse::error_event(&err));
        self.pending.push_back(Bytes::from_static(sse::DONE));
        self.finished = true;
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        let mut out = BytesMut::new();
        loop {
            while let Some(b) = this.pending.pop_front() {
                out.extend_from_slice(&b);
            }
            if this.finished || out.len() >= MAX_FRAME {
                break;
            }
            match this.generation.poll_event(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    let closing = this.generation.closing_chunks();
                    this.pending.extend(closing);
                    this.finished = true;
                }
                Poll::Ready(Some((slot, event))) => match this.generation.apply(slot, event) {
                    Step::Delta {
                        choice,
                        delta,
                        reasoning,
                    } => {
                        if let Some(chunk) = this.generation.delta_chunk(choice, &delta, reasoning)
                        {
                            this.pending.push_back(chunk);
                        }
                    }
                    Step::Continue => {}
                    Step::Failed(e) => this.fail(e),
                },
            }
        }
        if !out.is_empty() {
            Poll::Ready(Some(Ok(Frame::data(out.freeze()))))
        } else if this.finished {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.pending.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_json_safe() {
        assert_eq!(clamp_logprob(f32::NEG_INFINITY), -9999.0);
        assert_eq!(clamp_logprob(f32::NAN), -9999.0);
        assert_eq!(clamp_logprob(-1.5), -1.5);
    }

    #[test]
    fn token_bytes_recovers_partial_utf8() {
        assert_eq!(token_bytes("hi", Some("hi")), b"hi".to_vec());
        assert_eq!(token_bytes("\u{FFFD}", Some("<0xE2>")), vec![0xE2]);
        // GPT-2 byte-level: 'â' (U+00E2) stands for byte 0xE2, 'Ģ' (U+0122) for 0x80, 'Ġ' for a space.
        assert_eq!(
            token_bytes("\u{FFFD}", Some("\u{e2}\u{122}")),
            vec![0xE2, 0x80]
        );
        assert_eq!(byte_level_map().get(&'Ġ'), Some(&b' '));
        assert_eq!(byte_level_map().len(), 256);
    }
}
