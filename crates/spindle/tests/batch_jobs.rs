//! Batch jobs with the real binary on the default model: a `spindle serve` killed with SIGKILL
//! in the middle of a batch and started again on the same `--data-dir` finishes the batch with
//! every `custom_id` answered exactly once and nothing finished before the crash run again; and
//! `spindle run-batch` on a small file.

mod common;
use common::model_path;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spindle-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The server process; killed and reaped if a test fails.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(data_dir: &Path) -> (Served, String) {
    let mut child = Served(
        Command::new(env!("CARGO_BIN_EXE_spindle"))
            .args(["serve", &model_path(), "--host", "127.0.0.1", "--port", "0"])
            .args(["--max-model-len", "512", "--kv-cache-memory", "64MiB"])
            .args(["--served-model-name", "m", "--max-batch-in-flight", "4"])
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn spindle serve"),
    );
    let stderr = child.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("spindle serve did not report its address"));
        if line.contains("serving ") {
            let addr = line.rsplit(' ').next().unwrap_or_default().to_string();
            // Keep draining stderr so the server never blocks on a full pipe.
            std::thread::spawn(move || while rx.recv().is_ok() {});
            return (child, addr);
        }
    }
}

/// One HTTP/1.1 request (`Connection: close`): status and body.
fn http(addr: &str, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let status = std::str::from_utf8(&out[9..12])
        .expect("status")
        .parse()
        .expect("status");
    (status, out[split + 4..].to_vec())
}

fn get_json(addr: &str, path: &str) -> Value {
    let (status, body) = http(addr, "GET", path, "application/json", b"");
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).expect("JSON")
}

fn metric(addr: &str, name: &str) -> f64 {
    let (_, body) = http(addr, "GET", "/metrics", "text/plain", b"");
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn upload(addr: &str, content: &str) -> String {
    let boundary = "crash-test-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    let (status, resp) = http(
        addr,
        "POST",
        "/v1/files",
        &format!("multipart/form-data; boundary={boundary}"),
        body.as_bytes(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    let v: Value = serde_json::from_slice(&resp).expect("JSON");
    v["id"].as_str().expect("id").to_string()
}

fn lines(n: usize, max_tokens: usize) -> String {
    (0..n)
        .map(|i| {
            json!({"custom_id": format!("line-{i}"), "method": "POST", "url": "/v1/completions",
                   "body": {"model": "m", "prompt": format!("Story number {i}:"), "max_tokens": max_tokens,
                            "ignore_eos": true, "temperature": 0}})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_batch_survives_sigkill_and_every_line_is_answered_once() {
    const TOTAL: usize = 24;
    let dir = temp_dir("batch-crash");
    let (mut first, addr) = serve(&dir);
    let file_id = upload(&addr, &lines(TOTAL, 48));
    let (status, body) = http(
        &addr,
        "POST",
        "/v1/batches",
        "application/json",
        json!({"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let batch: Value = serde_json::from_slice(&body).expect("JSON");
    let id = batch["id"].as_str().expect("id").to_string();

    // Let a few lines finish, then kill the server outright (SIGKILL: no drain, no cleanup).
    let deadline = Instant::now() + Duration::from_secs(120);
    let done_before = loop {
        let v = get_json(&addr, &format!("/v1/batches/{id}"));
        let done = v["request_counts"]["completed"].as_u64().unwrap_or(0);
        if done >= 4 {
            break done;
        }
        assert!(
            Instant::now() < deadline,
            "no progress before the kill: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    first.0.kill().expect("SIGKILL");
    first.0.wait().expect("reap");
    assert!(
        (done_before as usize) < TOTAL,
        "the batch finished before the kill"
    );

    // Same data dir: the lock died with the process; the batch resumes on its own.
    let (_second, addr) = serve(&dir);
    let deadline = Instant::now() + Duration::from_secs(180);
    let done = loop {
        let v = get_json(&addr, &format!("/v1/batches/{id}"));
        if v["status"] == "completed" {
            break v;
        }
        assert!(
            v["status"] == "in_progress" || v["status"] == "finalizing",
            "unexpected status after restart: {v}"
        );
        assert!(
            Instant::now() < deadline,
            "batch not finished after the restart: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        done["request_counts"],
        json!({"total": TOTAL, "completed": TOTAL, "failed": 0})
    );
    let out_id = done["output_file_id"].as_str().expect("output file");
    let (status, content) = http(
        &addr,
        "GET",
        &format!("/v1/files/{out_id}/content"),
        "text/plain",
        b"",
    );
    assert_eq!(status, 200);
    let mut ids: Vec<String> = String::from_utf8_lossy(&content)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("JSON line");
            assert_eq!(v["response"]["status_code"], 200, "{v}");
            assert_eq!(v["response"]["body"]["usage"]["completion_tokens"], 48);
            v["custom_id"].as_str().expect("custom_id").to_string()
        })
        .collect();
    assert_eq!(ids.len(), TOTAL, "one output line per input line");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), TOTAL, "every custom_id exactly once");
    // The new server ran only what was not recorded before the kill (at most the lines
    // recorded after the last poll, plus those in flight, run again).
    let rerun = metric(&addr, "vllm:request_success_total") as u64;
    assert!(
        rerun <= TOTAL as u64 - done_before,
        "{rerun} requests ran after the restart, but {done_before} of {TOTAL} were already done"
    );
}

#[test]
fn run_batch_writes_one_line_per_request_in_order() {
    let dir = temp_dir("run-batch");
    let input = dir.join("in.jsonl");
    let output = dir.join("out.jsonl");
    let mut text = lines(5, 8);
    text.push('\n');
    text.push_str(
        &json!({"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}})
        .to_string(),
    );
    text.push('\n');
    text.push_str(
        &json!({"custom_id": "bad", "method": "POST", "url": "/v1/completions",
                "body": {"prompt": "x", "temperature": -1}})
        .to_string(),
    );
    std::fs::write(&input, text).expect("write input");
    let out = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(["run-batch", "-i"])
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .args([
            "--model",
            &model_path(),
            "--max-model-len",
            "512",
            "--kv-cache-memory",
            "64MiB",
        ])
        .args(["--served-model-name", "m"])
        .env("NO_COLOR", "1")
        .output()
        .expect("run spindle run-batch");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = std::fs::read_to_string(&output)
        .expect("output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let ids: Vec<&str> = results
        .iter()
        .map(|v| v["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["line-0", "line-1", "line-2", "line-3", "line-4", "chat", "bad"]
    );
    for v in &results[..5] {
        assert_eq!(v["response"]["status_code"], 200);
        assert_eq!(v["response"]["body"]["object"], "text_completion");
        assert_eq!(v["response"]["body"]["usage"]["completion_tokens"], 8);
    }
    assert_eq!(results[5]["response"]["body"]["object"], "chat.completion");
    assert_eq!(results[6]["response"]["status_code"], 400);
    assert_eq!(
        results[6]["response"]["body"]["error"]["param"],
        "temperature"
    );

    // An input that is not batch input is refused before the model loads.
    std::fs::write(&input, "not json\n").expect("write input");
    let out = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(["run-batch", "-i"])
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .args(["--model", &model_path()])
        .output()
        .expect("run spindle run-batch");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1: not JSON"));
}

/// Two `spindle serve` on one host with default flags (one per port, as people run one vLLM per
/// GPU) both start: each stores its batch jobs under its own port. An explicit shared
/// `--data-dir` still fails clearly for the second.
#[test]
fn two_servers_on_one_host_need_no_flags() {
    let home = temp_dir("two-servers-home");
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port")
    };
    let (p1, p2) = (free_port(), free_port());
    let start = |port: u16| {
        let mut child = Served(
            Command::new(env!("CARGO_BIN_EXE_spindle"))
                .args(["serve", &model_path(), "--host", "127.0.0.1"])
                .args(["--port", &port.to_string()])
                .args(["--max-model-len", "512", "--kv-cache-memory", "64MiB"])
                .env("HOME", &home)
                .env_remove("XDG_DATA_HOME")
                .env_remove("SPINDLE_DATA_DIR")
                .env("NO_COLOR", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn spindle serve"),
        );
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = child.0.try_wait().expect("wait") {
                panic!("server on port {port} exited: {status}");
            }
            if TcpStream::connect(&addr).is_ok()
                && http(&addr, "GET", "/health", "application/json", b"").0 == 200
            {
                return (child, addr);
            }
            assert!(
                Instant::now() < deadline,
                "server on port {port} never became healthy"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let (_a, addr1) = start(p1);
    let (_b, addr2) = start(p2);
    for addr in [&addr1, &addr2] {
        let (status, body) = http(addr, "GET", "/v1/batches", "application/json", b"");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    let base = home.join(".local/share/spindle");
    assert!(base.join(format!("port-{p1}")).is_dir());
    assert!(base.join(format!("port-{p2}")).is_dir());
    // The same explicit directory twice: the second refuses to start, saying why.
    let shared = temp_dir("two-servers-shared");
    let (_c, _) = serve(&shared);
    let out = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(["serve", &model_path(), "--host", "127.0.0.1", "--port", "0"])
        .arg("--data-dir")
        .arg(&shared)
        .env("NO_COLOR", "1")
        .output()
        .expect("run spindle serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use"), "{err}");
}
