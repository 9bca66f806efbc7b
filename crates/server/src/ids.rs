//! Response ids and timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;

/// `{prefix}-{32 hex digits}`: a random id for a response, file or batch.
pub(crate) fn random_id(prefix: &str) -> String {
    let v: u128 = rand::rng().random();
    format!("{prefix}-{v:032x}")
}

/// Seconds since the Unix epoch (OpenAI's `created`).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
