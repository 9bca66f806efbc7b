//! The spindle engine: one dedicated thread owns the model and the paged KV cache and runs
//! continuous batching (`step() = schedule -> run the model -> process outputs`). Front ends talk to it through
//! an [`EngineHandle`]; nothing here knows about HTTP.
//!
//! Depends on spindle-model; never on the server.

pub mod api;
pub mod block_manager;
pub mod config;
pub mod detokenizer;
mod embedding;
pub mod engine;
mod fault;
mod generation;
pub mod handle;
pub mod kv_cache;
pub mod kv_events;
pub mod model_runner;
pub mod output_processor;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod stats;
pub mod stop;
pub mod trace;

pub use api::*;
pub use config::{EngineConfig, FaultInjection, FaultSpecError};
pub use engine::Engine;
pub use handle::{EngineHandle, RequestStream};
pub use stats::EngineStats;
pub use trace::{StepObserver, StepTrace};
