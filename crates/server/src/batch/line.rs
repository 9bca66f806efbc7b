//! One batch line, run exactly like a live request: the body goes through the endpoint's own
//! handler (validation, template, constraints, the engine) as a background, non-streaming
//! request, and the response becomes an OpenAI batch output line.

use std::sync::Arc;

use hyper::StatusCode;
use serde_json::{json, Value};

use super::input::BatchEndpoint;
use super::new_id;
use super::store::LineOutcome;
use crate::handlers::{self, Origin};
use crate::response::ApiBody;
use crate::state::AppState;

/// What running a line gave.
pub(crate) enum LineResult {
    /// A response to record: the outcome and the output line (JSON text).
    Answered(LineOutcome, String),
    /// The server could not take the line now (engine overloaded, draining or dead): leave it
    /// pending and try again later; nothing is recorded.
    Retry(String),
}

/// Run one line's body against `endpoint`.
pub(crate) async fn run_line(
    state: &Arc<AppState>,
    endpoint: BatchEndpoint,
    custom_id: &str,
    body: &[u8],
) -> LineResult {
    let answered = match endpoint {
        BatchEndpoint::ChatCompletions => {
            handlers::chat_completions(state, body, Origin::Batch, None).await
        }
        BatchEndpoint::Completions => handlers::completions(state, body, Origin::Batch, None).await,
        BatchEndpoint::Embeddings => crate::embeddings::embeddings(state, body).await,
    };
    let (status, body) = match answered {
        Ok(resp) => {
            let status = resp.status();
            let body = match resp.into_body() {
                ApiBody::Full(Some(bytes)) => serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into())),
                ApiBody::Full(None) => Value::Null,
                // Batch lines never stream (refused with a 400 before this point).
                ApiBody::Sse(_) | ApiBody::Events(_) | ApiBody::Messages(_) => Value::Null,
            };
            (status, body)
        }
        Err(e) => {
            if matches!(
                e.status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            ) {
                return LineResult::Retry(e.message);
            }
            let body = serde_json::to_value(e.body()).unwrap_or(Value::Null);
            (e.status, body)
        }
    };
    let outcome = if status.is_success() {
        LineOutcome::Succeeded
    } else {
        LineOutcome::Failed
    };
    LineResult::Answered(outcome, output_line(custom_id, status.as_u16(), body))
}

/// OpenAI's output line for a request that got a response (2xx or an error status).
pub(crate) fn output_line(custom_id: &str, status_code: u16, body: Value) -> String {
    let request_id = body
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| new_id("req_"));
    json!({
        "id": new_id("batch_req_"),
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": request_id, "body": body},
        "error": null,
    })
    .to_string()
}

/// OpenAI's error-file line for a request that got no response (the batch expired first).
pub(crate) fn no_response_line(custom_id: &str, code: &str, message: &str) -> String {
    json!({
        "id": new_id("batch_req_"),
        "custom_id": custom_id,
        "response": null,
        "error": {"code": code, "message": message},
    })
    .to_string()
}
