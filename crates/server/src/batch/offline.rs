//! `spindle run-batch` (vLLM's offline command): read a JSONL file of requests, run every line
//! through the same handlers as the server (no listener, no store), and give back one output
//! line per input line, in input order, in OpenAI's batch line format. Each line's `url` picks
//! its endpoint, as in vLLM.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use spindle_engine::EngineHandle;

use super::input::BatchEndpoint;
use super::line::{run_line, LineResult};
use crate::config::ServerConfig;
use crate::error::ServerError;
use crate::metrics::Metrics;
use crate::state::AppState;

/// Why an offline batch could not run.
#[derive(Debug, thiserror::Error)]
pub enum OfflineBatchError {
    #[error("the input file is not valid batch input:\n{0}")]
    InvalidInput(String),
    #[error(transparent)]
    Setup(#[from] ServerError),
    #[error("the engine stopped: {0}")]
    EngineDead(String),
}

/// One input line, checked.
struct OfflineLine {
    custom_id: String,
    endpoint: BatchEndpoint,
    body: String,
}

fn parse_lines(text: &str) -> Result<Vec<OfflineLine>, OfflineBatchError> {
    let mut lines = Vec::new();
    let mut problems = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let parsed: Result<OfflineLine, String> = (|| {
            let v: Value =
                serde_json::from_str(raw).map_err(|e| format!("line {n}: not JSON: {e}"))?;
            let custom_id = v["custom_id"]
                .as_str()
                .ok_or_else(|| format!("line {n}: no `custom_id` string"))?
                .to_string();
            let url = v["url"]
                .as_str()
                .ok_or_else(|| format!("line {n}: no `url` string"))?;
            let endpoint = BatchEndpoint::parse(url).ok_or_else(|| {
                format!("line {n}: `url` {url} is not /v1/chat/completions, /v1/completions or /v1/embeddings")
            })?;
            if !v["body"].is_object() {
                return Err(format!("line {n}: no `body` object"));
            }
            Ok(OfflineLine {
                custom_id,
                endpoint,
                body: v["body"].to_string(),
            })
        })();
        match parsed {
            Ok(line) => lines.push(line),
            Err(p) => problems.push(p),
        }
    }
    if !problems.is_empty() {
        let shown: Vec<String> = problems.iter().take(20).cloned().collect();
        let more = problems.len().saturating_sub(shown.len());
        let mut msg = shown.join("\n");
        if more > 0 {
            msg.push_str(&format!("\n... and {more} more"));
        }
        return Err(OfflineBatchError::InvalidInput(msg));
    }
    Ok(lines)
}

/// A checked input file, ready to run.
pub struct OfflineInput(Vec<OfflineLine>);

impl OfflineInput {
    /// Parse and check `text` without running it (so a bad file is refused before a model
    /// loads).
    pub fn parse(text: &str) -> Result<Self, OfflineBatchError> {
        parse_lines(text).map(Self)
    }

    /// Number of requests.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Run every line of `input` with up to `concurrency` in the engine at once; `progress` is
/// called with (done, total) as lines finish. Returns the output lines in input order.
pub async fn run_batch_file(
    config: ServerConfig,
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    input: OfflineInput,
    concurrency: usize,
    progress: impl Fn(usize, usize),
) -> Result<Vec<String>, OfflineBatchError> {
    let lines = input.0;
    let total = lines.len();
    let config = ServerConfig {
        batch: None,
        ..config
    };
    let state = Arc::new(AppState::build(config, engine, metrics).await?);
    let mut outputs: Vec<Option<String>> = vec![None; total];
    let mut done = 0;
    progress(0, total);
    let mut results = futures_util::stream::iter(lines.into_iter().enumerate())
        .map(|(i, line)| {
            let state = state.clone();
            async move {
                loop {
                    match run_line(&state, line.endpoint, &line.custom_id, line.body.as_bytes())
                        .await
                    {
                        LineResult::Answered(_, text) => return Ok((i, text)),
                        LineResult::Retry(why) => {
                            if state.engine.is_dead() {
                                return Err(OfflineBatchError::EngineDead(why));
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        })
        .buffer_unordered(concurrency.max(1));
    while let Some(result) = results.next().await {
        let (i, text) = result?;
        outputs[i] = Some(text);
        done += 1;
        progress(done, total);
    }
    Ok(outputs.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_problems_are_reported_by_line() {
        let text = "{\"custom_id\": \"a\", \"url\": \"/v1/completions\", \"body\": {}}\n\nnope\n{\"custom_id\": \"b\", \"url\": \"/v2/x\", \"body\": {}}\n";
        let err = parse_lines(text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("line 3: not JSON"), "{err}");
        assert!(err.contains("line 4: `url` /v2/x"), "{err}");
        let ok = parse_lines(
            "{\"custom_id\": \"a\", \"url\": \"/v1/embeddings\", \"body\": {\"input\": \"x\"}}",
        )
        .unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].endpoint, BatchEndpoint::Embeddings);
    }
}
