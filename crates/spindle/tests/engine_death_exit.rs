//! `spindle serve` exits non-zero once its engine dies (panic or hang), after failing the
//! request in flight, so an orchestrator restarts it. Runs the real binary with the test-only
//! `SPINDLE_FAULT_INJECT` hook on the default model, on 127.0.0.1 with a free port.

mod common;
use common::model_path;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MARKER: &str = "ZQX-EXIT-MARKER";

/// Each server gets its own batch data directory (one server per directory).
static NEXT_DIR: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The server process; killed and reaped if a test fails before it exits on its own.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Start `spindle serve` with `fault` armed; returns the child, its address, and its stderr lines.
fn serve(fault: &str, extra: &[&str]) -> (Served, String, mpsc::Receiver<String>) {
    let child = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args([
            "serve",
            &model_path(),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--max-model-len",
            "512",
        ])
        .args(["--kv-cache-memory", "64MiB", "--served-model-name", "m"])
        .arg("--data-dir")
        .arg(std::env::temp_dir().join(format!(
            "spindle-death-test-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )))
        .args(extra)
        .env("SPINDLE_FAULT_INJECT", fault)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spindle serve");
    let mut child = Served(child);
    let stderr = child.0.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            panic!("spindle serve did not report its address");
        };
        if line.contains("serving ") {
            let addr = line.rsplit(' ').next().unwrap_or_default().to_string();
            return (child, addr, rx);
        }
    }
}

/// One HTTP/1.1 request with `Connection: close`; the raw response.
fn http(addr: &str, method: &str, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn wait_exit(child: &mut Served, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            panic!("spindle serve did not exit within {within:?} after its engine died");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn dies_and_exits_non_zero(fault: &str, extra: &[&str]) {
    let (mut child, addr, logs) = serve(fault, extra);
    assert!(http(&addr, "GET", "/health", "").starts_with("HTTP/1.1 200"));
    let body = format!(
        r#"{{"messages": [{{"role": "user", "content": "Say {MARKER}"}}], "max_tokens": 5, "stream": true}}"#
    );
    let resp = http(&addr, "POST", "/v1/chat/completions", &body);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // The body is chunked; the error event and [DONE] are its last two events.
    let error_at = resp
        .find("data: {\"error\"")
        .unwrap_or_else(|| panic!("no error event: {resp}"));
    let done_at = resp
        .find("data: [DONE]\n\n")
        .unwrap_or_else(|| panic!("no [DONE]: {resp}"));
    assert!(
        error_at < done_at && resp[error_at..].contains("\"code\":500"),
        "{resp}"
    );
    assert!(
        !resp[done_at + "data: [DONE]".len()..].contains("data: "),
        "nothing may follow [DONE]: {resp}"
    );
    let status = wait_exit(&mut child, Duration::from_secs(60));
    let logs: Vec<String> = logs.try_iter().collect();
    assert!(
        !status.success(),
        "spindle serve must exit non-zero after engine death, got {status}"
    );
    assert!(
        logs.iter().any(|l| l.contains("engine died")),
        "the exit should say why; stderr tail: {:#?}",
        &logs[logs.len().saturating_sub(10)..]
    );
}

#[test]
fn serve_exits_non_zero_when_the_engine_panics() {
    dies_and_exits_non_zero(&format!("panic:{MARKER}"), &[]);
}

#[test]
fn serve_exits_non_zero_when_the_engine_hangs() {
    dies_and_exits_non_zero(&format!("stall:{MARKER}"), &["--engine-stall-timeout", "1"]);
}

#[test]
fn a_bad_fault_spec_is_refused_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(["serve", &model_path(), "--host", "127.0.0.1", "--port", "0"])
        .env("SPINDLE_FAULT_INJECT", "explode:now")
        .output()
        .expect("run spindle serve");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid fault injection"));
}
