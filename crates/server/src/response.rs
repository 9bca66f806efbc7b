//! Response bodies and the helpers that build them (JSON, OpenAI errors, SSE), and reading
//! request bodies within the server's limits.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;

use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::stream::SseBody;

/// Every response body: a buffered one, or an SSE stream tied to engine requests.
pub enum ApiBody {
    /// A complete body (JSON, metrics text), sent in one frame.
    Full(Option<Bytes>),
    /// A live event stream.
    Sse(Box<SseBody>),
    /// A live Responses API event stream.
    Events(Box<crate::responses::ResponseEventsBody>),
    /// A live Anthropic Messages event stream.
    Messages(Box<crate::messages::MessageEventsBody>),
}

impl ApiBody {
    /// An empty body.
    pub fn empty() -> Self {
        ApiBody::Full(None)
    }

    /// A buffered body.
    pub fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        ApiBody::Full((!b.is_empty()).then_some(b))
    }
}

impl Body for ApiBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ApiBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ApiBody::Sse(s) => Pin::new(s.as_mut()).poll_frame(cx),
            ApiBody::Events(s) => Pin::new(s.as_mut()).poll_frame(cx),
            ApiBody::Messages(s) => Pin::new(s.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ApiBody::Full(b) => b.is_none(),
            ApiBody::Sse(s) => s.is_end_stream(),
            ApiBody::Events(s) => s.is_end_stream(),
            ApiBody::Messages(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ApiBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ApiBody::Full(None) => SizeHint::with_exact(0),
            ApiBody::Sse(s) => s.size_hint(),
            ApiBody::Events(s) => s.size_hint(),
            ApiBody::Messages(s) => s.size_hint(),
        }
    }
}

/// Build a JSON response.
pub(crate) fn json_response(status: StatusCode, body: Vec<u8>) -> Response<ApiBody> {
    let mut r = Response::new(ApiBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Render an [`ApiError`] as the OpenAI error response.
pub(crate) fn error_response(err: &ApiError) -> Response<ApiBody> {
    let body = serde_json::to_vec(&err.body()).unwrap_or_default();
    let mut r = json_response(err.status, body);
    if let Some(secs) = err.retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

/// The streaming response: SSE headers, no buffering by proxies.
pub(crate) fn sse_response(body: SseBody) -> Response<ApiBody> {
    event_stream_response(ApiBody::Sse(Box::new(body)))
}

/// A `text/event-stream` response around a streaming body.
pub(crate) fn event_stream_response(body: ApiBody) -> Response<ApiBody> {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// Read a JSON request body without ever holding more than `max_body_bytes`: a declared length
/// over the limit is refused before reading, and the limit also applies while streaming
/// (chunked). A body that does not arrive within `body_read_timeout` is a 408 (slowloris).
pub(crate) async fn read_json_body(
    req: Request<Incoming>,
    cfg: &ServerConfig,
) -> Result<Bytes, ApiError> {
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or("").trim();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Content-Type must be application/json, got `{essence}`."),
            ));
        }
    }
    read_body(req, cfg.max_body_bytes, cfg.body_read_timeout).await
}

/// Read a whole request body of at most `max` bytes (413 above, checked against
/// `Content-Length` first and while reading), within `timeout` (408 after).
pub(crate) async fn read_body(
    req: Request<Incoming>,
    max: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("The request body is larger than the limit of {max} bytes."),
        )
    };
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max as u64 {
            return Err(too_large());
        }
    }
    let collected = tokio::time::timeout(timeout, Limited::new(req.into_body(), max).collect())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "The request body was not received within {} s.",
                    timeout.as_secs_f64()
                ),
            )
        })?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "Failed to read the request body: {e}"
        ))),
    }
}

/// A 200 with `value` as JSON.
pub(crate) fn ok_json<T: Serialize>(value: &T) -> Result<Response<ApiBody>, ApiError> {
    let body = serde_json::to_vec(value)
        .map_err(|e| ApiError::internal(format!("serialization failed: {e}")))?;
    Ok(json_response(StatusCode::OK, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_shape() {
        let r = error_response(&ApiError::from(spindle_engine::EngineError::QueueFull(3)));
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers().get(header::RETRY_AFTER).unwrap(), "1");
        let r = error_response(&ApiError::from(spindle_engine::EngineError::EngineDead(
            "x".into(),
        )));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
