//! `/health` for orchestrators, with the real binary: the port answers 503 (OpenAI error body,
//! `Retry-After`) from the moment the process listens until the model is loaded and the engine
//! has completed its warm-up step, then 200; never 200 before 503.

mod common;
use common::{free_port, model_path};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// GET /health: the raw response, or `None` while nothing listens.
fn health(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn health_is_503_while_loading_then_200() {
    let port = free_port();
    let data = std::env::temp_dir().join(format!("spindle-health-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args([
            "serve",
            &model_path(),
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        // A large KV cache makes loading take a few seconds (it is allocated and touched).
        .args(["--max-model-len", "512", "--kv-cache-memory", "1GiB"])
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn spindle serve");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    let outcome = loop {
        if Instant::now() > deadline {
            break Err(format!("no 200 within 120 s; saw {seen:?}"));
        }
        match health(port) {
            None => std::thread::sleep(Duration::from_millis(5)),
            Some(r) if r.starts_with("HTTP/1.1 200") => {
                seen.push(200);
                break Ok(());
            }
            Some(r) if r.starts_with("HTTP/1.1 503") => {
                if !(r.contains("\"code\":503") && r.to_ascii_lowercase().contains("retry-after")) {
                    break Err(format!("503 without the OpenAI body or Retry-After: {r}"));
                }
                if seen.last() != Some(&503) {
                    seen.push(503);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Some(r) => break Err(format!("unexpected response: {r}")),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    outcome.unwrap();
    assert_eq!(seen, vec![503, 200], "503 while loading, then 200");
}
