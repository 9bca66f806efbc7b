//! spindle-server: the OpenAI-compatible HTTP front end. It parses and validates OpenAI/vLLM
//! requests, renders chat templates, tokenizes off the async runtime, submits requests to the
//! engine through an [`spindle_engine::EngineHandle`], and answers with JSON or SSE streams. It
//! depends on the engine and model crates, never the reverse.

pub mod auth;
pub mod batch;
pub mod chat_events;
pub mod config;
pub mod embeddings;
pub mod error;
pub mod fields;
mod handlers;
pub mod harmony;
mod ids;
pub mod messages;
pub mod metrics;
mod pool;
pub mod protocol;
pub mod reasoning;
mod response;
pub mod responses;
pub mod server;
pub mod sse;
mod state;
pub mod stream;
pub mod structured;
pub mod template;
pub mod tool_formats;
pub mod tools;
pub mod validation;

pub use config::{
    ServerConfig, DEFAULT_BODY_READ_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_BODY_BYTES,
};
pub use error::{ApiError, ServerError};
pub use metrics::{CacheInfo, Metrics};
pub use server::{run_server, LoadingServer, Server};
