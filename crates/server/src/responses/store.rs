//! Stored responses (`store: true`, the default): an SQLite database beside the batch store
//! under `--data-dir`, holding each response object, the conversation that led to it (chat
//! messages, for `previous_response_id`) and its input items (`GET .../input_items`).

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use crate::batch::store::StoreError;
use crate::error::ApiError;
use crate::pool::blocking;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    response TEXT NOT NULL,
    conversation TEXT NOT NULL,
    input_items TEXT NOT NULL
) WITHOUT ROWID;
";

/// One stored response.
#[derive(Debug, Clone)]
pub struct Stored {
    pub response: Value,
    /// The chat messages of the conversation up to and including this response's input
    /// (instructions left out, as the API does not carry them over).
    pub conversation: Vec<Value>,
    pub input_items: Vec<Value>,
}

/// What a response is stored with once it is complete: the store, and the request's
/// conversation and input items.
#[derive(Clone)]
pub struct Storage {
    pub store: Arc<ResponseStore>,
    pub conversation: Vec<Value>,
    pub input_items: Vec<Value>,
}

impl Storage {
    /// Store `response` under `id` with this request's conversation and input items.
    pub async fn save(self, id: String, created_at: u64, response: Value) -> Result<(), ApiError> {
        let stored = Stored {
            response,
            conversation: self.conversation,
            input_items: self.input_items,
        };
        put(self.store, id, created_at, stored).await
    }
}

/// Store `stored` under `id`, on the blocking pool.
pub async fn put(
    store: Arc<ResponseStore>,
    id: String,
    created_at: u64,
    stored: Stored,
) -> Result<(), ApiError> {
    blocking(move || store.put(&id, created_at, &stored).map_err(store_error)).await
}

/// A store failure as the API reports it.
pub fn store_error(e: StoreError) -> ApiError {
    ApiError::internal(format!("the response store failed: {e}"))
}

/// The store: one connection behind a mutex; every call blocks (run it on the blocking pool).
pub struct ResponseStore {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for ResponseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseStore").finish()
    }
}

fn corrupt(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl ResponseStore {
    /// Open (or create) `responses.db` in `dir` (the batch store holds the directory's lock).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            dir: dir.to_path_buf(),
            source,
        })?;
        let conn = Connection::open(dir.join("responses.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn put(&self, id: &str, created_at: u64, stored: &Stored) -> Result<(), StoreError> {
        let conversation = serde_json::to_string(&stored.conversation).map_err(corrupt)?;
        let input_items = serde_json::to_string(&stored.input_items).map_err(corrupt)?;
        self.conn().execute(
            "INSERT OR REPLACE INTO responses (id, created_at, response, conversation, input_items)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                id,
                created_at as i64,
                stored.response.to_string(),
                conversation,
                input_items
            ],
        )?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<Option<Stored>, StoreError> {
        let row = self
            .conn()
            .query_row(
                "SELECT response, conversation, input_items FROM responses WHERE id = ?1",
                params![id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                },
            )
            .optional()?;
        let Some((response, conversation, input_items)) = row else {
            return Ok(None);
        };
        Ok(Some(Stored {
            response: serde_json::from_str(&response).map_err(corrupt)?,
            conversation: serde_json::from_str(&conversation).map_err(corrupt)?,
            input_items: serde_json::from_str(&input_items).map_err(corrupt)?,
        }))
    }

    /// Whether a response was deleted.
    pub fn delete(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM responses WHERE id = ?1", params![id])?
            > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn put_get_delete() {
        let dir = std::env::temp_dir().join(format!("spindle-responses-{}", std::process::id()));
        let store = ResponseStore::open(&dir).expect("open");
        let s = Stored {
            response: json!({"id": "resp_1", "output": []}),
            conversation: vec![json!({"role": "user", "content": "hi"})],
            input_items: vec![json!({"type": "message", "role": "user", "content": "hi"})],
        };
        store.put("resp_1", 1, &s).expect("put");
        let got = store.get("resp_1").expect("get").expect("stored");
        assert_eq!(
            (got.response, got.conversation),
            (s.response, s.conversation)
        );
        assert!(store.delete("resp_1").expect("delete"));
        assert!(!store.delete("resp_1").expect("delete"));
        assert!(store.get("resp_1").expect("get").is_none());
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
