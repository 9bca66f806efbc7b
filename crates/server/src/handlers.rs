//! Endpoint logic: parse and validate, tokenize off the async runtime, submit to the engine,
//! and answer with JSON or an SSE stream.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use spindle_engine::{GenerateRequest, ModelKind};
use spindle_model::TokenizerBundle;

use crate::error::ApiError;
use crate::fields::Endpoint;
use crate::ids::{random_id, unix_now};
use crate::pool::blocking;
use crate::protocol::{
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse, ModelCard,
    ModelList, TokenizeRequest, TokenizeResponse, VersionResponse,
};
use crate::response::{error_response, json_response, ok_json, sse_response, ApiBody};
use crate::state::AppState;
use crate::stream::SseBody;
use crate::stream::{Generation, Kind, OutputOptions, PromptInfo, ResponseMeta};
use crate::template::{normalize_messages, RenderOptions};
use crate::validation::{
    build_request, chat_params, completion_params, detokenize_ids, parse_json, parse_prompt,
    parse_request, resolve_model, PromptInput, Validated,
};

fn encode(
    tok: &TokenizerBundle,
    text: &str,
    add_special_tokens: bool,
) -> Result<Vec<u32>, ApiError> {
    tok.encode(text, add_special_tokens)
        .map_err(ApiError::tokenization_failed)
}

/// Render the chat template and tokenize, on the blocking pool.
async fn chat_prompt_ids(
    state: &AppState,
    messages: Option<&serde_json::Value>,
    opts: RenderOptions,
    add_special_tokens: bool,
) -> Result<Vec<u32>, ApiError> {
    let messages = normalize_messages(messages)?;
    render_and_encode(state, messages, opts, add_special_tokens).await
}

async fn render_and_encode(
    state: &AppState,
    messages: Vec<serde_json::Value>,
    opts: RenderOptions,
    add_special_tokens: bool,
) -> Result<Vec<u32>, ApiError> {
    let template = state.template.clone().map_err(ApiError::bad_request)?;
    let tok = state.engine.tokenizer().clone();
    blocking(move || {
        let text = template.render(&messages, &opts)?;
        encode(&tok, &text, add_special_tokens)
    })
    .await
}

/// Tokenize `bad_words` as vLLM does: each word alone and after a space (how it appears
/// mid-text), without special tokens.
async fn tokenize_bad_words(state: &AppState, validated: &mut Validated) -> Result<(), ApiError> {
    if validated.bad_words.is_empty() {
        return Ok(());
    }
    let words = validated.bad_words.clone();
    let tok = state.engine.tokenizer().clone();
    let ids = blocking(move || {
        let mut out: Vec<Vec<u32>> = Vec::new();
        for w in &words {
            let mut forms = vec![w.clone()];
            if !w.starts_with(' ') {
                forms.push(format!(" {w}"));
            }
            for f in forms {
                let ids = encode(&tok, &f, false)?;
                if !ids.is_empty() && !out.contains(&ids) {
                    out.push(ids);
                }
            }
        }
        Ok(out)
    })
    .await?;
    validated.params.bad_words = ids;
    Ok(())
}

/// The response id: `{prefix}-{id}` for a caller-chosen id (`X-Request-Id` first, then the
/// body's `request_id`, as vLLM), else a random one.
fn response_id(prefix: &str, header_id: Option<&str>, validated: &Validated) -> String {
    match header_id.or(validated.request_id.as_deref()) {
        Some(id) => format!("{prefix}-{id}"),
        None => random_id(prefix),
    }
}

fn render_options(
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    tools: Option<serde_json::Value>,
    extra: Option<serde_json::Map<String, serde_json::Value>>,
) -> RenderOptions {
    let continue_final = continue_final_message.unwrap_or(false);
    RenderOptions {
        // Continuing the last message implies no generation prompt unless explicitly asked.
        add_generation_prompt: add_generation_prompt.unwrap_or(!continue_final),
        continue_final_message: continue_final,
        tools,
        extra,
    }
}

/// A 400 for generation requests to an embedding model.
fn require_generative_model(state: &AppState, endpoint: &str) -> Result<(), ApiError> {
    match state.engine.model_kind() {
        ModelKind::Generate => Ok(()),
        ModelKind::Embed { .. } => Err(ApiError::bad_request(format!(
            "The served model is an embedding model: it does not generate text, so {endpoint} is not available. Use /v1/embeddings, /v1/rerank or /v1/score."
        ))),
    }
}

/// Who sent a request: a live HTTP client, or a batch job running it in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Http,
    /// A line of a batch job: never streamed, served only on capacity interactive requests
    /// leave idle.
    Batch,
}

/// Refuse `stream: true` in a batch line (a batch answers with whole response bodies).
fn check_origin(origin: Origin, validated: &Validated) -> Result<(), ApiError> {
    if origin == Origin::Batch && validated.stream {
        return Err(ApiError::invalid_param(
            "stream",
            "Streaming is not supported in batch jobs.",
        ));
    }
    Ok(())
}

/// `POST /v1/chat/completions`. `header_id` is the client's `X-Request-Id`.
pub(crate) async fn chat_completions(
    state: &Arc<AppState>,
    body: &[u8],
    origin: Origin,
    header_id: Option<&str>,
) -> Result<Response<ApiBody>, ApiError> {
    let (generation, stream) = chat_generation(state, body, origin, header_id).await?;
    answer(generation, stream).await
}

/// A chat request submitted to the engine: its [`Generation`] and whether it streams (the
/// Responses API answers from it in its own shapes).
pub(crate) async fn chat_generation(
    state: &Arc<AppState>,
    body: &[u8],
    origin: Origin,
    header_id: Option<&str>,
) -> Result<(Generation, bool), ApiError> {
    let ChatInput {
        model,
        mut validated,
        ids,
        echo,
    } = chat_input(state, body, "/v1/chat/completions").await?;
    check_origin(origin, &validated)?;
    tokenize_bad_words(state, &mut validated).await?;
    let id = response_id("chatcmpl", header_id, &validated);
    let request = build_request(id.clone(), ids, &validated.params, state.limits, "messages")?;
    let requests = constrain(state, &validated, vec![request]).await?;
    let echo = echo.filter(|_| validated.output.echo);
    let prompts = requests.into_iter().map(|r| (r, echo.clone())).collect();
    begin(state, Kind::Chat, id, model, validated, prompts, origin)
}

/// `POST /v1/completions`. `header_id` is the client's `X-Request-Id`.
pub(crate) async fn completions(
    state: &Arc<AppState>,
    body: &[u8],
    origin: Origin,
    header_id: Option<&str>,
) -> Result<Response<ApiBody>, ApiError> {
    let (req, model, mut validated) = completion_input(state, body, "/v1/completions")?;
    check_origin(origin, &validated)?;
    tokenize_bad_words(state, &mut validated).await?;
    let (all_ids, echo) = completion_prompt_ids(state, &req, &validated).await?;
    let id = response_id("cmpl", header_id, &validated);
    let multi = all_ids.len() > 1;
    let mut requests = Vec::with_capacity(all_ids.len());
    for (i, ids) in all_ids.into_iter().enumerate() {
        let request_id = if multi {
            format!("{id}-{i}")
        } else {
            id.clone()
        };
        requests.push(build_request(
            request_id,
            ids,
            &validated.params,
            state.limits,
            "prompt",
        )?);
    }
    let requests = constrain(state, &validated, requests).await?;
    let prompts = requests.into_iter().zip(echo).collect();
    let (generation, stream) = begin(
        state,
        Kind::Completion,
        id,
        model,
        validated,
        prompts,
        origin,
    )?;
    answer(generation, stream).await
}

/// A completion request parsed and validated (with the server's sampling defaults): the
/// request, the served model name and the validated parameters.
fn completion_input(
    state: &AppState,
    body: &[u8],
    endpoint: &str,
) -> Result<(CompletionRequest, String, Validated), ApiError> {
    let req: CompletionRequest = parse_request(body, Endpoint::Completions)?;
    let model = resolve_model(req.model.as_deref(), &state.cfg.served_model_names)?;
    require_generative_model(state, endpoint)?;
    let mut validated = completion_params(&req, state.limits, state.engine.scheduling_policy())?;
    state
        .cfg
        .defaults
        .apply(&req.common, req.common.max_tokens.is_some(), &mut validated);
    Ok((req, model, validated))
}

/// Where a reasoning model's prompt leaves it (judged from the prompt's last tokens) and its
/// end-of-thinking marker.
fn reasoning_request(
    state: &AppState,
    parser: crate::reasoning::ReasoningParser,
    prompt: &[u32],
    include: bool,
) -> Result<crate::validation::ReasoningRequest, ApiError> {
    const TAIL_TOKENS: usize = 8;
    let tok = state.engine.tokenizer();
    let tail = tok
        .decode(&prompt[prompt.len().saturating_sub(TAIL_TOKENS)..], false)
        .map_err(ApiError::tokenization_failed)?;
    Ok(crate::validation::ReasoningRequest {
        parser,
        state: parser.prompt_state(&tail),
        include,
        end_marker: parser.end_marker(),
    })
}

/// A chat request parsed, validated and rendered to token ids.
struct ChatInput {
    /// The served model name.
    model: String,
    validated: Validated,
    /// The prompt.
    ids: Vec<u32>,
    /// The last message's text if it is the assistant's (what `echo` repeats).
    echo: Option<String>,
}

async fn chat_input(state: &AppState, body: &[u8], endpoint: &str) -> Result<ChatInput, ApiError> {
    let req: ChatCompletionRequest = parse_request(body, Endpoint::ChatCompletions)?;
    let model = resolve_model(req.model.as_deref(), &state.cfg.served_model_names)?;
    require_generative_model(state, endpoint)?;
    let mut validated = chat_params(
        &req,
        state.limits,
        state.engine.scheduling_policy(),
        state.cfg.tool_call_parser,
    )?;
    let asked_max = req.common.max_tokens.is_some() || req.max_completion_tokens.is_some();
    state
        .cfg
        .defaults
        .apply(&req.common, asked_max, &mut validated);
    let mut extra = req.chat_template_kwargs.clone().unwrap_or_default();
    for (name, value) in [
        ("reasoning_effort", &req.reasoning_effort),
        ("documents", &req.documents),
    ] {
        if let Some(v) = value.as_ref().filter(|v| !v.is_null()) {
            extra.entry(name.to_string()).or_insert_with(|| v.clone());
        }
    }
    let opts = render_options(
        req.add_generation_prompt,
        req.continue_final_message,
        req.tools.clone(),
        (!extra.is_empty()).then_some(extra),
    );
    let messages = normalize_messages(req.messages.as_ref())?;
    let echo = messages
        .last()
        .filter(|m| m.get("role").and_then(serde_json::Value::as_str) == Some("assistant"))
        .and_then(|m| m.get("content").and_then(serde_json::Value::as_str))
        .map(str::to_string);
    let mut ids = render_and_encode(
        state,
        messages,
        opts,
        req.add_special_tokens.unwrap_or(false),
    )
    .await?;
    if let Some(t) = validated.truncation {
        t.apply(&mut ids, state.limits.max_model_len);
    }
    if let Some(parser) = state.cfg.reasoning_parser {
        if parser.needs_special_tokens() {
            // The channels are marked by special tokens the splitter must see.
            validated.params.skip_special_tokens = false;
        }
        validated.reasoning = Some(reasoning_request(
            state,
            parser,
            &ids,
            req.include_reasoning.unwrap_or(true),
        )?);
    }
    Ok(ChatInput {
        model,
        validated,
        ids,
        echo,
    })
}

/// The token ids of every prompt of a completion request (text tokenized on the blocking pool,
/// then truncated if asked), and with `echo` the text each prompt echoes: a text prompt as
/// given, token ids decoded (after truncation, the kept tokens).
async fn completion_prompt_ids(
    state: &AppState,
    req: &CompletionRequest,
    validated: &Validated,
) -> Result<(Vec<Vec<u32>>, Vec<Option<String>>), ApiError> {
    let prompts = parse_prompt(req.prompt.as_ref(), state.limits.vocab_size)?;
    let add_special = req.add_special_tokens.unwrap_or(true);
    let tok = state.engine.tokenizer().clone();
    let (truncation, echo) = (validated.truncation, validated.output.echo);
    let max_model_len = state.limits.max_model_len;
    blocking(move || {
        let mut all = Vec::with_capacity(prompts.len());
        let mut texts = Vec::with_capacity(prompts.len());
        for p in prompts {
            let (mut ids, text) = match p {
                PromptInput::Text(t) => (encode(&tok, &t, add_special)?, Some(t)),
                PromptInput::Tokens(ids) => (ids, None),
            };
            let before = ids.len();
            if let Some(t) = truncation {
                t.apply(&mut ids, max_model_len);
            }
            let text = match text {
                Some(t) if ids.len() == before => t,
                _ if echo => tok
                    .decode(&ids, false)
                    .map_err(ApiError::tokenization_failed)?,
                _ => String::new(),
            };
            texts.push(echo.then_some(text));
            all.push(ids);
        }
        Ok((all, texts))
    })
    .await
}

/// vLLM's render result for one prompt: the token ids a token-in engine would take.
fn rendered(id: String, model: &str, ids: Vec<u32>, validated: &Validated) -> serde_json::Value {
    let p = &validated.params;
    serde_json::json!({
        "request_id": id,
        "model": model,
        "token_ids": ids,
        "sampling_params": {
            "n": p.n,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": if p.top_k == 0 { -1 } else { p.top_k as i64 },
            "max_tokens": p.max_tokens,
            "seed": p.seed,
        },
    })
}

/// `POST /v1/completions/render` (vLLM's renderer API): the prompts as token ids, one
/// entry per prompt, without running the model. Cache-aware routers call it to compute the
/// KV block hashes of a request before picking a replica.
pub(crate) async fn render_completions(
    state: &Arc<AppState>,
    body: &[u8],
) -> Result<Response<ApiBody>, ApiError> {
    let (req, model, validated) = completion_input(state, body, "/v1/completions/render")?;
    let (all_ids, _) = completion_prompt_ids(state, &req, &validated).await?;
    let id = random_id("cmpl");
    let out: Vec<serde_json::Value> = all_ids
        .into_iter()
        .enumerate()
        .map(|(i, ids)| rendered(format!("{id}-{i}"), &model, ids, &validated))
        .collect();
    ok_json(&out)
}

/// The token count of a chat request's rendered prompt (Anthropic's `count_tokens`).
pub(crate) async fn chat_prompt_tokens(
    state: &Arc<AppState>,
    body: &[u8],
) -> Result<usize, ApiError> {
    Ok(chat_input(state, body, "/v1/messages/count_tokens")
        .await?
        .ids
        .len())
}

/// `POST /v1/chat/completions/render` (vLLM's renderer API): the rendered chat prompt as
/// token ids, without running the model.
pub(crate) async fn render_chat(
    state: &Arc<AppState>,
    body: &[u8],
) -> Result<Response<ApiBody>, ApiError> {
    let input = chat_input(state, body, "/v1/chat/completions/render").await?;
    ok_json(&rendered(
        random_id("chatcmpl"),
        &input.model,
        input.ids,
        &input.validated,
    ))
}

/// Compile the request's constraint (if any) off the runtime and attach a copy to every prompt.
async fn constrain(
    state: &AppState,
    validated: &Validated,
    requests: Vec<GenerateRequest>,
) -> Result<Vec<GenerateRequest>, ApiError> {
    let Some(requested) = validated.constraint.clone() else {
        return Ok(requests);
    };
    // A reasoning model thinks freely first; the constraint applies to its answer.
    let after = match validated.reasoning.as_ref() {
        Some(r) if r.state.gates_constraints() => r.end_marker,
        _ => "",
    };
    let constraint = crate::structured::compile(
        state.compiler.as_ref(),
        requested.spec,
        requested.param,
        after,
    )
    .await?;
    Ok(requests
        .into_iter()
        .map(|r| r.with_constraint(constraint.clone()))
        .collect())
}

/// Answer from a submitted generation: an SSE stream, or the collected JSON body.
async fn answer(generation: Generation, stream: bool) -> Result<Response<ApiBody>, ApiError> {
    if stream {
        Ok(sse_response(SseBody::new(generation)))
    } else {
        let body = generation.collect().await?;
        Ok(json_response(StatusCode::OK, body))
    }
}

/// Submit every prompt (each with the text `echo` repeats) to the engine. If any submission
/// fails the ones already submitted are dropped, which aborts them.
fn begin(
    state: &Arc<AppState>,
    kind: Kind,
    id: String,
    model: String,
    validated: Validated,
    prompts: Vec<(GenerateRequest, Option<String>)>,
    origin: Origin,
) -> Result<(Generation, bool), ApiError> {
    // The prompt's ids are kept only for what the response repeats of them.
    let keep_ids = validated.output.token_ids || validated.output.echo_logprobs.is_some();
    let mut streams = Vec::with_capacity(prompts.len());
    for (request, echo) in prompts {
        let mut request = match origin {
            Origin::Http => request.with_priority(validated.priority),
            Origin::Batch => request.with_priority(validated.priority).in_background(),
        };
        if let Some(salt) = &validated.cache_salt {
            request = request.with_cache_salt(salt.as_str());
        }
        let prompt = PromptInfo {
            len: request.prompt_token_ids().len(),
            ids: keep_ids.then(|| request.prompt_token_ids().to_vec()),
            echo,
        };
        streams.push((state.engine.generate(request)?, prompt));
    }
    tracing::debug!(%id, prompts = streams.len(), stream = validated.stream, "request submitted");
    let generation = Generation::new(
        ResponseMeta {
            kind,
            id,
            created: unix_now(),
            model,
            system_fingerprint: Some(state.fingerprint.clone()),
        },
        OutputOptions {
            n: validated.params.n,
            logprobs: validated.params.logprobs.is_some(),
            include_usage: validated.include_usage,
            continuous_usage: validated.continuous_usage,
            tools: validated.tools.clone(),
            flags: validated.output,
            reasoning: validated.reasoning.clone(),
        },
        streams,
        state.engine.tokenizer().clone(),
        state.metrics.clone(),
    );
    Ok((generation, validated.stream))
}

/// `POST /tokenize` (vLLM shape).
pub(crate) async fn tokenize(
    state: &Arc<AppState>,
    body: &[u8],
) -> Result<Response<ApiBody>, ApiError> {
    let req: TokenizeRequest = parse_json(body)?;
    resolve_model(req.model.as_deref(), &state.cfg.served_model_names)?;
    let tok = state.engine.tokenizer().clone();
    let ids = match (&req.messages, &req.prompt) {
        (Some(_), _) => {
            let opts = render_options(
                req.add_generation_prompt,
                req.continue_final_message,
                req.tools.clone(),
                req.chat_template_kwargs.clone(),
            );
            chat_prompt_ids(
                state,
                req.messages.as_ref(),
                opts,
                req.add_special_tokens.unwrap_or(false),
            )
            .await?
        }
        (None, Some(serde_json::Value::String(text))) => {
            let text = text.clone();
            let add_special = req.add_special_tokens.unwrap_or(true);
            let tok = tok.clone();
            blocking(move || encode(&tok, &text, add_special)).await?
        }
        (None, Some(_)) => {
            return Err(ApiError::invalid_param(
                "prompt",
                "`prompt` must be a string.",
            ))
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "Either `prompt` or `messages` is required.",
            ));
        }
    };
    let token_strs = req.return_token_strs.unwrap_or(false).then(|| {
        ids.iter()
            .map(|&id| tok.id_to_token(id).unwrap_or_default())
            .collect()
    });
    ok_json(&TokenizeResponse {
        count: ids.len(),
        max_model_len: state.limits.max_model_len,
        tokens: ids,
        token_strs,
    })
}

/// `POST /detokenize` (vLLM shape).
pub(crate) async fn detokenize(
    state: &Arc<AppState>,
    body: &[u8],
) -> Result<Response<ApiBody>, ApiError> {
    let req: DetokenizeRequest = parse_json(body)?;
    resolve_model(req.model.as_deref(), &state.cfg.served_model_names)?;
    let ids = detokenize_ids(req.tokens.as_deref(), state.limits.vocab_size)?;
    let tok = state.engine.tokenizer().clone();
    let prompt = blocking(move || {
        tok.decode(&ids, false)
            .map_err(|e| ApiError::invalid_param("tokens", format!("Detokenization failed: {e}")))
    })
    .await?;
    ok_json(&DetokenizeResponse { prompt })
}

fn model_card(state: &AppState, id: &str) -> ModelCard {
    ModelCard {
        id: id.to_string(),
        object: "model".into(),
        created: state.created,
        owned_by: "spindle".into(),
        root: state.cfg.model_root.clone(),
        parent: None,
        max_model_len: state.limits.max_model_len,
    }
}

/// `GET /v1/models`.
pub(crate) fn models(state: &AppState) -> Response<ApiBody> {
    let list = ModelList {
        object: "list".into(),
        data: state
            .cfg
            .served_model_names
            .iter()
            .map(|n| model_card(state, n))
            .collect(),
    };
    ok_json(&list).unwrap_or_else(|e| error_response(&e))
}

/// `GET /v1/models/{id}` (the SDK's `models.retrieve`).
pub(crate) fn model(state: &AppState, id: &str) -> Result<Response<ApiBody>, ApiError> {
    if !state.cfg.served_model_names.iter().any(|n| n == id) {
        return Err(ApiError::model_not_found(id));
    }
    ok_json(&model_card(state, id))
}

/// `GET /health`: 200 with an empty body only while the engine thread is alive and making
/// progress (its heartbeat is recent) and the server is not shutting down.
pub(crate) fn health(state: &AppState) -> Response<ApiBody> {
    if state.shutting_down.load(Ordering::SeqCst) {
        return error_response(&ApiError::shutting_down());
    }
    if state.engine.is_healthy(state.cfg.stall_timeout) {
        let mut r = Response::new(ApiBody::empty());
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        r
    } else {
        let reason = if state.engine.is_dead() {
            "The engine is not running."
        } else {
            "The engine is stalled."
        };
        error_response(&ApiError::new(StatusCode::SERVICE_UNAVAILABLE, reason))
    }
}

/// `GET /tokenizer_info` (vLLM's `--enable-tokenizer-info-endpoint`): the special tokens and
/// chat template, so clients such as lm-eval tokenize through `/tokenize` with the served
/// model's own tokenizer instead of downloading one.
pub(crate) fn tokenizer_info(state: &AppState) -> Result<Response<ApiBody>, ApiError> {
    let tok = state.engine.tokenizer();
    ok_json(&serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": serde_json::Value::Null,
        "chat_template": tok.chat_template,
        "model_max_length": state.limits.max_model_len,
    }))
}

/// `GET /version`.
pub(crate) fn version() -> Response<ApiBody> {
    ok_json(&VersionResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
    })
    .unwrap_or_else(|e| error_response(&e))
}

/// `GET /metrics`: Prometheus text format.
pub(crate) fn metrics(state: &AppState) -> Response<ApiBody> {
    let text = state.metrics.render(state.engine.stats());
    let mut r = Response::new(ApiBody::full(text));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}
