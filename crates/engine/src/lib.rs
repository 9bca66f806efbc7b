//! The spindle engine: one dedicated thread owns the model and the paged KV cache and runs
//! continuous batching (`step() = schedule -> run the model -> process outputs`). Front ends talk to it through
//! an [`EngineHandle`]; nothing here knows about HTTP.
//!
//! Depends on spindle-model; never on the server.

mod api;
pub mod block_manager;
pub mod config;
mod core;
pub mod detokenizer;
mod embedding;
mod engine;
mod fault;
mod generation;
mod handle;
mod host_memory;
mod kv_cache;
pub mod kv_events;
mod model_runner;
mod output_processor;
pub mod sampler;
pub mod scheduler;
mod sequence;
pub mod spec;
mod stats;
mod step_output;
mod stop;
pub mod token_stop;
mod trace;

pub use api::*;
pub use config::{EngineConfig, FaultInjection, FaultSpecError};
pub use engine::Engine;
pub use handle::{EngineHandle, RequestStream};
pub use host_memory::tune_allocator;
pub use stats::EngineStats;
pub use trace::{StepObserver, StepTrace};
