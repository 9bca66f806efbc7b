//! CPU-bound request work off the async runtime: template rendering, tokenization and large
//! response bodies run on tokio's blocking pool.

use crate::error::ApiError;

/// Run `f` on the blocking pool.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("a blocking task failed: {e}")))?
}
