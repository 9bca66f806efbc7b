//! The background task behind the Batch API. It takes the oldest unfinished batch and moves it
//! along: `validating` (parse the input file) → `in_progress` (run its lines, a bounded number
//! in the engine at a time, each result written as it completes) → `finalizing` → `completed`,
//! or to `failed`, `cancelled` or `expired`. Everything it knows is in the store, so after a
//! restart it simply starts again: lines that were in flight are still pending and run again,
//! recorded lines are never rerun.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use super::input::{parse_input, BatchEndpoint};
use super::line::{no_response_line, run_line, LineResult};
use super::store::{BatchError, BatchObject, BatchStatus, LineOutcome, PendingLine, StoreError};
use super::{new_id, Batches};
use crate::ids::unix_now;
use crate::state::AppState;

/// How long to wait before handing a line back to an engine that refused it (429/503).
const RETRY_BACKOFF: Duration = Duration::from_millis(250);
/// The runner looks at the store at least this often (expiry, missed wake-ups).
const IDLE_POLL: Duration = Duration::from_secs(5);
/// Pending lines read from the store at a time.
const PAGE: usize = 512;

/// The runner loop; it never returns (the server aborts it on shutdown).
pub(crate) async fn run(state: Arc<AppState>, batches: Arc<Batches>) {
    let runner = Runner { state, batches };
    loop {
        match runner.step().await {
            Ok(true) => {}
            Ok(false) => {
                let _ = tokio::time::timeout(IDLE_POLL, runner.batches.wake.notified()).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "batch runner: store failure; retrying");
                tokio::time::sleep(IDLE_POLL).await;
            }
        }
    }
}

/// Whether a batch's completion window has passed.
fn past_window(batch: &BatchObject) -> bool {
    batch.expires_at.is_some_and(|t| unix_now() >= t)
}

struct Runner {
    state: Arc<AppState>,
    batches: Arc<Batches>,
}

impl Runner {
    /// Do the next piece of work; false when there was none.
    async fn step(&self) -> Result<bool, StoreError> {
        self.housekeeping(None).await?;
        let unfinished = self.batches.db(|s| s.unfinished_batches()).await?;
        let Some((id, status)) = unfinished
            .into_iter()
            .find(|(_, s)| matches!(s, BatchStatus::InProgress | BatchStatus::Finalizing))
        else {
            return Ok(false);
        };
        if status == BatchStatus::InProgress {
            self.run_lines(&id).await?;
        }
        self.finish(&id, BatchStatus::Finalizing, BatchStatus::Completed)
            .await?;
        Ok(true)
    }

    /// Quick work that must not wait behind a running batch: validate new batches, settle
    /// cancellations and expire what is past its window (except `current`, which the caller
    /// handles itself).
    async fn housekeeping(&self, current: Option<&str>) -> Result<(), StoreError> {
        let unfinished = self.batches.db(|s| s.unfinished_batches()).await?;
        for (id, status) in unfinished {
            if Some(id.as_str()) == current {
                continue;
            }
            match status {
                BatchStatus::Validating => self.validate(&id).await?,
                BatchStatus::Cancelling => {
                    self.finish(&id, BatchStatus::Cancelling, BatchStatus::Cancelled)
                        .await?
                }
                BatchStatus::InProgress if self.expired(&id).await? => self.expire(&id).await?,
                _ => {}
            }
        }
        Ok(())
    }

    /// `validating` → `in_progress` with the lines stored, or → `failed` with `errors`.
    async fn validate(&self, id: &str) -> Result<(), StoreError> {
        let id_owned = id.to_string();
        let Some(batch) = self.batches.db(move |s| s.batch(&id_owned)).await? else {
            return Ok(());
        };
        let file_id = batch.input_file_id.clone();
        let content = self.batches.db(move |s| s.file_content(&file_id)).await?;
        let served = self.state.cfg.served_model_names.clone();
        let checked = match (content, BatchEndpoint::parse(&batch.endpoint)) {
            (None, _) => Err(vec![BatchError {
                code: "invalid_file".into(),
                message: format!("The input file {} no longer exists.", batch.input_file_id),
                param: Some("input_file_id".into()),
                line: None,
            }]),
            (_, None) => Err(vec![BatchError {
                code: "invalid_endpoint".into(),
                message: format!("Unsupported endpoint {}.", batch.endpoint),
                param: Some("endpoint".into()),
                line: None,
            }]),
            (Some(content), Some(endpoint)) => {
                tokio::task::spawn_blocking(move || parse_input(&content, endpoint, &served))
                    .await
                    .map_err(|e| StoreError::Corrupt(format!("validation task failed: {e}")))?
            }
        };
        let id = id.to_string();
        let now = unix_now();
        match checked {
            Ok(lines) => {
                let total = lines.len();
                self.batches
                    .db(move |s| s.start_batch(&id, &lines, now))
                    .await?;
                tracing::info!(batch = %batch.id, lines = total, "batch validated; in progress");
            }
            Err(errors) => {
                tracing::info!(batch = %batch.id, errors = errors.len(), "batch failed validation");
                self.batches
                    .db(move |s| s.fail_batch(&id, &errors, now))
                    .await?;
            }
        }
        Ok(())
    }

    async fn expired(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        let batch = self.batches.db(move |s| s.batch(&id)).await?;
        Ok(batch.as_ref().is_some_and(past_window))
    }

    /// `in_progress` → `expired`: lines not answered yet go to the error file.
    async fn expire(&self, id: &str) -> Result<(), StoreError> {
        tracing::warn!(batch = %id, "batch expired before all its lines ran");
        let id = id.to_string();
        self.batches
            .db(move |s| {
                let line = |custom_id: &str| {
                    no_response_line(
                        custom_id,
                        "batch_expired",
                        "This request could not be executed before the completion window expired.",
                    )
                };
                s.complete(
                    &id,
                    &[BatchStatus::InProgress],
                    BatchStatus::Expired,
                    Some(&line),
                    unix_now(),
                    &mut || new_id("file-"),
                )
            })
            .await?;
        Ok(())
    }

    /// Move a batch from `from` to its end state `to`, writing its output and error files.
    async fn finish(&self, id: &str, from: BatchStatus, to: BatchStatus) -> Result<(), StoreError> {
        let id_owned = id.to_string();
        let done = self
            .batches
            .db(move |s| {
                s.complete(&id_owned, &[from], to, None, unix_now(), &mut || {
                    new_id("file-")
                })
            })
            .await?;
        if done {
            tracing::info!(batch = %id, status = to.as_str(), "batch finished");
        }
        Ok(())
    }

    /// Run every pending line of an in-progress batch, then move it to `finalizing`. Stops
    /// early (aborting the lines in flight) when the batch is cancelled or expires.
    async fn run_lines(&self, id: &str) -> Result<(), StoreError> {
        let id_owned = id.to_string();
        let Some(batch) = self.batches.db(move |s| s.batch(&id_owned)).await? else {
            return Ok(());
        };
        let Some(endpoint) = BatchEndpoint::parse(&batch.endpoint) else {
            return Ok(());
        };
        let max_in_flight = self.batches.cfg.max_in_flight.max(1);
        let mut queue: VecDeque<PendingLine> = VecDeque::new();
        let mut next_index = 0u64;
        let mut exhausted = false;
        let mut in_flight: JoinSet<(PendingLine, LineResult)> = JoinSet::new();
        let mut last_check = std::time::Instant::now();
        loop {
            if last_check.elapsed() >= IDLE_POLL {
                last_check = std::time::Instant::now();
                if self.interrupted(id, &mut in_flight).await? {
                    return Ok(());
                }
            }
            if queue.len() < max_in_flight && !exhausted {
                let id = id.to_string();
                let from = next_index;
                let page = self
                    .batches
                    .db(move |s| s.pending_lines(&id, from, PAGE))
                    .await?;
                exhausted = page.len() < PAGE;
                if let Some(last) = page.last() {
                    next_index = last.index + 1;
                }
                queue.extend(page);
            }
            while in_flight.len() < max_in_flight {
                let Some(line) = queue.pop_front() else { break };
                let state = self.state.clone();
                in_flight.spawn(async move {
                    let result =
                        run_line(&state, endpoint, &line.custom_id, line.body.as_bytes()).await;
                    (line, result)
                });
            }
            if in_flight.is_empty() {
                break;
            }
            tokio::select! {
                joined = in_flight.join_next() => {
                    let Some(joined) = joined else { continue };
                    match joined {
                        Ok((line, LineResult::Answered(outcome, text))) => {
                            self.record(id, line.index, outcome, text).await?;
                        }
                        Ok((line, LineResult::Retry(why))) => {
                            tracing::debug!(batch = %id, line = line.index, %why, "line deferred");
                            tokio::time::sleep(RETRY_BACKOFF).await;
                            queue.push_front(line);
                        }
                        Err(e) => tracing::error!(batch = %id, error = %e, "a batch line task failed"),
                    }
                }
                _ = self.batches.wake.notified() => {
                    if self.interrupted(id, &mut in_flight).await? {
                        return Ok(());
                    }
                    self.housekeeping(Some(id)).await?;
                }
                _ = tokio::time::sleep(IDLE_POLL) => {
                    if self.interrupted(id, &mut in_flight).await? {
                        return Ok(());
                    }
                }
            }
        }
        let id = id.to_string();
        self.batches
            .db(move |s| {
                s.transition(
                    &id,
                    &[BatchStatus::InProgress],
                    BatchStatus::Finalizing,
                    unix_now(),
                )
            })
            .await?;
        Ok(())
    }

    async fn record(
        &self,
        id: &str,
        index: u64,
        outcome: LineOutcome,
        text: String,
    ) -> Result<(), StoreError> {
        let id_owned = id.to_string();
        let fresh = self
            .batches
            .db(move |s| s.record_result(&id_owned, index, outcome, &text))
            .await?;
        if !fresh {
            tracing::warn!(batch = %id, line = index, "line already had a result; kept the first");
        }
        Ok(())
    }

    /// Whether the running batch was cancelled or expired; if so the lines in flight are
    /// aborted (their engine requests end) and the batch is finished accordingly.
    async fn interrupted(
        &self,
        id: &str,
        in_flight: &mut JoinSet<(PendingLine, LineResult)>,
    ) -> Result<bool, StoreError> {
        let id_owned = id.to_string();
        let batch = self.batches.db(move |s| s.batch(&id_owned)).await?;
        match batch.as_ref().map(|b| b.status) {
            Some(BatchStatus::Cancelling) => {
                in_flight.abort_all();
                self.finish(id, BatchStatus::Cancelling, BatchStatus::Cancelled)
                    .await?;
                Ok(true)
            }
            Some(BatchStatus::InProgress) if batch.as_ref().is_some_and(past_window) => {
                in_flight.abort_all();
                self.expire(id).await?;
                Ok(true)
            }
            Some(BatchStatus::InProgress) => Ok(false),
            // Finished elsewhere or gone: stop.
            _ => {
                in_flight.abort_all();
                Ok(true)
            }
        }
    }
}
