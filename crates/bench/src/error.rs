//! The one error type of the benchmark library, so the CLI can report any failure with context.

use std::path::PathBuf;

/// Everything that can stop a benchmark (as opposed to a single failed request, which is counted
/// in the report instead).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag value that cannot work (zero prompts, a negative rate, a malformed SLO, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file in question.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A dataset file was read but its content is not usable.
    #[error("dataset {path}: {message}")]
    Dataset {
        /// The dataset file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The server could not be reached or answered something unusable outside a measured
    /// request (e.g. `GET /v1/models`).
    #[error("server: {0}")]
    Server(String),
    /// A JSON document (result file, server answer) did not parse.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Drawing a plot failed.
    #[error("plot: {0}")]
    Plot(String),
}

impl BenchError {
    /// Attach a path to an I/O error.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias of the benchmark library.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;
