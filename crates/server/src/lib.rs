//! spindle-server: the OpenAI-compatible HTTP front end. It parses and validates OpenAI/vLLM
//! requests, renders chat templates, tokenizes off the async runtime, submits requests to the
//! engine through an [`spindle_engine::EngineHandle`], and answers with JSON or SSE streams. It
//! depends on the engine and model crates, never the reverse.

pub mod auth;
pub mod batch;
pub mod embeddings;
pub mod error;
pub mod fields;
pub mod generation;
mod handlers;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod sse;
pub mod structured;
pub mod template;
pub mod tools;
pub mod validation;

pub use error::{ApiError, ServerError};
pub use metrics::{CacheInfo, Metrics};
pub use server::{
    run_server, LoadingServer, Server, ServerConfig, DEFAULT_BODY_READ_TIMEOUT,
    DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_BODY_BYTES,
};
