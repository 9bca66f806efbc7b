//! `bench embeddings`: throughput and latency of `/v1/embeddings`. `--concurrency` clients each
//! send requests of `--batch-size` sentences back to back (a closed loop, as an indexing job
//! does) until `--num-requests` are done; the report gives requests/s, sentences/s, prompt
//! tokens/s (from the server's `usage`) and request latency percentiles. The corpus is a text
//! file (one sentence per line) or a synthetic one, which `--write-corpus` saves so that another
//! encoder (sentence-transformers, scripts/bench-embeddings-st.py) can run the same sentences.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::Method;
use serde::Serialize;
use serde_json::json;

use crate::client::{read_body, truncate, BaseUrl, HttpClient};
use crate::error::{BenchError, Result};
use crate::metrics::{summarize_ms, Summary};

/// What to run.
#[derive(Debug, Clone)]
pub struct EmbedBenchConfig {
    pub base_url: String,
    pub api_key: Option<String>,
    /// `None`: the first model of `/v1/models`.
    pub model: Option<String>,
    pub corpus: Vec<String>,
    pub concurrency: usize,
    pub batch_size: usize,
    pub num_requests: usize,
    pub percentiles: Vec<f64>,
    pub request_timeout: Duration,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct EmbedBenchResult {
    pub model: String,
    pub concurrency: usize,
    pub batch_size: usize,
    pub completed: usize,
    pub failed: usize,
    pub sentences: usize,
    pub prompt_tokens: u64,
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub sentences_per_s: f64,
    pub tokens_per_s: f64,
    /// Request latency (sent → whole body read), milliseconds.
    pub latency_ms: Summary,
    /// The first few errors, for the report.
    pub errors: Vec<String>,
}

/// `n` sentences of 6 to 40 words, deterministic for a seed: ordinary English words, so that
/// token counts resemble real text (about 1.2 tokens per word for a BERT vocabulary).
pub fn synthetic_corpus(n: usize, seed: u64) -> Vec<String> {
    const WORDS: &[&str] = &[
        "the",
        "model",
        "server",
        "returns",
        "a",
        "vector",
        "for",
        "each",
        "sentence",
        "and",
        "search",
        "finds",
        "similar",
        "documents",
        "in",
        "large",
        "collection",
        "of",
        "text",
        "about",
        "energy",
        "storage",
        "coastal",
        "towns",
        "history",
        "music",
        "river",
        "city",
        "quickly",
        "slowly",
        "green",
        "mountain",
        "engineers",
        "build",
        "bridges",
        "over",
        "water",
        "while",
        "children",
        "learn",
        "to",
        "read",
        "books",
        "with",
        "their",
        "friends",
        "every",
        "morning",
        "before",
        "school",
        "data",
        "network",
        "latency",
        "throughput",
        "cache",
        "memory",
        "garden",
        "kitchen",
        "recipe",
        "bread",
        "coffee",
    ];
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    (0..n)
        .map(|i| {
            let len = 6 + next() % 35;
            let words: Vec<&str> = (0..len).map(|_| WORDS[next() % WORDS.len()]).collect();
            format!("Item {i}: {}.", words.join(" "))
        })
        .collect()
}

/// Read a corpus file: one sentence per non-empty line.
pub fn read_corpus(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if lines.is_empty() {
        return Err(BenchError::Dataset {
            path: path.to_path_buf(),
            message: "no sentences (one per line expected)".into(),
        });
    }
    Ok(lines)
}

/// Write a corpus file (one sentence per line).
pub fn write_corpus(path: &Path, corpus: &[String]) -> Result<()> {
    std::fs::write(path, corpus.join("\n") + "\n").map_err(|e| BenchError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// One measured request: latency, sentences and tokens, or an error.
type Outcome = std::result::Result<(f64, usize, u64), String>;

async fn one_request(
    client: &HttpClient,
    model: &str,
    batch: Vec<String>,
    timeout: Duration,
) -> Outcome {
    let n = batch.len();
    let body = json!({"model": model, "input": batch, "encoding_format": "float"});
    let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let fut = async {
        let resp = client
            .send(Method::POST, "/v1/embeddings", Some(body))
            .await?;
        let status = resp.status().as_u16();
        let text = read_body(resp.into_body(), 256 << 20).await?;
        Ok::<_, String>((status, text))
    };
    let (status, text) = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))??;
    let latency = started.elapsed().as_secs_f64();
    if status != 200 {
        return Err(format!("HTTP {status}: {}", truncate(&text, 200)));
    }
    // Count the vectors without converting their numbers (the client shares the machine).
    #[derive(serde::Deserialize)]
    struct Usage {
        prompt_tokens: u64,
    }
    #[derive(serde::Deserialize)]
    struct Reply {
        data: Vec<serde::de::IgnoredAny>,
        usage: Usage,
    }
    let v: Reply = serde_json::from_str(&text).map_err(|e| format!("bad JSON: {e}"))?;
    if v.data.len() != n {
        return Err(format!("{} embeddings for {n} inputs", v.data.len()));
    }
    Ok((latency, n, v.usage.prompt_tokens))
}

/// Run the benchmark.
pub async fn run_embeddings(cfg: &EmbedBenchConfig) -> Result<EmbedBenchResult> {
    if cfg.corpus.is_empty() || cfg.concurrency == 0 || cfg.batch_size == 0 || cfg.num_requests == 0
    {
        return Err(BenchError::InvalidArgument(
            "corpus, concurrency, batch size and number of requests must be positive".into(),
        ));
    }
    let client = HttpClient::new(BaseUrl::parse(&cfg.base_url)?, cfg.api_key.clone());
    let model = match &cfg.model {
        Some(m) => m.clone(),
        None => client.first_model(Duration::from_secs(30)).await?,
    };
    // One warm-up request (first touch of the weights and buffers), not measured.
    one_request(
        &client,
        &model,
        cfg.corpus.iter().take(cfg.batch_size).cloned().collect(),
        cfg.request_timeout,
    )
    .await
    .map_err(|e| BenchError::Server(format!("warm-up request failed: {e}")))?;

    let next = Arc::new(AtomicUsize::new(0));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::new(Mutex::new(Vec::new()));
    let corpus = Arc::new(cfg.corpus.clone());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..cfg.concurrency {
        let (client, model, next, outcomes, corpus) = (
            client.clone(),
            model.clone(),
            next.clone(),
            outcomes.clone(),
            corpus.clone(),
        );
        let (batch_size, total, timeout) = (cfg.batch_size, cfg.num_requests, cfg.request_timeout);
        tasks.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= total {
                    break;
                }
                let batch: Vec<String> = (0..batch_size)
                    .map(|j| corpus[(k * batch_size + j) % corpus.len()].clone())
                    .collect();
                let outcome = one_request(&client, &model, batch, timeout).await;
                if let Ok(mut o) = outcomes.lock() {
                    o.push(outcome);
                }
            }
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| BenchError::Server(format!("a client task failed: {e}")))?;
    }
    let duration_s = started.elapsed().as_secs_f64();
    let outcomes = std::mem::take(
        &mut *outcomes
            .lock()
            .map_err(|_| BenchError::Server("a client task panicked while recording".into()))?,
    );
    let mut latencies = Vec::new();
    let (mut sentences, mut tokens, mut errors, mut failed) = (0usize, 0u64, Vec::new(), 0usize);
    for o in outcomes {
        match o {
            Ok((lat, n, t)) => {
                latencies.push(lat);
                sentences += n;
                tokens += t;
            }
            Err(e) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(e);
                }
            }
        }
    }
    let completed = latencies.len();
    Ok(EmbedBenchResult {
        model,
        concurrency: cfg.concurrency,
        batch_size: cfg.batch_size,
        completed,
        failed,
        sentences,
        prompt_tokens: tokens,
        duration_s,
        requests_per_s: completed as f64 / duration_s,
        sentences_per_s: sentences as f64 / duration_s,
        tokens_per_s: tokens as f64 / duration_s,
        latency_ms: summarize_ms(&latencies, &cfg.percentiles),
        errors,
    })
}

/// A short text report.
pub fn format_embed_report(r: &EmbedBenchResult) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "==== embeddings benchmark: {} ({} clients x {} sentences per request) ====\n",
        r.model, r.concurrency, r.batch_size
    ));
    s.push_str(&format!(
        "requests: {} completed, {} failed in {:.2} s\n",
        r.completed, r.failed, r.duration_s
    ));
    s.push_str(&format!(
        "throughput: {:.2} requests/s, {:.1} sentences/s, {:.0} tokens/s ({} prompt tokens)\n",
        r.requests_per_s, r.sentences_per_s, r.tokens_per_s, r.prompt_tokens
    ));
    s.push_str(&format!(
        "latency ms: mean {:.1}, median {:.1}",
        r.latency_ms.mean, r.latency_ms.median
    ));
    for (k, v) in &r.latency_ms.percentiles {
        s.push_str(&format!(", {k} {v:.1}"));
    }
    s.push('\n');
    for e in &r.errors {
        s.push_str(&format!("error: {e}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_corpus_is_deterministic_and_varied() {
        let a = synthetic_corpus(50, 7);
        assert_eq!(a, synthetic_corpus(50, 7));
        assert_ne!(a, synthetic_corpus(50, 8));
        let lens: Vec<usize> = a.iter().map(|s| s.split(' ').count()).collect();
        assert!(lens.iter().min() < lens.iter().max());
        assert!(a.iter().all(|s| !s.contains('\n')));
    }

    #[test]
    fn bad_configs_are_refused() {
        let cfg = EmbedBenchConfig {
            base_url: "http://127.0.0.1:1".into(),
            api_key: None,
            model: Some("m".into()),
            corpus: vec![],
            concurrency: 1,
            batch_size: 1,
            num_requests: 1,
            percentiles: vec![50.0],
            request_timeout: Duration::from_secs(1),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        assert!(matches!(
            rt.block_on(run_embeddings(&cfg)),
            Err(BenchError::InvalidArgument(_))
        ));
    }
}
