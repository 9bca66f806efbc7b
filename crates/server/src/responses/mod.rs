//! OpenAI's Responses API (`/v1/responses`), as the OpenAI Agents SDK and Codex speak it. A
//! request is turned into a chat request and runs through the chat pipeline (validation,
//! template, tool modes, reasoning split, structured outputs: one generation path for both
//! APIs, `convert.rs`); the answer is told as output items, or streamed as Responses events
//! (`events.rs`). With `store` (the default) a response is kept in SQLite under `--data-dir`
//! (`store.rs`) so `previous_response_id` continues its conversation, and
//! `GET`/`DELETE /v1/responses/{id}` and `GET /v1/responses/{id}/input_items` find it.

pub mod convert;
mod events;
pub mod store;

use std::sync::Arc;

use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::handlers::{chat_generation, Origin};
use crate::ids::unix_now;
use crate::pool::blocking;
use crate::response::{event_stream_response, ok_json, ApiBody};
use crate::state::AppState;
use crate::stream::SseBody;
use convert::{Echo, ResponsesRequest, Status};
use store::{put, store_error, ResponseStore, Storage, Stored};

/// The streaming body of a Responses API answer.
pub type ResponseEventsBody = events::ResponseEvents;

type Running = std::collections::HashMap<String, tokio::task::AbortHandle>;

/// Background responses still running, by id (`POST .../cancel` aborts them).
#[derive(Debug, Default)]
pub struct Background(std::sync::Mutex<Running>);

impl Background {
    fn lock(&self) -> std::sync::MutexGuard<'_, Running> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn not_found(id: &str) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::NOT_FOUND,
        format!("Response with id '{id}' not found."),
    );
    e.param = Some("response_id".into());
    e
}

/// A chat-pipeline error naming the Responses field the client wrote.
fn responses_param(mut e: ApiError) -> ApiError {
    let renamed = match e.param.as_deref() {
        Some("max_completion_tokens" | "max_tokens") => "max_output_tokens",
        Some("messages") => "input",
        Some("response_format") => "text.format",
        Some("reasoning_effort") => "reasoning.effort",
        Some("top_logprobs" | "logprobs") => "top_logprobs",
        _ => return e,
    };
    e.message = e
        .message
        .replace("max_completion_tokens", "max_output_tokens")
        .replace("`response_format`", "`text.format`");
    e.param = Some(renamed.into());
    e
}

/// The stored response `id`, or a 404 (also when nothing is stored: no `--data-dir`).
async fn load(state: &AppState, id: &str) -> Result<(Arc<ResponseStore>, Stored), ApiError> {
    let store = state.responses.clone().ok_or_else(|| not_found(id))?;
    let (s, key) = (store.clone(), id.to_string());
    let stored = blocking(move || s.get(&key).map_err(store_error)).await?;
    Ok((store, stored.ok_or_else(|| not_found(id))?))
}

/// This request's input as items with ids (what `input_items` lists).
fn input_items(input: &Value) -> Vec<Value> {
    match input {
        Value::String(s) => vec![
            json!({"type": "message", "id": convert::item_id("msg"), "role": "user",
            "content": [{"type": "input_text", "text": s}]}),
        ],
        Value::Array(items) => items
            .iter()
            .map(|i| {
                let mut i = i.clone();
                if i.get("type").is_none() {
                    i["type"] = json!("message");
                }
                if i.get("id").is_none() {
                    i["id"] = json!(convert::item_id("msg"));
                }
                i
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// `POST /v1/responses`.
pub(crate) async fn create(
    state: &Arc<AppState>,
    body: &[u8],
    header_id: Option<&str>,
) -> Result<Response<ApiBody>, ApiError> {
    let req: ResponsesRequest = crate::validation::parse_json(body)?;
    convert::check_fields(&req)?;
    let history = match req.previous_response_id.as_deref() {
        None => Vec::new(),
        Some(id) => {
            let (_, stored) = load(state, id).await.map_err(|mut e| {
                e.param = Some("previous_response_id".into());
                e
            })?;
            let mut conversation = stored.conversation;
            let output = stored.response["output"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            conversation.extend(convert::output_messages(&output)?);
            conversation
        }
    };
    let (chat, conversation) = convert::chat_request(&req, history)?;
    let chat = serde_json::to_vec(&chat)
        .map_err(|e| ApiError::internal(format!("building the chat request failed: {e}")))?;
    let background = req.background == Some(true);
    if background && state.responses.is_none() {
        return Err(ApiError::invalid_param(
            "background",
            "`background: true` needs the response store (--data-dir).",
        ));
    }
    // Background responses run on the lane batch jobs use: after interactive requests.
    let origin = if background {
        Origin::Batch
    } else {
        Origin::Http
    };
    let (generation, stream) = chat_generation(state, &chat, origin, header_id)
        .await
        .map_err(responses_param)?;
    let model =
        crate::validation::resolve_model(req.model.as_deref(), &state.cfg.served_model_names)?;
    let echo = Echo::of(&req, model);
    let (id, created_at) = (convert::item_id("resp"), unix_now());
    let storage = match (echo.store, state.responses.clone()) {
        (true, Some(store)) => Some(Storage {
            store,
            conversation,
            input_items: input_items(req.input.as_ref().unwrap_or(&Value::Null)),
        }),
        _ => None,
    };
    if stream {
        let events =
            events::ResponseEvents::new(SseBody::new(generation), id, created_at, echo, storage);
        return Ok(event_stream_response(ApiBody::Events(Box::new(events))));
    }
    if !background {
        let response = finished(&id, created_at, &echo, generation.collect().await)?;
        if let Some(s) = storage {
            s.save(id, created_at, response.clone()).await?;
        }
        return ok_json(&response);
    }
    // Background: stored as queued now, completed (or failed) by a task the client polls.
    let Some(storage) = storage else {
        return Err(ApiError::internal(
            "a background response without its store",
        ));
    };
    let queued = convert::response_object(&id, created_at, &echo, Status::Queued, &[], None);
    storage
        .clone()
        .save(id.clone(), created_at, queued.clone())
        .await?;
    let (task_state, task_id, unfinished) = (state.clone(), id.clone(), queued.clone());
    // The registry is locked while the task is spawned and registered, so a task that ends
    // at once cannot remove its entry before it exists.
    let mut running = state.background_responses.lock();
    let task = tokio::spawn(async move {
        let response = finished(&task_id, created_at, &echo, generation.collect().await)
            .unwrap_or_else(|e| convert::failed(unfinished, json!(e.message)));
        if let Err(e) = storage.save(task_id.clone(), created_at, response).await {
            tracing::warn!(id = %task_id, error = %e.message, "storing a background response failed");
        }
        task_state.background_responses.lock().remove(&task_id);
    });
    running.insert(id, task.abort_handle());
    drop(running);
    ok_json(&queued)
}

/// The response object of a finished generation (its collected chat answer).
fn finished(
    id: &str,
    created_at: u64,
    echo: &Echo,
    body: Result<Vec<u8>, ApiError>,
) -> Result<Value, ApiError> {
    let chat: Value = serde_json::from_slice(&body?)
        .map_err(|e| ApiError::internal(format!("reading the chat answer failed: {e}")))?;
    let choice = &chat["choices"][0];
    let status = match choice["finish_reason"] == "length" {
        true => Status::Incomplete,
        false => Status::Completed,
    };
    let output = convert::output_items(&choice["message"], status);
    let usage = Some(&chat["usage"]);
    Ok(convert::response_object(
        id, created_at, echo, status, &output, usage,
    ))
}

/// `POST /v1/responses/{id}/cancel`: stop a background response still running (its engine
/// request is aborted); it is stored as `cancelled`.
pub(crate) async fn cancel(state: &AppState, id: &str) -> Result<Response<ApiBody>, ApiError> {
    let (store, stored) = load(state, id).await?;
    let running = state.background_responses.lock().remove(id);
    let Some(task) = running else {
        return Err(ApiError::invalid_param(
            "response_id",
            format!(
                "Response '{id}' is {}; only background responses still running can be cancelled.",
                stored.response["status"].as_str().unwrap_or("finished")
            ),
        ));
    };
    task.abort();
    let mut response = stored.response.clone();
    response["status"] = json!("cancelled");
    let created_at = response["created_at"].as_u64().unwrap_or(0);
    let record = Stored {
        response: response.clone(),
        ..stored
    };
    put(store, id.to_string(), created_at, record).await?;
    ok_json(&response)
}

/// `GET /v1/responses/{id}`.
pub(crate) async fn get(state: &AppState, id: &str) -> Result<Response<ApiBody>, ApiError> {
    let (_, stored) = load(state, id).await?;
    ok_json(&stored.response)
}

/// `DELETE /v1/responses/{id}`.
pub(crate) async fn delete(state: &AppState, id: &str) -> Result<Response<ApiBody>, ApiError> {
    let store = state.responses.clone().ok_or_else(|| not_found(id))?;
    let key = id.to_string();
    if !blocking(move || store.delete(&key).map_err(store_error)).await? {
        return Err(not_found(id));
    }
    ok_json(&json!({"id": id, "object": "response", "deleted": true}))
}

/// `GET /v1/responses/{id}/input_items` (`order` asc or desc, the default; `limit` 1..=100,
/// default 20; `after` an item id).
pub(crate) async fn input_items_list(
    state: &AppState,
    id: &str,
    query: Option<&str>,
) -> Result<Response<ApiBody>, ApiError> {
    let (_, stored) = load(state, id).await?;
    let mut items = stored.input_items;
    let (mut limit, mut after, mut descending) = (20usize, None::<String>, true);
    for (k, v) in query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
    {
        match k {
            "order" if v == "asc" => descending = false,
            "order" if v == "desc" => descending = true,
            "order" => {
                return Err(ApiError::invalid_param(
                    "order",
                    "`order` must be asc or desc.",
                ))
            }
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|l| (1..=100).contains(l))
                    .ok_or_else(|| ApiError::invalid_param("limit", "`limit` must be 1..=100."))?
            }
            "after" => after = Some(v.to_string()),
            _ => {}
        }
    }
    if descending {
        items.reverse();
    }
    if let Some(a) = after {
        let p = items
            .iter()
            .position(|i| i["id"] == a.as_str())
            .ok_or_else(|| ApiError::invalid_param("after", format!("no input item '{a}'.")))?;
        items.drain(..=p);
    }
    let has_more = items.len() > limit;
    items.truncate(limit);
    ok_json(&json!({
        "object": "list",
        "first_id": items.first().map(|i| i["id"].clone()),
        "last_id": items.last().map(|i| i["id"].clone()),
        "has_more": has_more,
        "data": items,
    }))
}
