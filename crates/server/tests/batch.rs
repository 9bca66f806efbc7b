//! The Batch API end to end on the default model, in process: upload, create, poll, download;
//! results equal direct requests (greedy); bad lines in the error file; cancellation mid-batch;
//! validation failures; restart from the same data directory; the 400/404/409/413/415 cases.

mod reliability;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use reliability::*;
use serde_json::{json, Value};
use spindle_server::batch::BatchConfig;

fn data_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("spindle-batch-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

async fn start(dir: &PathBuf, tweak: impl FnOnce(&mut BatchConfig)) -> TestServer {
    let (engine, metrics) = start_engine(|_| {});
    let mut batch = BatchConfig::new(dir);
    tweak(&mut batch);
    TestServer::start(engine, metrics, |c| c.batch = Some(batch)).await
}

const BOUNDARY: &str = "spindle-test-boundary-7f3a";

fn multipart(fields: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, data) in fields {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/jsonl\r\n\r\n").as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

async fn upload_raw(addr: SocketAddr, fields: &[(&str, Option<&str>, &[u8])]) -> Reply {
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    call(
        addr,
        "POST",
        "/v1/files",
        &[("content-type", &ct)],
        multipart(fields),
    )
    .await
}

async fn upload(addr: SocketAddr, content: &str) -> String {
    let r = upload_raw(
        addr,
        &[
            ("purpose", None, b"batch"),
            ("file", Some("in.jsonl"), content.as_bytes()),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "file");
    assert_eq!(v["purpose"], "batch");
    assert_eq!(v["bytes"], content.len());
    v["id"].as_str().expect("file id").to_string()
}

async fn create(addr: SocketAddr, file_id: &str, endpoint: &str) -> String {
    let r = post(
        addr,
        "/v1/batches",
        &json!({"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h",
                "metadata": {"suite": "batch"}}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "batch");
    assert_eq!(v["status"], "validating");
    assert_eq!(v["metadata"]["suite"], "batch");
    v["id"].as_str().expect("batch id").to_string()
}

async fn wait_status(addr: SocketAddr, id: &str, done: &[&str], within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v = get(addr, &format!("/v1/batches/{id}")).await.json();
        if done.iter().any(|s| v["status"] == *s) {
            return v;
        }
        assert!(Instant::now() < deadline, "batch stuck: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn file_lines(addr: SocketAddr, id: &Value) -> Vec<Value> {
    let Some(id) = id.as_str() else {
        return Vec::new();
    };
    let r = get(addr, &format!("/v1/files/{id}/content")).await;
    assert_eq!(r.status, StatusCode::OK);
    r.text()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

fn line(custom_id: &str, url: &str, body: Value) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).to_string()
}

fn prompt(i: usize) -> String {
    let topics = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time,",
        "The three primary colors are",
    ];
    format!("{} ({i})", topics[i % topics.len()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_completes_with_the_same_results_as_direct_requests() {
    let dir = data_dir("roundtrip");
    let server = start(&dir, |_| {}).await;
    let addr = server.addr;
    let mut lines = Vec::new();
    for i in 0..10 {
        lines.push(line(
            &format!("req-{i}"),
            "/v1/completions",
            json!({"model": MODEL_NAME, "prompt": prompt(i), "max_tokens": 12, "temperature": 0}),
        ));
    }
    // Bad inside the body: answered in the error file, like a live 400.
    lines.push(line(
        "bad-max-tokens",
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 0}),
    ));
    lines.push(line(
        "bad-stream",
        "/v1/completions",
        json!({"prompt": "x", "stream": true}),
    ));
    let file_id = upload(addr, &(lines.join("\n") + "\n")).await;
    let listed = get(addr, "/v1/files?purpose=batch").await.json();
    assert!(listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["id"] == file_id.as_str()));

    let id = create(addr, &file_id, "/v1/completions").await;
    let done = wait_status(
        addr,
        &id,
        &["completed", "failed"],
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 12, "completed": 10, "failed": 2})
    );
    for ts in [
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "expires_at",
    ] {
        assert!(done[ts].is_u64(), "{ts}: {done}");
    }
    let output = file_lines(addr, &done["output_file_id"]).await;
    let errors = file_lines(addr, &done["error_file_id"]).await;
    assert_eq!((output.len(), errors.len()), (10, 2));

    // Every custom_id exactly once across both files.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for l in output.iter().chain(&errors) {
        *seen
            .entry(l["custom_id"].as_str().unwrap().to_string())
            .or_default() += 1;
        assert!(l["id"].as_str().unwrap().starts_with("batch_req_"));
    }
    assert_eq!(seen.len(), 12);
    assert!(seen.values().all(|&n| n == 1));

    for l in &errors {
        assert_eq!(l["response"]["status_code"], 400, "{l}");
        let param = &l["response"]["body"]["error"]["param"];
        match l["custom_id"].as_str() {
            Some("bad-max-tokens") => assert_eq!(param, "max_tokens"),
            Some("bad-stream") => assert_eq!(param, "stream"),
            other => panic!("unexpected error line {other:?}"),
        }
    }
    // Greedy results equal the same requests sent directly.
    for l in &output {
        assert_eq!(l["response"]["status_code"], 200);
        assert!(l["error"].is_null());
        let i: usize = l["custom_id"].as_str().unwrap()["req-".len()..]
            .parse()
            .unwrap();
        let direct = post(
            addr,
            "/v1/completions",
            &json!({"model": MODEL_NAME, "prompt": prompt(i), "max_tokens": 12, "temperature": 0}),
        )
        .await
        .json();
        assert_eq!(
            l["response"]["body"]["choices"][0]["text"], direct["choices"][0]["text"],
            "{}",
            l["custom_id"]
        );
        assert_eq!(l["response"]["body"]["usage"], direct["usage"]);
    }
    let listed = get(addr, "/v1/batches?limit=1").await.json();
    assert_eq!(listed["data"][0]["id"], id.as_str());
    assert_eq!(listed["object"], "list");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chat_batch_runs_and_a_cancelled_batch_keeps_what_finished() {
    let dir = data_dir("cancel");
    let server = start(&dir, |b| b.max_in_flight = 4).await;
    let addr = server.addr;

    let chat = (0..3)
        .map(|i| {
            line(
                &format!("chat-{i}"),
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": prompt(i)}], "max_tokens": 6, "temperature": 0}),
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let id = create(addr, &upload(addr, &chat).await, "/v1/chat/completions").await;
    let done = wait_status(addr, &id, &["completed"], Duration::from_secs(60)).await;
    let output = file_lines(addr, &done["output_file_id"]).await;
    assert_eq!(output.len(), 3);
    assert_eq!(output[0]["response"]["body"]["object"], "chat.completion");

    // 40 long lines, 4 in flight: cancel once a few are done.
    let long = (0..40)
        .map(|i| {
            line(
                &format!("long-{i}"),
                "/v1/completions",
                json!({"prompt": prompt(i), "max_tokens": 64, "ignore_eos": true}),
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let id = create(addr, &upload(addr, &long).await, "/v1/completions").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = get(addr, &format!("/v1/batches/{id}")).await.json();
        if v["request_counts"]["completed"].as_u64().unwrap_or(0) >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = post(addr, &format!("/v1/batches/{id}/cancel"), &json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(
        r.json()["status"] == "cancelling" || r.json()["status"] == "cancelled",
        "{}",
        r.text()
    );
    let done = wait_status(addr, &id, &["cancelled"], Duration::from_secs(30)).await;
    assert!(done["cancelling_at"].is_u64() && done["cancelled_at"].is_u64());
    let completed = done["request_counts"]["completed"].as_u64().unwrap();
    assert!((2..40).contains(&completed), "{done}");
    let output = file_lines(addr, &done["output_file_id"]).await;
    assert_eq!(output.len() as u64, completed);
    // Cancelling again is harmless; the lines in flight were aborted, so the engine empties.
    let again = post(addr, &format!("/v1/batches/{id}/cancel"), &json!({})).await;
    assert_eq!(again.status, StatusCode::OK);
    wait_engine_idle(addr, Duration::from_secs(10)).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unusable_input_files_fail_the_batch_in_validation() {
    let dir = data_dir("validation");
    let server = start(&dir, |_| {}).await;
    let addr = server.addr;
    let ok = line(
        "a",
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 2}),
    );
    let cases = [
        ("not jsonl at all\n".to_string(), "invalid_json_line"),
        (format!("{ok}\n{ok}\n"), "duplicate_custom_id"),
        (
            line(
                "a",
                "/v1/completions",
                json!({"prompt": "x", "model": "other-model"}),
            ),
            "model_not_found",
        ),
        (
            line("a", "/v1/chat/completions", json!({"messages": []})),
            "mismatched_endpoint",
        ),
        ("\n\n".to_string(), "empty_file"),
    ];
    for (content, code) in cases {
        let id = create(addr, &upload(addr, &content).await, "/v1/completions").await;
        let v = wait_status(addr, &id, &["failed", "completed"], Duration::from_secs(30)).await;
        assert_eq!(v["status"], "failed", "{code}: {v}");
        assert!(v["failed_at"].is_u64());
        assert_eq!(v["errors"]["object"], "list");
        assert_eq!(v["errors"]["data"][0]["code"], code, "{v}");
        assert!(v["output_file_id"].is_null());
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_server_finishes_the_batch_from_the_store() {
    let dir = data_dir("restart");
    let server = start(&dir, |b| b.max_in_flight = 2).await;
    let addr = server.addr;
    let lines = (0..12)
        .map(|i| {
            line(
                &format!("r-{i}"),
                "/v1/completions",
                json!({"prompt": prompt(i), "max_tokens": 24, "ignore_eos": true, "temperature": 0}),
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let id = create(addr, &upload(addr, &lines).await, "/v1/completions").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let before = loop {
        let v = get(addr, &format!("/v1/batches/{id}")).await.json();
        let n = v["request_counts"]["completed"].as_u64().unwrap_or(0);
        if n >= 3 {
            break n;
        }
        assert!(Instant::now() < deadline, "no progress: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // A second server on the same directory is refused while the first holds it.
    let (engine, metrics) = start_engine(|_| {});
    let refused = spindle_server::Server::bind(
        spindle_server::ServerConfig {
            host: "127.0.0.1".into(),
            port: 0,
            served_model_names: vec![MODEL_NAME.into()],
            batch: Some(BatchConfig::new(&dir)),
            ..Default::default()
        },
        engine.clone(),
        metrics,
    )
    .await;
    let err = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("in use by another spindle server"), "{err}");
    engine.shutdown();

    server.shutdown().await;
    let server = start(&dir, |_| {}).await;
    let addr = server.addr;
    let done = wait_status(addr, &id, &["completed"], Duration::from_secs(120)).await;
    assert!(before < 12, "the batch was still running at the restart");
    assert_eq!(
        done["request_counts"],
        json!({"total": 12, "completed": 12, "failed": 0})
    );
    let output = file_lines(addr, &done["output_file_id"]).await;
    let mut ids: Vec<&str> = output
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 12, "every line answered exactly once");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_to_files_and_batches() {
    let dir = data_dir("bad");
    let server = start(&dir, |b| b.max_file_bytes = 1024).await;
    let addr = server.addr;
    let file_id = upload(addr, &line("a", "/v1/completions", json!({"prompt": "x"}))).await;

    // Uploads.
    let r = upload_raw(
        addr,
        &[("purpose", None, b"fine-tune"), ("file", Some("a"), b"{}")],
    )
    .await;
    assert_openai_error(r.status, &r.body);
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = upload_raw(addr, &[("file", Some("a"), b"{}")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert_eq!(assert_openai_error(r.status, &r.body)["param"], "purpose");
    let r = upload_raw(addr, &[("purpose", None, b"batch")]).await;
    assert_eq!(assert_openai_error(r.status, &r.body)["param"], "file");
    let big = vec![b'x'; 4096];
    let r = upload_raw(
        addr,
        &[("purpose", None, b"batch"), ("file", Some("big"), &big)],
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    assert_openai_error(r.status, &r.body);
    let r = call(
        addr,
        "POST",
        "/v1/files",
        &[("content-type", "application/json")],
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_openai_error(r.status, &r.body);
    let r = call(
        addr,
        "POST",
        "/v1/files",
        &[(
            "content-type",
            &format!("multipart/form-data; boundary={BOUNDARY}"),
        )],
        b"garbage without parts".to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());

    // Unknown ids.
    for path in [
        "/v1/files/file-nope",
        "/v1/files/file-nope/content",
        "/v1/batches/batch_nope",
    ] {
        let r = get(addr, path).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert_openai_error(r.status, &r.body);
    }
    let r = call(addr, "DELETE", "/v1/files/file-nope", &[], Vec::new()).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = post(addr, "/v1/batches/batch_nope/cancel", &json!({})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = call(addr, "PUT", "/v1/batches", &[], Vec::new()).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);

    // Batch creation.
    let base = json!({"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let without = |k: &str| {
        let mut b = base.clone();
        b.as_object_mut().unwrap().remove(k);
        b
    };
    let cases: Vec<(Value, u16, &str)> = vec![
        (
            with("input_file_id", json!("file-nope")),
            404,
            "input_file_id",
        ),
        (without("input_file_id"), 400, "input_file_id"),
        (with("endpoint", json!("/v1/responses")), 400, "endpoint"),
        (with("endpoint", json!("/v1/embeddings")), 400, "endpoint"),
        (without("endpoint"), 400, "endpoint"),
        (
            with("completion_window", json!("1h")),
            400,
            "completion_window",
        ),
        (without("completion_window"), 400, "completion_window"),
        (with("metadata", json!({"k": 5})), 400, "metadata"),
        (with("metadata", json!("text")), 400, "metadata"),
        (with("input_file_id", json!(7)), 400, "input_file_id"),
    ];
    for (body, status, param) in cases {
        expect_api_error(addr, "/v1/batches", &body, status, Some(param)).await;
    }
    for q in ["limit=0", "limit=101", "limit=x"] {
        let r = get(addr, &format!("/v1/batches?{q}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}");
    }
    let r = get(addr, "/v1/files?order=sideways").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // An output file is not a batch input; a finished batch cannot be cancelled (409).
    let id = create(addr, &file_id, "/v1/completions").await;
    let done = wait_status(addr, &id, &["completed"], Duration::from_secs(60)).await;
    let out = done["output_file_id"].as_str().unwrap();
    expect_api_error(
        addr,
        "/v1/batches",
        &with("input_file_id", json!(out)),
        400,
        Some("input_file_id"),
    )
    .await;
    let r = post(addr, &format!("/v1/batches/{id}/cancel"), &json!({})).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_openai_error(r.status, &r.body);

    // Deleting a file.
    let r = call(
        addr,
        "DELETE",
        &format!("/v1/files/{file_id}"),
        &[],
        Vec::new(),
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"id": file_id, "object": "file", "deleted": true})
    );
    assert_eq!(
        get(addr, &format!("/v1/files/{file_id}")).await.status,
        StatusCode::NOT_FOUND
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_data_dir_the_batch_api_is_off() {
    let server = TestServer::start_default().await;
    let r = get(server.addr, "/v1/batches").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(assert_openai_error(r.status, &r.body)["message"]
        .as_str()
        .unwrap()
        .contains("--data-dir"));
    server.shutdown().await;
}
