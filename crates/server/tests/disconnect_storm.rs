//! Disconnect storm: 200 clients that go away at random points — while sending headers, while
//! sending the body, right after the request (before the first response byte), after the role
//! chunk, mid-stream, during the chunked prefill of a long prompt, and while waiting for a
//! non-streaming answer. Afterwards the engine must be idle (`vllm:num_requests_running` and
//! `vllm:num_requests_waiting` 0, KV usage back to 0), no thread or tokio task may be left
//! behind, and the server must still serve.

mod reliability;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::StatusCode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reliability::*;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const CLIENTS: usize = 200;

/// Where a client gives up.
#[derive(Debug, Clone, Copy)]
enum DropPoint {
    /// Half the request head sent.
    MidHeaders,
    /// Head sent, half the declared body sent.
    MidBody,
    /// Whole request sent, nothing read.
    BeforeFirstByte,
    /// After the response head and the chat role chunk.
    AfterRoleChunk,
    /// After this many content chunks.
    MidStream(usize),
    /// A ~700-token prompt (prefilled in 128-token chunks), dropped after this many ms.
    DuringPrefill(u64),
    /// A non-streaming request, dropped after this many ms.
    NonStreaming(u64),
}

fn pick(rng: &mut StdRng) -> DropPoint {
    match rng.random_range(0..7) {
        0 => DropPoint::MidHeaders,
        1 => DropPoint::MidBody,
        2 => DropPoint::BeforeFirstByte,
        3 => DropPoint::AfterRoleChunk,
        4 => DropPoint::MidStream(rng.random_range(1..6)),
        5 => DropPoint::DuringPrefill(rng.random_range(0..400)),
        _ => DropPoint::NonStreaming(rng.random_range(0..600)),
    }
}

fn chat_body(i: usize, stream: bool) -> Vec<u8> {
    json!({
        "messages": [{"role": "user", "content": format!("Tell me a long story about client {i}.")}],
        "max_tokens": 200, "ignore_eos": true, "stream": stream,
    })
    .to_string()
    .into_bytes()
}

fn long_prompt_body(i: usize, stream: bool) -> Vec<u8> {
    // Unique from the first token on, so the prefix cache cannot skip the prefill.
    let words: String = (0..230)
        .map(|k| format!("w{} ", (k * 7 + i) % 97))
        .collect();
    json!({"prompt": format!("Client {i} says: {words}"), "max_tokens": 50, "stream": stream})
        .to_string()
        .into_bytes()
}

fn request_bytes(addr: SocketAddr, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Read SSE until `n` content chunks (0: just the role chunk) arrived; false if the stream ended.
async fn read_chunks(resp: &mut hyper::Response<hyper::body::Incoming>, n: usize) -> bool {
    let mut seen = String::new();
    loop {
        let events: Vec<&str> = seen
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .collect();
        let role = events.iter().any(|e| e.contains("\"role\":\"assistant\""));
        let content = events
            .iter()
            .filter(|e| e.contains("\"content\":\"") && !e.contains("\"role\""))
            .count();
        if role && content >= n {
            return true;
        }
        match tokio::time::timeout(Duration::from_secs(60), resp.body_mut().frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    seen.push_str(&String::from_utf8_lossy(&data));
                }
            }
            _ => return false,
        }
    }
}

async fn storm_client(addr: SocketAddr, i: usize, point: DropPoint, delay_ms: u64) {
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    let ct = [("content-type", "application/json")];
    match point {
        DropPoint::MidHeaders => {
            let req = request_bytes(addr, "/v1/chat/completions", &chat_body(i, true));
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let _ = s.write_all(&req[..40]).await;
        }
        DropPoint::MidBody => {
            let body = chat_body(i, true);
            let req = request_bytes(addr, "/v1/chat/completions", &body);
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let _ = s.write_all(&req[..req.len() - body.len() / 2]).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        DropPoint::BeforeFirstByte => {
            let req = request_bytes(addr, "/v1/chat/completions", &chat_body(i, true));
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let _ = s.write_all(&req).await;
        }
        DropPoint::AfterRoleChunk | DropPoint::MidStream(_) => {
            let n = if let DropPoint::MidStream(n) = point {
                n
            } else {
                0
            };
            let Ok((mut resp, conn)) = open(
                addr,
                "POST",
                "/v1/chat/completions",
                &ct,
                chat_body(i, true),
            )
            .await
            else {
                return;
            };
            if resp.status() == StatusCode::OK {
                read_chunks(&mut resp, n).await;
            }
            drop(resp);
            conn.abort();
        }
        DropPoint::DuringPrefill(ms) => {
            let sent = open(
                addr,
                "POST",
                "/v1/completions",
                &ct,
                long_prompt_body(i, true),
            );
            if let Ok(Ok((resp, conn))) =
                tokio::time::timeout(Duration::from_millis(ms), sent).await
            {
                drop(resp);
                conn.abort();
            }
        }
        DropPoint::NonStreaming(ms) => {
            let sent = open(
                addr,
                "POST",
                "/v1/chat/completions",
                &ct,
                chat_body(i, false),
            );
            // The response only comes when generation ends (200 tokens: many seconds), so the
            // timeout drops the request, and with it the connection, while it runs.
            let _ = tokio::time::timeout(Duration::from_millis(ms), sent).await;
        }
    }
}

/// Poll until `probe` is at most `target`, up to `within`; returns the last value.
async fn settle(probe: impl Fn() -> usize, target: usize, within: Duration) -> usize {
    let start = Instant::now();
    loop {
        let v = probe();
        if v <= target || start.elapsed() > within {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn disconnect_storm_leaves_nothing_behind() {
    // Short blocking-pool keep-alive so idle tokenizer threads exit quickly and the thread count
    // is comparable before and after.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_keep_alive(Duration::from_millis(100))
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (engine, metrics) = start_engine(|c| {
            c.max_num_batched_tokens = 128;
            c.stall_timeout = Some(Duration::from_secs(30));
        });
        let s = TestServer::start(engine.clone(), metrics, |_| {}).await;
        let rt = tokio::runtime::Handle::current();

        // Warm up every path once (rayon pool, blocking pool, template), then take the baseline.
        let r = post(s.addr, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": true})).await;
        assert_eq!(r.status, StatusCode::OK);
        let r = call(s.addr, "POST", "/v1/completions", &[("content-type", "application/json")], long_prompt_body(9999, false)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let prompt_tokens = r.json()["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
        assert!(prompt_tokens > 4 * 128, "the long prompt must need several prefill chunks: {prompt_tokens} tokens");
        wait_engine_idle(s.addr, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let threads_before = thread_count();
        let tasks_before = rt.metrics().num_alive_tasks();

        // Sample the engine while the storm runs, to show it really reached the engine.
        let sampler_engine = engine.clone();
        let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sampling_flag = sampling.clone();
        let sampler = tokio::spawn(async move {
            let (mut peak_running, mut peak_kv) = (0u64, 0f64);
            while sampling_flag.load(std::sync::atomic::Ordering::Relaxed) {
                let st = sampler_engine.stats();
                peak_running = peak_running.max(st.num_running.load(std::sync::atomic::Ordering::Relaxed));
                peak_kv = peak_kv.max(st.kv_cache_usage());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (peak_running, peak_kv)
        });
        let prompt_tokens_before = engine.stats().prompt_tokens_total.load(std::sync::atomic::Ordering::Relaxed);

        let mut rng = StdRng::seed_from_u64(0x5eed_d15c);
        let started = Instant::now();
        let mut counts = std::collections::BTreeMap::new();
        let clients: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let point = pick(&mut rng);
                *counts.entry(format!("{point:?}").split('(').next().unwrap_or_default().to_string()).or_insert(0) += 1;
                let delay = rng.random_range(0..1500);
                tokio::spawn(storm_client(s.addr, i, point, delay))
            })
            .collect();
        for c in clients {
            tokio::time::timeout(Duration::from_secs(120), c).await.expect("client finishes").expect("client task");
        }
        sampling.store(false, std::sync::atomic::Ordering::Relaxed);
        let (peak_running, peak_kv) = sampler.await.expect("sampler");
        let prompt_tokens = engine.stats().prompt_tokens_total.load(std::sync::atomic::Ordering::Relaxed) - prompt_tokens_before;
        println!(
            "storm: {CLIENTS} clients dropped in {:.1} s: {counts:?}; engine saw {prompt_tokens} prompt tokens, \
             peak {peak_running} running, peak KV usage {peak_kv:.2}",
            started.elapsed().as_secs_f64()
        );
        assert!(peak_running > 0 && peak_kv > 0.0, "the storm never reached the engine");

        // Every aborted request is gone from the engine and its KV blocks are free.
        wait_engine_idle(s.addr, Duration::from_secs(15)).await;
        let stats = engine.stats();
        assert_eq!(stats.num_submitted_unseen(), 0);

        // No leaked threads (blocking-pool threads exit after their keep-alive) or tasks
        // (connection tasks end when their socket closes).
        let threads_after = settle(thread_count, threads_before, Duration::from_secs(10)).await;
        let tasks_after = settle(|| rt.metrics().num_alive_tasks(), tasks_before, Duration::from_secs(10)).await;
        println!("threads {threads_before} -> {threads_after}, alive tokio tasks {tasks_before} -> {tasks_after}");
        assert!(threads_after <= threads_before, "threads leaked: {threads_before} before, {threads_after} after");
        assert!(tasks_after <= tasks_before, "tokio tasks leaked: {tasks_before} before, {tasks_after} after");

        // Still healthy and serving.
        assert_eq!(get(s.addr, "/health").await.status, StatusCode::OK);
        let r = post(s.addr, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": true})).await;
        assert_eq!(r.status, StatusCode::OK);
        check_chat_stream(&r.text()).expect("a complete stream after the storm");
        s.shutdown().await;
        engine.shutdown();
    });
}
