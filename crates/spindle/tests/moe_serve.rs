//! Mixture-of-experts models through the real binary: `spindle serve` on a tiny MoE config with
//! `--load-format dummy` (random weights, byte tokenizer) answers completions, and greedy text is
//! the same whether a request runs alone or batched with identical ones (the experts' token
//! groups differ between the two; each sequence's result must not).

mod common;
use common::free_port;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One HTTP/1.1 request; the status line's code and the body.
fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.get(9..12)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `spindle serve` on the golden config `family` (vocabulary widened for the byte tokenizer).
fn serve(family: &str) -> Server {
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden")
        .join(family)
        .join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&golden).expect("golden config"))
            .expect("json");
    config["vocab_size"] = 320.into();
    let dir =
        std::env::temp_dir().join(format!("spindle-moe-serve-{}-{family}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write config");
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_spindle"))
        .args(["serve", "--model"])
        .arg(dir.join("config.json"))
        .args(["--load-format", "dummy", "--host", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(["--max-model-len", "256", "--kv-cache-memory", "64MiB"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn spindle serve");
    let server = Server { child, port, dir };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            Instant::now() < deadline,
            "{family}: not healthy within 120 s"
        );
        if let Some((200, _)) = http(port, "GET", "/health", "") {
            return server;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn complete(port: u16, prompt: &str) -> String {
    let body = serde_json::json!({
        "model": "any", "prompt": prompt, "max_tokens": 24, "temperature": 0,
        "ignore_eos": true
    });
    let models = http(port, "GET", "/v1/models", "").expect("models").1;
    let id = serde_json::from_str::<serde_json::Value>(&models).expect("json")["data"][0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let mut body = body;
    body["model"] = id.into();
    let (code, text) = http(port, "POST", "/v1/completions", &body.to_string()).expect("reply");
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["usage"]["completion_tokens"], 24, "{text}");
    v["choices"][0]["text"].as_str().expect("text").to_string()
}

fn alone_and_batched_agree(family: &str) {
    let server = serve(family);
    let port = server.port;
    let prompt = "The experts of a mixture";
    let alone = complete(port, prompt);
    let batched: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                s.spawn(move || {
                    // Different prompts next to ours change every expert's token group.
                    if i == 0 {
                        complete(port, prompt)
                    } else {
                        let _ = complete(port, &format!("other text number {i}"));
                        complete(port, prompt)
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    eprintln!("{family}: {alone:?}");
    for b in &batched {
        assert_eq!(b, &alone, "{family}: greedy text changed with the batch");
    }
}

#[test]
fn qwen3_moe_serves_and_is_batch_invariant() {
    alone_and_batched_agree("tiny-qwen3-moe");
}

#[test]
fn gpt_oss_serves_and_is_batch_invariant() {
    alone_and_batched_agree("tiny-gpt-oss");
}
