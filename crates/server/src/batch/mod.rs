//! Batch jobs (OpenAI's Batch API): uploaded JSONL files of requests, run in the background at
//! the lowest urgency inside the same continuous batch as interactive traffic, with every line's
//! state in a durable store so a restart loses nothing.
//!
//! - `store`: the SQLite database (files, batches, lines) and its lock.
//! - `input`: what makes an input file valid.
//! - `line`: running one line through the same handler as a live request.
//! - `runner`: the background task that validates, runs, cancels, expires and finalizes.
//! - `http`: `/v1/files` and `/v1/batches`.
//! - `offline`: `spindle run-batch` (a file in, a file out, no server).

pub(crate) mod http;
pub mod input;
pub(crate) mod line;
pub mod offline;
pub(crate) mod runner;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Notify;

use store::{BatchStore, StoreError};

/// Default upper bound of an uploaded file (OpenAI's limit for batch input files).
pub const DEFAULT_MAX_FILE_BYTES: usize = 200 * 1024 * 1024;

/// Default number of a batch's lines handed to the engine at once: enough to fill the
/// continuous batch when the server is otherwise idle, bounded so the waiting queue is never
/// flooded (interactive requests are admitted first anyway).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;

/// Settings of the Batch API (`spindle serve --data-dir ...`).
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Where the database and its lock live.
    pub data_dir: PathBuf,
    /// Uploads larger than this are refused with 413 (`--max-batch-file-size`).
    pub max_file_bytes: usize,
    /// Lines of a batch in the engine at once (`--max-batch-in-flight`).
    pub max_in_flight: usize,
}

impl BatchConfig {
    /// The defaults, stored in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// The Batch API's shared state: the store and the runner's wake-up call.
pub(crate) struct Batches {
    pub(crate) store: Arc<BatchStore>,
    pub(crate) cfg: BatchConfig,
    /// Rung when a batch is created or cancelled, so the runner looks again at once.
    pub(crate) wake: Notify,
}

impl Batches {
    /// Run a store call on the blocking pool (SQLite is blocking I/O).
    pub(crate) async fn db<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&BatchStore) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Open the store (taking its lock).
    pub(crate) fn open(cfg: BatchConfig) -> Result<Self, StoreError> {
        let store = BatchStore::open(&cfg.data_dir)?;
        Ok(Self {
            store: Arc::new(store),
            cfg,
            wake: Notify::new(),
        })
    }
}

/// A random id in OpenAI's style (`file-…`, `batch_…`, `batch_req_…`).
pub(crate) fn new_id(prefix: &str) -> String {
    let v: u128 = rand::random();
    format!("{prefix}{v:032x}")
}
