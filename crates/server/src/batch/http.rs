//! `/v1/files` and `/v1/batches` with OpenAI's shapes, so `client.files.*` and
//! `client.batches.*` of the official SDKs work unchanged. Store calls run on the blocking pool.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use spindle_engine::ModelKind;

use super::input::BatchEndpoint;
use super::store::{BatchStatus, FileObject, Page, StoreError};
use super::{new_id, Batches};
use crate::error::ApiError;
use crate::ids::unix_now;
use crate::response::ok_json;
use crate::response::{read_body, ApiBody};
use crate::state::AppState;
use crate::validation::parse_json;

/// Room for the multipart framing and the `purpose` field around an upload.
const MULTIPART_OVERHEAD: usize = 1024 * 1024;
/// Seconds in OpenAI's only completion window.
const WINDOW_24H: u64 = 24 * 3600;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "batch store failure");
        ApiError::internal(format!("The batch store failed: {e}"))
    }
}

/// The Batch API's state, or a 404 saying it is off.
pub(crate) fn enabled(state: &AppState) -> Result<Arc<Batches>, ApiError> {
    state.batches.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "The Batch API is not enabled on this server (it needs a --data-dir).",
        )
    })
}

fn not_found(kind: &str, id: &str) -> ApiError {
    ApiError {
        param: Some("id".into()),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            format!("No {kind} with id `{id}` exists."),
        )
    }
}

/// OpenAI's list envelope.
fn list_page<T: Serialize>(page: Page<T>, id_of: impl Fn(&T) -> &str) -> Value {
    json!({
        "object": "list",
        "first_id": page.data.first().map(&id_of),
        "last_id": page.data.last().map(&id_of),
        "has_more": page.has_more,
        "data": page.data,
    })
}

/// `limit`, `after`, `order`, `purpose` from a query string.
#[derive(Debug, Default)]
struct ListQuery {
    limit: Option<String>,
    after: Option<String>,
    order: Option<String>,
    purpose: Option<String>,
}

fn parse_query(query: Option<&str>) -> ListQuery {
    let mut q = ListQuery::default();
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let v = Some(v.into_owned());
        match k.as_ref() {
            "limit" => q.limit = v,
            "after" => q.after = v,
            "order" => q.order = v,
            "purpose" => q.purpose = v,
            _ => {}
        }
    }
    q
}

fn parse_limit(raw: Option<&str>, default: usize, max: usize) -> Result<usize, ApiError> {
    let Some(raw) = raw else { return Ok(default) };
    match raw.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::invalid_param(
            "limit",
            format!("`limit` must be an integer between 1 and {max}, got `{raw}`."),
        )),
    }
}

// ----- files -----

/// `POST /v1/files` (multipart/form-data with `file` and `purpose`).
pub(crate) async fn create_file(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Response<ApiBody>, ApiError> {
    let batches = enabled(state)?;
    let max = batches.cfg.max_file_bytes;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let boundary = multer::parse_boundary(&content_type).map_err(|_| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Uploads must be multipart/form-data with a boundary, got `{content_type}`."),
        )
    })?;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("The file is larger than the limit of {max} bytes (--max-batch-file-size)."),
        )
    };
    let body = read_body(
        req,
        max.saturating_add(MULTIPART_OVERHEAD),
        state.cfg.body_read_timeout,
    )
    .await
    .map_err(|e| {
        if e.status == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            e
        }
    })?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut purpose = None;
    let mut file = None;
    let bad_form =
        |e: multer::Error| ApiError::bad_request(format!("Malformed multipart body: {e}"));
    while let Some(field) = multipart.next_field().await.map_err(bad_form)? {
        match field.name() {
            Some("purpose") => purpose = Some(field.text().await.map_err(bad_form)?),
            Some("file") => {
                let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                let data = field.bytes().await.map_err(bad_form)?;
                file = Some((filename, data));
            }
            _ => {}
        }
    }
    let Some(purpose) = purpose else {
        return Err(ApiError::invalid_param(
            "purpose",
            "The `purpose` field is required.",
        ));
    };
    if purpose != "batch" {
        return Err(ApiError::invalid_param(
            "purpose",
            format!("Only files with purpose `batch` can be uploaded here, got `{purpose}`."),
        ));
    }
    let Some((filename, data)) = file else {
        return Err(ApiError::invalid_param(
            "file",
            "The `file` field is required.",
        ));
    };
    if data.len() > max {
        return Err(too_large());
    }
    let id = new_id("file-");
    let created = unix_now();
    let file = batches
        .db(move |s| s.insert_file(&id, &filename, &purpose, &data, created))
        .await?;
    tracing::info!(file = %file.id, bytes = file.bytes, "file uploaded");
    ok_json(&file)
}

/// `GET /v1/files`.
pub(crate) async fn list_files(
    state: &AppState,
    query: Option<&str>,
) -> Result<Response<ApiBody>, ApiError> {
    let batches = enabled(state)?;
    let q = parse_query(query);
    let limit = parse_limit(q.limit.as_deref(), 10_000, 10_000)?;
    let ascending = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(o) => {
            return Err(ApiError::invalid_param(
                "order",
                format!("`order` must be `asc` or `desc`, got `{o}`."),
            ))
        }
    };
    let page = batches
        .db(move |s| s.list_files(q.purpose.as_deref(), q.after.as_deref(), limit, ascending))
        .await?;
    ok_json(&list_page(page, |f: &FileObject| f.id.as_str()))
}

/// `GET /v1/files/{id}`.
pub(crate) async fn get_file(state: &AppState, id: &str) -> Result<Response<ApiBody>, ApiError> {
    let batches = enabled(state)?;
    let key = id.to_string();
    match batches.db(move |s| s.file(&key)).await? {
        Some(f) => ok_json(&f),
        None => Err(not_found("file", id)),
    }
}

/// `DELETE /v1/files/{id}`.
pub(crate) async fn delete_file(state: &AppState, id: &str) -> Result<Response<ApiBody>, ApiError> {
    let batches = enabled(state)?;
    let key = id.to_string();
    if batches.db(move |s| s.delete_file(&key)).await? {
        ok_json(&json!({"id": id, "object": "file", "deleted": true}))
    } else {
        Err(not_found("file", id))
    }
}

/// `GET /v1/files/{id}/content`: the bytes as uploaded (or as a batch wrote them).
pub(crate) async fn file_content(
    state: &AppState,
    id: &str,
) -> Result<Response<ApiBody>, ApiError> {
    let batches = enabled(state)?;
    let key = id.to_string();
    let Some(content) = batches.db(move |s| s.file_content(&key)).await? else {
        return Err(not_found("file", id));
    };
    let mut r = Response::new(ApiBody::full(content));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(r)
}

// ----- batches -----

/// `POST /v1/batches` body.
#[derive(Debug, Deserialize)]
struct CreateBatch {
    input_file_id: Option<String>,
    endpoint: Option<String>,
    completion_window: Option<String>,
    metadata: Option<Value>,
}

/// OpenAI's metadata rules: at most 16 string pairs, keys up to 64 and values up to 512 chars.
fn check_metadata(metadata: &Option<Value>) -> Result<(), ApiError> {
    let bad = |m: &str| ApiError::invalid_param("metadata", m.to_string());
    match metadata {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Object(map)) => {
            if map.len() > 16 {
                return Err(bad("`metadata` has at most 16 keys."));
            }
            for (k, v) in map {
                if k.chars().count() > 64 {
                    return Err(bad("`metadata` keys are at most 64 characters."));
                }
                match v {
                    Value::String(s) if s.chars().count() <= 512 => {}
                    Value::String(_) => {
                        return Err(bad("`metadata` values are at most 512 characters."))
                    }
                    _ => return Err(bad("`metadata` values must be strings.")),
                }
            }
            Ok(())
        }
        Some(_) => Err(bad("`metadata` must be an object of string pairs.")),
    }
}

/// `POST /v1/batches`.
pub(crate) async fn create_batch(
    state: &AppState,
    body: &[u8],
) -> Result<Response<ApiBody>, ApiError> {
    let batches = enabled(state)?;
    let req: CreateBatch = parse_json(body)?;
    let Some(input_file_id) = req.input_file_id else {
        return Err(ApiError::invalid_param(
            "input_file_id",
            "`input_file_id` is required.",
        ));
    };
    let Some(endpoint_str) = req.endpoint else {
        return Err(ApiError::invalid_param(
            "endpoint",
            "`endpoint` is required.",
        ));
    };
    let Some(endpoint) = BatchEndpoint::parse(&endpoint_str) else {
        return Err(ApiError::invalid_param(
            "endpoint",
            format!("`endpoint` must be /v1/chat/completions, /v1/completions or /v1/embeddings, got `{endpoint_str}`."),
        ));
    };
    let serves = match (state.engine.model_kind(), endpoint) {
        (ModelKind::Generate, BatchEndpoint::Embeddings) => false,
        (ModelKind::Embed { .. }, BatchEndpoint::ChatCompletions | BatchEndpoint::Completions) => {
            false
        }
        _ => true,
    };
    if !serves {
        return Err(ApiError::invalid_param(
            "endpoint",
            format!("The served model does not support {endpoint_str}."),
        ));
    }
    match req.completion_window.as_deref() {
        Some("24h") => {}
        None => {
            return Err(ApiError::invalid_param(
                "completion_window",
                "`completion_window` is required (`24h`).",
            ))
        }
        Some(w) => {
            return Err(ApiError::invalid_param(
                "completion_window",
                format!("`completion_window` must be `24h`, got `{w}`."),
            ))
        }
    }
    check_metadata(&req.metadata)?;
    let file_key = input_file_id.clone();
    let Some(file) = batches.db(move |s| s.file(&file_key)).await? else {
        return Err(ApiError {
            param: Some("input_file_id".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                format!("No file with id `{input_file_id}` exists."),
            )
        });
    };
    if file.purpose != "batch" {
        return Err(ApiError::invalid_param(
            "input_file_id",
            format!(
                "File `{input_file_id}` has purpose `{}`; a batch input needs purpose `batch`.",
                file.purpose
            ),
        ));
    }
    let id = new_id("batch_");
    let now = unix_now();
    let metadata = req.metadata.filter(|m| !m.is_null());
    let batch = batches
        .db(move |s| {
            s.create_batch(
                &id,
                endpoint.as_str(),
                &input_file_id,
                "24h",
                metadata.as_ref(),
                now,
                now + WINDOW_24H,
            )
        })
        .await?;
    tracing::info!(batch = %batch.id, file = %batch.input_file_id, endpoint = %batch.endpoint, "batch created");
    batches.wake.notify_one();
    ok_json(&batch)
}

/// `GET /v1/batches`.
pub(crate) async fn list_batches(
    state: &AppState,
    query: Option<&str>,
) -> Result<Response<ApiBody>, ApiError> {
    let batches = enabled(state)?;
    let q = parse_query(query);
    let limit = parse_limit(q.limit.as_deref(), 20, 100)?;
    let page = batches
        .db(move |s| s.list_batches(q.after.as_deref(), limit))
        .await?;
    ok_json(&list_page(page, |b: &super::store::BatchObject| {
        b.id.as_str()
    }))
}

/// `GET /v1/batches/{id}`.
pub(crate) async fn get_batch(state: &AppState, id: &str) -> Result<Response<ApiBody>, ApiError> {
    let batches = enabled(state)?;
    let key = id.to_string();
    match batches.db(move |s| s.batch(&key)).await? {
        Some(b) => ok_json(&b),
        None => Err(not_found("batch", id)),
    }
}

/// `POST /v1/batches/{id}/cancel`: `validating`/`in_progress` → `cancelling`; the runner aborts
/// the lines in flight and ends it `cancelled` with the results so far. Cancelling twice is
/// harmless; a batch that already ended is a 409.
pub(crate) async fn cancel_batch(
    state: &AppState,
    id: &str,
) -> Result<Response<ApiBody>, ApiError> {
    let batches = enabled(state)?;
    let key = id.to_string();
    let now = unix_now();
    let Some((batch, moved)) = batches
        .db(move |s| {
            s.transition(
                &key,
                &[BatchStatus::Validating, BatchStatus::InProgress],
                BatchStatus::Cancelling,
                now,
            )
        })
        .await?
    else {
        return Err(not_found("batch", id));
    };
    if moved {
        tracing::info!(batch = %id, "batch cancellation requested");
        batches.wake.notify_one();
    } else if !matches!(
        batch.status,
        BatchStatus::Cancelling | BatchStatus::Cancelled
    ) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "Batch `{id}` cannot be cancelled: its status is {}.",
                batch.status.as_str()
            ),
        ));
    }
    ok_json(&batch)
}
