//! Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`), for Claude-style
//! clients and tools (the official `anthropic` SDK, agent frameworks built on it). A request
//! becomes a chat request and runs through the chat pipeline (templates, tool modes, the
//! reasoning split: one generation path, `convert.rs`); the answer is told as content blocks,
//! or streamed as Anthropic's events (`events.rs`). Errors take Anthropic's shape
//! (`{"type": "error", "error": {"type", "message"}}`), and `x-api-key` is accepted as the key.

pub mod convert;
mod events;

use std::sync::Arc;

use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::handlers::{chat_generation, chat_prompt_tokens, Origin};
use crate::response::{event_stream_response, json_response, ok_json, ApiBody};
use crate::state::AppState;
use crate::stream::SseBody;
use convert::MessagesRequest;

/// The streaming body of a Messages answer.
pub type MessageEventsBody = events::MessageEvents;

/// `POST /v1/messages`.
pub(crate) async fn create(
    state: &Arc<AppState>,
    body: &[u8],
) -> Result<Response<ApiBody>, ApiError> {
    let req: MessagesRequest = crate::validation::parse_json(body)?;
    let chat = convert::chat_request(&req, false)?;
    let chat = serde_json::to_vec(&chat)
        .map_err(|e| ApiError::internal(format!("building the chat request failed: {e}")))?;
    let (generation, stream) = chat_generation(state, &chat, Origin::Http, None).await?;
    let model =
        crate::validation::resolve_model(req.model.as_deref(), &state.cfg.served_model_names)?;
    let id = convert::new_id("msg");
    if stream {
        let events = events::MessageEvents::new(SseBody::new(generation), id, model);
        return Ok(event_stream_response(ApiBody::Messages(Box::new(events))));
    }
    let body = generation.collect().await?;
    let chat: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::internal(format!("reading the chat answer failed: {e}")))?;
    let choice = &chat["choices"][0];
    let (stop_reason, stop_sequence) =
        convert::stop_reason(&choice["finish_reason"], &choice["stop_reason"]);
    ok_json(&json!({
        "id": id, "type": "message", "role": "assistant", "model": model,
        "content": convert::content_blocks(&choice["message"]),
        "stop_reason": stop_reason, "stop_sequence": stop_sequence,
        "usage": convert::usage(&chat["usage"]),
    }))
}

/// `POST /v1/messages/count_tokens`: the prompt's tokens as the template renders it.
pub(crate) async fn count_tokens(
    state: &Arc<AppState>,
    body: &[u8],
) -> Result<Response<ApiBody>, ApiError> {
    let req: MessagesRequest = crate::validation::parse_json(body)?;
    let chat = convert::chat_request(&req, true)?;
    let chat = serde_json::to_vec(&chat)
        .map_err(|e| ApiError::internal(format!("building the chat request failed: {e}")))?;
    let n = chat_prompt_tokens(state, &chat).await?;
    ok_json(&json!({"input_tokens": n}))
}

/// An error in Anthropic's shape, with its type for the status.
pub(crate) fn error_response(e: &ApiError) -> Response<ApiBody> {
    let kind = match e.status {
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::FORBIDDEN => "permission_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
        s if s.is_client_error() => "invalid_request_error",
        _ => "api_error",
    };
    let message = match e.param.as_deref() {
        Some(p) if !e.message.contains(p) => format!("{p}: {}", e.message),
        _ => e.message.clone(),
    };
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    let mut r = json_response(e.status, body.to_string().into_bytes());
    if let Some(retry) = e.retry_after {
        if let Ok(v) = hyper::header::HeaderValue::from_str(&retry.to_string()) {
            r.headers_mut().insert(hyper::header::RETRY_AFTER, v);
        }
    }
    r
}
