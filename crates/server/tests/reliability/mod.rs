//! Shared helpers of the reliability suites (load, disconnect storm, bad input, engine death):
//! a real engine with the default model behind a real server on 127.0.0.1:0, small HTTP
//! clients (hyper and raw TCP), SSE and Prometheus parsing, and process probes (RSS, threads).
//! Every wait has a generous deadline so a broken server fails the test instead of hanging it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use spindle_engine::{Engine, EngineConfig, EngineHandle};
use spindle_model::LoadOptions;
use spindle_server::{Metrics, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The name clients use in `model`.
pub const MODEL_NAME: &str = "smollm2";

/// The default model, fetched by scripts/fetch-model.sh.
pub fn model_path() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model.sh",
        path.display()
    );
    path.display().to_string()
}

/// Qwen2.5-Coder-0.5B-Instruct's GGUF, fetched by scripts/fetch-qwen.sh.
pub fn qwen_path() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-qwen.sh",
        path.display()
    );
    path.display().to_string()
}

/// A small engine: context 1024, 128 MiB of KV cache (about 180 blocks of 16 tokens).
pub fn engine_config(metrics: &Arc<Metrics>) -> EngineConfig {
    EngineConfig {
        model: LoadOptions {
            model: model_path(),
            max_model_len: Some(1024),
            ..LoadOptions::default()
        },
        max_num_seqs: 64,
        kv_cache_memory_bytes: Some(128 << 20),
        observer: Some(metrics.clone()),
        ..EngineConfig::default()
    }
}

/// Start an engine (with metrics feeding from it) after `tweak` adjusted its configuration.
pub fn start_engine(tweak: impl FnOnce(&mut EngineConfig)) -> (EngineHandle, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new(MODEL_NAME, 1024).expect("metrics"));
    let mut cfg = engine_config(&metrics);
    tweak(&mut cfg);
    let engine = Engine::spawn(cfg).expect("engine starts");
    (engine, metrics)
}

/// A server running on the test's runtime until `shutdown`.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), spindle_server::ServerError>>,
}

impl TestServer {
    pub async fn start(
        engine: EngineHandle,
        metrics: Arc<Metrics>,
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        let mut cfg = ServerConfig {
            host: "127.0.0.1".into(),
            port: 0,
            served_model_names: vec![MODEL_NAME.into()],
            model_root: model_path(),
            ..ServerConfig::default()
        };
        tweak(&mut cfg);
        let server = Server::bind(cfg, engine, metrics).await.expect("bind");
        let addr = server.local_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            stop: Some(tx),
            task,
        }
    }

    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(60), &mut self.task)
            .await
            .expect("server stops")
            .expect("server task")
            .expect("serve ok");
    }
}

impl TestServer {
    /// The default model with default engine and server settings (most HTTP tests).
    pub async fn start_default() -> Self {
        let (engine, metrics) = start_engine(|_| {});
        Self::start(engine, metrics, |_| {}).await
    }
}

/// POST `body` and require an OpenAI error with `status` and, if given, `param`.
pub async fn expect_api_error(
    addr: SocketAddr,
    path: &str,
    body: &Value,
    status: u16,
    param: Option<&str>,
) {
    let r = post(addr, path, body).await;
    assert_eq!(r.status.as_u16(), status, "{path} {body}: {}", r.text());
    let e = assert_openai_error(r.status, &r.body);
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{path} {body}: {e}");
    }
}

/// A response read to the end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Check that `body` is an OpenAI error object for `status`; returns the inner `error`.
pub fn assert_openai_error(status: StatusCode, body: &[u8]) -> Value {
    let v: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "error body is not JSON ({e}): {}",
            String::from_utf8_lossy(body)
        )
    });
    let e = &v["error"];
    assert!(e["message"].is_string(), "error.message missing: {v}");
    assert!(e["type"].is_string(), "error.type missing: {v}");
    assert!(e.get("param").is_some(), "error.param missing: {v}");
    assert_eq!(
        e["code"],
        status.as_u16(),
        "error.code must be the status: {v}"
    );
    e.clone()
}

/// Open an HTTP/1.1 connection and send one request; the response head comes back with its
/// live body, plus the connection task (abort it to drop the connection).
pub async fn open(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> hyper::Result<(Response<Incoming>, JoinHandle<()>)> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn_task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body))).expect("request");
    match sender.send_request(req).await {
        Ok(resp) => Ok((resp, conn_task)),
        Err(e) => {
            conn_task.abort();
            Err(e)
        }
    }
}

/// One request, read to the end.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Reply {
    let (resp, conn) = open(addr, method, path, headers, body).await.expect("send");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    conn.abort();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    call(addr, "GET", path, &[], Vec::new()).await
}

pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> Reply {
    call(
        addr,
        "POST",
        path,
        &[("content-type", "application/json")],
        body.to_string().into_bytes(),
    )
    .await
}

/// Send raw bytes on a fresh connection, then read until the server closes it or `quiet`
/// passes without data (raw HTTP for cases a well-behaved client cannot produce).
pub async fn raw(addr: SocketAddr, request: &[u8], quiet: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    read_until_quiet(&mut s, quiet).await
}

/// Read until EOF, a reset, or `quiet` without data.
pub async fn read_until_quiet(s: &mut TcpStream, quiet: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// One HTTP/1.x response parsed out of raw bytes.
#[derive(Debug)]
pub struct RawResponse {
    pub version: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Parse consecutive responses (pipelining) with `Content-Length` or chunked bodies.
pub fn parse_responses(mut bytes: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    while let Some(head_end) = find(bytes, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default().to_string();
        let status = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let rest = &bytes[head_end + 4..];
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        let (body, consumed) =
            if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
                let len = len.min(rest.len());
                (rest[..len].to_vec(), len)
            } else if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
                dechunk(rest)
            } else {
                (rest.to_vec(), rest.len())
            };
        out.push(RawResponse {
            version,
            status,
            headers,
            body,
        });
        bytes = &rest[consumed..];
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut b: &[u8]) -> (Vec<u8>, usize) {
    let total = b.len();
    let mut out = Vec::new();
    while let Some(eol) = find(b, b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        b = &b[eol + 2..];
        if size == 0 {
            let trailer = find(b, b"\r\n").map_or(b.len(), |i| i + 2);
            b = &b[trailer..];
            break;
        }
        let size = size.min(b.len());
        out.extend_from_slice(&b[..size]);
        b = &b[(size + 2).min(b.len())..];
    }
    (out, total - b.len())
}

/// The `data:` payloads of an SSE body, `[DONE]` included; panics on a malformed frame.
pub fn sse_events(body: &str) -> Result<Vec<String>, String> {
    if !body.ends_with("\n\n") {
        return Err(format!("SSE body does not end with a blank line: {body:?}"));
    }
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .map(str::to_string)
                .ok_or_else(|| format!("not a data line: {e:?}"))
        })
        .collect()
}

/// Check a complete streamed chat completion: role chunk first, one id throughout, exactly one
/// finish_reason per choice, `[DONE]` last, no error event. Returns the generated text.
pub fn check_chat_stream(body: &str) -> Result<String, String> {
    let events = sse_events(body)?;
    let (done, chunks) = events.split_last().ok_or("empty stream")?;
    if done != "[DONE]" {
        return Err(format!("stream does not end with [DONE]: {body}"));
    }
    let chunks: Vec<Value> = chunks
        .iter()
        .map(|c| serde_json::from_str(c).map_err(|e| format!("bad chunk {c}: {e}")))
        .collect::<Result<_, _>>()?;
    let first = chunks.first().ok_or("no chunks")?;
    if first["choices"][0]["delta"]["role"] != "assistant" {
        return Err(format!("first chunk is not the role chunk: {first}"));
    }
    let id = first["id"].as_str().ok_or("no id")?;
    let mut finishes = 0;
    let mut text = String::new();
    for c in &chunks {
        if c.get("error").is_some() {
            return Err(format!("error event in the stream: {c}"));
        }
        if c["id"] != id || c["object"] != "chat.completion.chunk" {
            return Err(format!("chunk with a different id or object: {c}"));
        }
        if let Some(choice) = c["choices"].get(0) {
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            if !choice["finish_reason"].is_null() {
                finishes += 1;
            }
        }
    }
    if finishes != 1 {
        return Err(format!("{finishes} finish_reason chunks: {body}"));
    }
    Ok(text)
}

/// Read SSE frames until one carries generated text (completions `text` or chat
/// `delta.content`): the request is running in the engine. Returns what was read.
pub async fn wait_first_token(resp: &mut Response<Incoming>) -> String {
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let frame = tokio::time::timeout(Duration::from_secs(60), resp.body_mut().frame())
            .await
            .expect("frame in time")
            .expect("stream not ended")
            .expect("frame ok");
        if let Ok(data) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
            let has_token = seen
                .split("\n\n")
                .filter_map(|e| e.strip_prefix("data: "))
                .any(|e| {
                    let v: Value = serde_json::from_str(e).unwrap_or(Value::Null);
                    let c = &v["choices"][0];
                    c["text"].as_str().is_some_and(|t| !t.is_empty())
                        || c["delta"]["content"]
                            .as_str()
                            .is_some_and(|t| !t.is_empty())
                });
            if has_token {
                return seen;
            }
        }
    }
    panic!("no token within the deadline");
}

/// A metric's value from Prometheus text, by the start of its line (name and labels).
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{prefix} not in metrics"))
}

/// (running, waiting, KV usage) as `/metrics` reports them.
pub async fn engine_gauges(addr: SocketAddr) -> (f64, f64, f64) {
    let text = get(addr, "/metrics").await.text();
    let label = format!("{{model_name=\"{MODEL_NAME}\"}}");
    (
        metric(&text, &format!("vllm:num_requests_running{label}")),
        metric(&text, &format!("vllm:num_requests_waiting{label}")),
        metric(&text, &format!("vllm:kv_cache_usage_perc{label}")),
    )
}

/// Poll `/metrics` until nothing runs or waits and the KV cache is idle again, or panic.
pub async fn wait_engine_idle(addr: SocketAddr, within: Duration) {
    let start = Instant::now();
    loop {
        let (running, waiting, kv) = engine_gauges(addr).await;
        if running == 0.0 && waiting == 0.0 && kv == 0.0 {
            return;
        }
        assert!(
            start.elapsed() < within,
            "engine not idle after {within:?}: running={running} waiting={waiting} kv={kv}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// This process's resident memory, from /proc/self/status (KiB).
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Threads of this process, from /proc/self/task.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .count()
}
