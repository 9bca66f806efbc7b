//! spindle-bench: the serving benchmark client behind `spindle bench`. It drives any
//! OpenAI-compatible server (spindle, vLLM, llama.cpp's llama-server) over HTTP, measures every
//! streamed request like `vllm bench serve` does (TTFT, TPOT, ITL, E2EL, throughput, goodput),
//! sweeps concurrency levels and plots the results. It never links the engine or the model.

pub mod arrivals;
pub mod client;
pub mod dataset;
pub mod embeddings;
pub mod error;
pub mod metrics;
pub mod plot;
pub mod report;
pub mod request;
pub mod runner;
pub mod sse;
pub mod sweep;

pub use dataset::{BenchRequest, DatasetSpec};
pub use error::{BenchError, Result};
pub use metrics::{BenchMetrics, RequestOutcome, Slo, SloMetric, Summary};
pub use report::format_report;
pub use request::EndpointKind;
pub use runner::{
    run_serve, run_serve_async, BenchResult, LatencyMetric, ServeConfig, ServerCounters,
};
pub use sweep::{run_sweep, write_outputs, SweepConfig, SweepResult};
