//! The durable side of batch jobs: an embedded SQLite database under `--data-dir` holding
//! uploaded files, batches and one row per batch line with its state and result line.
//!
//! Crash safety comes from two rules. A line's result is written in the same statement that
//! moves it out of `pending` (and only from `pending`), so a line is answered at most once; and
//! everything a restart needs (status, pending lines) is in the database, so a killed server
//! resumes where it stopped and recomputes only the lines that were in flight. Output and error
//! files are assembled from the rows in the transaction that completes the batch.
//!
//! The database is opened by one process at a time: a lock file next to it is held (an OS
//! advisory lock, released when the process dies) for as long as the store lives.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the data directory {dir} cannot be used: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("the data directory {0} is in use by another spindle server (its lock file is held); give each server its own --data-dir")]
    Locked(PathBuf),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("a stored record is unreadable: {0}")]
    Corrupt(String),
    #[error("a store task failed: {0}")]
    Task(String),
}

/// Where a batch is in OpenAI's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::Failed => "failed",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "validating" => Self::Validating,
            "failed" => Self::Failed,
            "in_progress" => Self::InProgress,
            "finalizing" => Self::Finalizing,
            "completed" => Self::Completed,
            "expired" => Self::Expired,
            "cancelling" => Self::Cancelling,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    /// No more work will happen.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Failed | Self::Completed | Self::Expired | Self::Cancelled
        )
    }

    /// The timestamp column set when a batch enters this status.
    fn timestamp_column(self) -> &'static str {
        match self {
            Self::Validating => "created_at",
            Self::Failed => "failed_at",
            Self::InProgress => "in_progress_at",
            Self::Finalizing => "finalizing_at",
            Self::Completed => "completed_at",
            Self::Expired => "expired_at",
            Self::Cancelling => "cancelling_at",
            Self::Cancelled => "cancelled_at",
        }
    }
}

/// OpenAI's file object.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    /// Always `processed` (uploads are stored whole before the response).
    pub status: &'static str,
    pub expires_at: Option<u64>,
    pub status_details: Option<String>,
}

/// One entry of a failed batch's `errors`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BatchError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    /// 1-based line of the input file.
    pub line: Option<u64>,
}

/// `request_counts`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Default)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// `errors` of a batch object.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BatchErrors {
    pub object: &'static str,
    pub data: Vec<BatchError>,
}

/// OpenAI's batch object.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BatchObject {
    pub id: String,
    pub object: &'static str,
    pub endpoint: String,
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: u64,
    pub in_progress_at: Option<u64>,
    pub expires_at: Option<u64>,
    pub finalizing_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub failed_at: Option<u64>,
    pub expired_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub cancelled_at: Option<u64>,
    pub request_counts: RequestCounts,
    pub metadata: Option<Value>,
}

/// A line waiting to run.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingLine {
    /// 0-based position in the input file (among non-empty lines).
    pub index: u64,
    pub custom_id: String,
    /// The request body, as JSON text.
    pub body: String,
}

/// A validated input line, stored when the batch starts.
#[derive(Debug, Clone, PartialEq)]
pub struct NewLine {
    pub custom_id: String,
    pub body: String,
}

/// How a line ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineOutcome {
    /// A 2xx response: goes to the output file.
    Succeeded,
    /// An error response, or no response: goes to the error file.
    Failed,
}

/// A page of a list endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub has_more: bool,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    content BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    metadata TEXT,
    errors TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    total INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    in_progress_at INTEGER,
    expires_at INTEGER,
    finalizing_at INTEGER,
    completed_at INTEGER,
    failed_at INTEGER,
    expired_at INTEGER,
    cancelling_at INTEGER,
    cancelled_at INTEGER
);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL,
    result TEXT,
    PRIMARY KEY (batch_id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batch_lines_state ON batch_lines (batch_id, state, idx);
";

/// The store: one SQLite connection behind a mutex. Every call is blocking; the server calls it
/// from the blocking pool.
pub struct BatchStore {
    conn: Mutex<Connection>,
    dir: PathBuf,
    /// Held for the store's life: the advisory lock that keeps a second server out.
    _lock: File,
}

impl std::fmt::Debug for BatchStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchStore")
            .field("dir", &self.dir)
            .finish()
    }
}

impl BatchStore {
    /// Open (or create) the store in `dir`, taking its lock.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("spindle.lock"))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(dir.to_path_buf()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let conn = Connection::open(dir.join("spindle.db"))?;
        // WAL: readers (polling clients) never block the runner's writes. NORMAL sync is
        // durable against a killed process (the OS keeps the log); FULL would also survive a
        // power cut, at a fsync per result line.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (statements are atomic), so a
        // poisoned mutex is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ----- files -----

    /// Store an uploaded (or generated) file.
    pub fn insert_file(
        &self,
        id: &str,
        filename: &str,
        purpose: &str,
        content: &[u8],
        created_at: u64,
    ) -> Result<FileObject, StoreError> {
        self.conn().execute(
            "INSERT INTO files (id, bytes, created_at, filename, purpose, content) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, content.len() as i64, created_at as i64, filename, purpose, content],
        )?;
        Ok(file_object(
            id.to_string(),
            content.len() as u64,
            created_at,
            filename.to_string(),
            purpose.to_string(),
        ))
    }

    pub fn file(&self, id: &str) -> Result<Option<FileObject>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, bytes, created_at, filename, purpose FROM files WHERE id = ?1",
                [id],
                file_row,
            )
            .optional()?)
    }

    pub fn file_content(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT content FROM files WHERE id = ?1", [id], |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .optional()?)
    }

    /// Files, newest first (or oldest first with `ascending`), after the file `after`.
    pub fn list_files(
        &self,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: usize,
        ascending: bool,
    ) -> Result<Page<FileObject>, StoreError> {
        let conn = self.conn();
        let after_seq = match after {
            Some(id) => {
                Some(seq_of(&conn, "files", id)?.unwrap_or(if ascending { i64::MAX } else { 0 }))
            }
            None => None,
        };
        let (cmp, order) = if ascending {
            (">", "ASC")
        } else {
            ("<", "DESC")
        };
        let sql = format!(
            "SELECT id, bytes, created_at, filename, purpose FROM files
             WHERE (?1 IS NULL OR purpose = ?1) AND (?2 IS NULL OR seq {cmp} ?2)
             ORDER BY seq {order} LIMIT ?3"
        );
        let mut stmt = conn.prepare(&sql)?;
        let mut data = stmt
            .query_map(params![purpose, after_seq, limit as i64 + 1], file_row)?
            .collect::<Result<Vec<_>, _>>()?;
        let has_more = data.len() > limit;
        data.truncate(limit);
        Ok(Page { data, has_more })
    }

    /// Delete a file; false if there was none.
    pub fn delete_file(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM files WHERE id = ?1", [id])?
            > 0)
    }

    // ----- batches -----

    /// Record a new batch in `validating`.
    pub fn create_batch(
        &self,
        id: &str,
        endpoint: &str,
        input_file_id: &str,
        completion_window: &str,
        metadata: Option<&Value>,
        created_at: u64,
        expires_at: u64,
    ) -> Result<BatchObject, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, metadata, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, 'validating', ?5, ?6, ?7)",
            params![
                id,
                endpoint,
                input_file_id,
                completion_window,
                metadata.map(Value::to_string),
                created_at as i64,
                expires_at as i64
            ],
        )?;
        batch_by_id(&conn, id)?.ok_or_else(|| StoreError::Corrupt(format!("batch {id} vanished")))
    }

    pub fn batch(&self, id: &str) -> Result<Option<BatchObject>, StoreError> {
        batch_by_id(&self.conn(), id)
    }

    /// Batches, newest first, after the batch `after`.
    pub fn list_batches(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<BatchObject>, StoreError> {
        let conn = self.conn();
        let after_seq = match after {
            Some(id) => Some(seq_of(&conn, "batches", id)?.unwrap_or(0)),
            None => None,
        };
        let ids: Vec<String> = conn
            .prepare(
                "SELECT id FROM batches WHERE (?1 IS NULL OR seq < ?1) ORDER BY seq DESC LIMIT ?2",
            )?
            .query_map(params![after_seq, limit as i64 + 1], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let has_more = ids.len() > limit;
        let mut data = Vec::with_capacity(ids.len().min(limit));
        for id in ids.iter().take(limit) {
            if let Some(b) = batch_by_id(&conn, id)? {
                data.push(b);
            }
        }
        Ok(Page { data, has_more })
    }

    /// Batches that still have work (validating, in progress, finalizing, cancelling), oldest
    /// first: what the runner picks up, also after a restart.
    pub fn unfinished_batches(&self) -> Result<Vec<(String, BatchStatus)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, status FROM batches
             WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling')
             ORDER BY seq ASC",
        )?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(id, s)| {
                let status = BatchStatus::parse(&s)
                    .ok_or_else(|| StoreError::Corrupt(format!("batch {id} has status {s}")))?;
                Ok((id, status))
            })
            .collect()
    }

    /// Move a batch to `to` if it is in one of `from`; returns the batch as it is afterwards,
    /// and whether it moved. `None` if there is no such batch.
    pub fn transition(
        &self,
        id: &str,
        from: &[BatchStatus],
        to: BatchStatus,
        now: u64,
    ) -> Result<Option<(BatchObject, bool)>, StoreError> {
        let conn = self.conn();
        let moved = transition(&conn, id, from, to, now)?;
        Ok(batch_by_id(&conn, id)?.map(|b| (b, moved)))
    }

    /// Validation passed: store the lines and start the batch (one transaction).
    pub fn start_batch(&self, id: &str, lines: &[NewLine], now: u64) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if !transition(
            &tx,
            id,
            &[BatchStatus::Validating],
            BatchStatus::InProgress,
            now,
        )? {
            return Ok(false);
        }
        {
            let mut insert = tx.prepare(
                "INSERT OR IGNORE INTO batch_lines (batch_id, idx, custom_id, body, state) VALUES (?1, ?2, ?3, ?4, 'pending')",
            )?;
            for (i, line) in lines.iter().enumerate() {
                insert.execute(params![id, i as i64, line.custom_id, line.body])?;
            }
        }
        tx.execute(
            "UPDATE batches SET total = ?2 WHERE id = ?1",
            params![id, lines.len() as i64],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Validation failed: the batch ends in `failed` with `errors`.
    pub fn fail_batch(&self, id: &str, errors: &[BatchError], now: u64) -> Result<(), StoreError> {
        let conn = self.conn();
        let errors = serde_json::to_string(errors)
            .map_err(|e| StoreError::Corrupt(format!("serializing errors: {e}")))?;
        conn.execute(
            "UPDATE batches SET status = 'failed', failed_at = ?2, errors = ?3 WHERE id = ?1 AND status = 'validating'",
            params![id, now as i64, errors],
        )?;
        Ok(())
    }

    /// Up to `limit` pending lines of a batch from index `from_index` on, in input order.
    pub fn pending_lines(
        &self,
        id: &str,
        from_index: u64,
        limit: usize,
    ) -> Result<Vec<PendingLine>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT idx, custom_id, body FROM batch_lines
             WHERE batch_id = ?1 AND state = 'pending' AND idx >= ?2 ORDER BY idx LIMIT ?3",
        )?;
        let lines = stmt
            .query_map(params![id, from_index as i64, limit as i64], |r| {
                Ok(PendingLine {
                    index: r.get::<_, i64>(0)? as u64,
                    custom_id: r.get(1)?,
                    body: r.get(2)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(lines)
    }

    /// Record a line's result line. Only a pending line takes a result: false if it already had
    /// one (never answered twice).
    pub fn record_result(
        &self,
        id: &str,
        index: u64,
        outcome: LineOutcome,
        result_line: &str,
    ) -> Result<bool, StoreError> {
        let state = match outcome {
            LineOutcome::Succeeded => "succeeded",
            LineOutcome::Failed => "failed",
        };
        Ok(self.conn().execute(
            "UPDATE batch_lines SET state = ?3, result = ?4 WHERE batch_id = ?1 AND idx = ?2 AND state = 'pending'",
            params![id, index as i64, state, result_line],
        )? > 0)
    }

    /// Finish a batch: move it from `from` to `to`, mark every line still pending as failed
    /// with `pending_error` (expired) or leave it out (cancelled: `None`), and write the output
    /// and error files from the rows, all in one transaction. Idempotent: a batch no longer in
    /// `from` is left alone.
    pub fn complete(
        &self,
        id: &str,
        from: &[BatchStatus],
        to: BatchStatus,
        pending_error: Option<&dyn Fn(&str) -> String>,
        now: u64,
        new_file_id: &mut dyn FnMut() -> String,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if !transition(&tx, id, from, to, now)? {
            return Ok(false);
        }
        if let Some(make) = pending_error {
            let pending: Vec<(i64, String)> = tx
                .prepare("SELECT idx, custom_id FROM batch_lines WHERE batch_id = ?1 AND state = 'pending'")?
                .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let mut update = tx.prepare(
                "UPDATE batch_lines SET state = 'failed', result = ?3 WHERE batch_id = ?1 AND idx = ?2",
            )?;
            for (idx, custom_id) in pending {
                update.execute(params![id, idx, make(&custom_id)])?;
            }
        }
        let mut output = Vec::new();
        let mut errors = Vec::new();
        {
            let mut stmt = tx.prepare(
                "SELECT state, result FROM batch_lines WHERE batch_id = ?1 AND state != 'pending' ORDER BY idx",
            )?;
            let mut rows = stmt.query([id])?;
            while let Some(row) = rows.next()? {
                let state: String = row.get(0)?;
                let result: Option<String> = row.get(1)?;
                let Some(result) = result else { continue };
                let target = if state == "succeeded" {
                    &mut output
                } else {
                    &mut errors
                };
                target.extend_from_slice(result.as_bytes());
                target.push(b'\n');
            }
        }
        for (content, column, name) in [
            (&output, "output_file_id", "output"),
            (&errors, "error_file_id", "error"),
        ] {
            if content.is_empty() {
                continue;
            }
            let file_id = new_file_id();
            tx.execute(
                "INSERT INTO files (id, bytes, created_at, filename, purpose, content) VALUES (?1, ?2, ?3, ?4, 'batch_output', ?5)",
                params![file_id, content.len() as i64, now as i64, format!("batch_{id}_{name}.jsonl"), content],
            )?;
            tx.execute(
                &format!("UPDATE batches SET {column} = ?2 WHERE id = ?1"),
                params![id, file_id],
            )?;
        }
        tx.commit()?;
        Ok(true)
    }
}

fn file_object(
    id: String,
    bytes: u64,
    created_at: u64,
    filename: String,
    purpose: String,
) -> FileObject {
    FileObject {
        id,
        object: "file",
        bytes,
        created_at,
        filename,
        purpose,
        status: "processed",
        expires_at: None,
        status_details: None,
    }
}

fn file_row(r: &Row<'_>) -> rusqlite::Result<FileObject> {
    Ok(file_object(
        r.get(0)?,
        r.get::<_, i64>(1)? as u64,
        r.get::<_, i64>(2)? as u64,
        r.get(3)?,
        r.get(4)?,
    ))
}

fn seq_of(conn: &Connection, table: &str, id: &str) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .query_row(
            &format!("SELECT seq FROM {table} WHERE id = ?1"),
            [id],
            |r| r.get(0),
        )
        .optional()?)
}

fn transition(
    conn: &Connection,
    id: &str,
    from: &[BatchStatus],
    to: BatchStatus,
    now: u64,
) -> Result<bool, StoreError> {
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let placeholders = (0..from.len())
        .map(|i| format!("?{}", i + 4))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "UPDATE batches SET status = ?2, {} = ?3 WHERE id = ?1 AND status IN ({placeholders})",
        to.timestamp_column()
    );
    let mut values: Vec<rusqlite::types::Value> = vec![
        id.to_string().into(),
        to.as_str().to_string().into(),
        (now as i64).into(),
    ];
    values.extend(from.into_iter().map(|s| s.to_string().into()));
    Ok(conn.execute(&sql, rusqlite::params_from_iter(values))? > 0)
}

fn batch_by_id(conn: &Connection, id: &str) -> Result<Option<BatchObject>, StoreError> {
    // The row as stored; the text columns (status, errors, metadata) are parsed below.
    let row = conn
        .query_row(
            "SELECT id, endpoint, input_file_id, completion_window, output_file_id, error_file_id,
                    created_at, in_progress_at, expires_at, finalizing_at, completed_at, failed_at,
                    expired_at, cancelling_at, cancelled_at, total, status, errors, metadata
             FROM batches WHERE id = ?1",
            [id],
            |r| {
                let ts = |i: usize| -> rusqlite::Result<Option<u64>> {
                    Ok(r.get::<_, Option<i64>>(i)?.map(|v| v as u64))
                };
                let batch = BatchObject {
                    id: r.get(0)?,
                    object: "batch",
                    endpoint: r.get(1)?,
                    errors: None,
                    input_file_id: r.get(2)?,
                    completion_window: r.get(3)?,
                    status: BatchStatus::Validating,
                    output_file_id: r.get(4)?,
                    error_file_id: r.get(5)?,
                    created_at: ts(6)?.unwrap_or(0),
                    in_progress_at: ts(7)?,
                    expires_at: ts(8)?,
                    finalizing_at: ts(9)?,
                    completed_at: ts(10)?,
                    failed_at: ts(11)?,
                    expired_at: ts(12)?,
                    cancelling_at: ts(13)?,
                    cancelled_at: ts(14)?,
                    request_counts: RequestCounts {
                        total: r.get::<_, i64>(15)? as u64,
                        completed: 0,
                        failed: 0,
                    },
                    metadata: None,
                };
                let texts = (
                    r.get::<_, String>(16)?,
                    r.get::<_, Option<String>>(17)?,
                    r.get::<_, Option<String>>(18)?,
                );
                Ok((batch, texts))
            },
        )
        .optional()?;
    let Some((mut batch, (status, errors, metadata))) = row else {
        return Ok(None);
    };
    batch.status = BatchStatus::parse(&status)
        .ok_or_else(|| StoreError::Corrupt(format!("batch {id} has status {status}")))?;
    if let Some(text) = errors {
        batch.errors = Some(BatchErrors {
            object: "list",
            data: parse_errors(&text)?,
        });
    }
    if let Some(text) = metadata {
        batch.metadata = Some(
            serde_json::from_str(&text)
                .map_err(|e| StoreError::Corrupt(format!("metadata of {id}: {e}")))?,
        );
    }
    let (completed, failed) = conn.query_row(
        "SELECT COALESCE(SUM(state = 'succeeded'), 0), COALESCE(SUM(state = 'failed'), 0) FROM batch_lines WHERE batch_id = ?1",
        [id],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )?;
    batch.request_counts.completed = completed;
    batch.request_counts.failed = failed;
    Ok(Some(batch))
}

fn parse_errors(text: &str) -> Result<Vec<BatchError>, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("batch errors: {e}")))
}

#[cfg(test)]
mod tests;
