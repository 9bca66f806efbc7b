//! Errors: [`ApiError`] is what a client sees (an HTTP status plus the OpenAI error body);
//! [`ServerError`] is what the embedding program sees when the server cannot start or run.

use hyper::StatusCode;
use spindle_engine::EngineError;

use crate::protocol::{ErrorBody, ErrorDetail};

/// A failed request, rendered as `{"error": {"message", "type", "param", "code"}}` with the
/// status OpenAI clients map to exception classes (400 → `BadRequestError`, 404 →
/// `NotFoundError`, …).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status (and the `code` field).
    pub status: StatusCode,
    /// Human-readable explanation shown by clients.
    pub message: String,
    /// The request field at fault, so clients can point at it.
    pub param: Option<String>,
    /// Seconds a client should wait before retrying (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A generic error with the given status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// 400 for a malformed or out-of-range request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 400 naming the offending field in `param`.
    /// The 400 for text the tokenizer cannot encode.
    pub fn tokenization_failed(e: impl std::fmt::Display) -> Self {
        Self::bad_request(format!("Tokenization failed: {e}"))
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::bad_request(message)
        }
    }

    /// 404 for a model name the server does not serve (vLLM's wording).
    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".to_string()),
            ..Self::new(
                StatusCode::NOT_FOUND,
                format!("The model `{model}` does not exist."),
            )
        }
    }

    /// 401 for a missing or wrong API key.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "Invalid or missing API key: send `Authorization: Bearer <key>` (or `x-api-key: <key>`).",
        )
    }

    /// 503 while the server drains connections before exiting.
    pub fn shutting_down() -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "The server is shutting down.",
            )
        }
    }

    /// 500 for a failure on our side (a bug or a failed worker task).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    /// The `type` field: vLLM's exception-style names, which clients only display.
    pub fn error_type(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "BadRequestError",
            StatusCode::UNAUTHORIZED => "AuthenticationError",
            StatusCode::FORBIDDEN => "PermissionDeniedError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowedError",
            StatusCode::CONFLICT => "ConflictError",
            StatusCode::REQUEST_TIMEOUT => "RequestTimeoutError",
            StatusCode::PAYLOAD_TOO_LARGE => "RequestEntityTooLargeError",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "UnsupportedMediaTypeError",
            StatusCode::TOO_MANY_REQUESTS => "RateLimitError",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
            s if s.is_server_error() => "InternalServerError",
            _ => "BadRequestError",
        }
    }

    /// The JSON body clients parse.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                r#type: self.error_type().to_string(),
                param: self.param.clone(),
                code: self.status.as_u16(),
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl From<EngineError> for ApiError {
    /// Engine failures map to the statuses clients retry on (429, 503) or report (400, 500).
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidRequest(e) => ApiError::bad_request(e.to_string()),
            EngineError::QueueFull(n) => ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("The server is overloaded ({n} requests are waiting); retry later."),
                )
            },
            EngineError::EngineDead(reason) => ApiError {
                retry_after: Some(5),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("The engine is not running: {reason}"),
                )
            },
            // Load, cache and spawn failures never reach a request; the rest end one request
            // (a failed forward pass, sampling or detokenization) or reveal an engine bug.
            other => ApiError::internal(format!("The engine failed this request: {other}")),
        }
    }
}

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// `host:port` as configured.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Socket-level failure after binding.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// `--chat-template` does not compile.
    #[error("invalid chat template: {0}")]
    Template(String),
    /// A metric could not be registered (a bug: names are fixed).
    #[error("metrics set-up failed: {0}")]
    Metrics(String),
    /// The configuration is unusable (e.g. no served model name).
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// The batch store cannot be opened (its data directory is unusable or locked).
    #[error("batch store: {0}")]
    Batch(#[from] crate::batch::store::StoreError),
}
