//! The real server on 127.0.0.1:0 in front of the real engine with the default model (fetched by
//! scripts/fetch-model.sh), driven over HTTP: chat and completions (stream and not), usage,
//! every error status, auth, CORS, metrics, health, tokenize, HTTP/2, disconnects, overload,
//! engine death and graceful shutdown.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use spindle_engine::{Engine, EngineConfig, EngineHandle};
use spindle_server::{Metrics, ServerConfig};
use tokio::net::TcpStream;

mod reliability;

use reliability::{
    assert_openai_error, call, engine_config, get, metric, model_path, open, post,
    wait_first_token, Reply, TestServer, MODEL_NAME,
};

/// This suite's engine: a longer context, fewer sequences and a bigger cache than the
/// reliability suites' default.
fn http_engine_config(metrics: &Arc<Metrics>) -> EngineConfig {
    let mut cfg = engine_config(metrics);
    cfg.model.max_model_len = Some(2048);
    cfg.max_num_seqs = 32;
    cfg.kv_cache_memory_bytes = Some(256 << 20);
    cfg
}

/// One engine (and its metrics) shared by the tests that do not need their own.
fn shared_engine() -> (EngineHandle, Arc<Metrics>) {
    static SHARED: OnceLock<(EngineHandle, Arc<Metrics>)> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let metrics = Arc::new(Metrics::new(MODEL_NAME, 2048).unwrap());
            let engine = Engine::spawn(http_engine_config(&metrics)).expect("engine starts");
            (engine, metrics)
        })
        .clone()
}

impl TestServer {
    /// A server that also answers to the model name "alias".
    async fn start_with_alias(
        engine: EngineHandle,
        metrics: Arc<Metrics>,
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        Self::start(engine, metrics, |c| {
            c.served_model_names.push("alias".into());
            tweak(c)
        })
        .await
    }

    async fn shared(tweak: impl FnOnce(&mut ServerConfig)) -> Self {
        let (engine, metrics) = shared_engine();
        Self::start_with_alias(engine, metrics, tweak).await
    }
}

/// The OpenAI error object of a reply, checked for shape.
trait ErrorBody {
    fn error(&self) -> Value;
}

impl ErrorBody for Reply {
    fn error(&self) -> Value {
        assert_openai_error(self.status, &self.body)
    }
}

/// Split an SSE body into its `data:` payloads (`[DONE]` included as a string).
fn sse_events(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("\n\n"),
        "SSE body must end with a blank line: {body:?}"
    );
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data line: {e:?}"))
                .to_string()
        })
        .collect()
}

fn chunks(body: &str) -> Vec<Value> {
    let events = sse_events(body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

fn user(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_non_stream_and_stream() {
    let s = TestServer::shared(|_| {}).await;
    let tok = post(
        s.addr,
        "/tokenize",
        &json!({"messages": user("What is the capital of France?")}),
    )
    .await;
    assert_eq!(tok.status, StatusCode::OK);
    let prompt_tokens = tok.json()["count"].as_u64().unwrap();

    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"model": MODEL_NAME, "messages": user("What is the capital of France?"), "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL_NAME);
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert!(v["system_fingerprint"].as_str().unwrap().starts_with("fp_"));
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(!choice["message"]["content"].as_str().unwrap().is_empty());
    assert!(choice["finish_reason"] == "length" || choice["finish_reason"] == "stop");
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    let completion_tokens = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&completion_tokens));
    assert_eq!(
        v["usage"]["total_tokens"],
        prompt_tokens + completion_tokens
    );

    // The model alias works and is echoed back.
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"model": "alias", "messages": user("Hi"), "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.json()["model"], "alias");

    // Streaming with usage.
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": user("Count to ten."), "max_tokens": 6, "temperature": 0, "ignore_eos": true,
                "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let cs = chunks(&r.text());
    assert_eq!(
        cs[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let id = cs[0]["id"].as_str().unwrap().to_string();
    let mut text = String::new();
    for c in &cs[..cs.len() - 1] {
        assert_eq!(c["id"], id.as_str());
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(
            c["usage"].is_null(),
            "usage must be null on content chunks: {c}"
        );
        text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert_eq!(cs[cs.len() - 2]["choices"][0]["finish_reason"], "length");
    let last = &cs[cs.len() - 1];
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 6);
    assert!(!text.is_empty());

    // Without include_usage, no chunk carries a usage field at all.
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": user("Hi"), "max_tokens": 3, "stream": true}),
    )
    .await;
    for c in chunks(&r.text()) {
        assert!(c.get("usage").is_none(), "{c}");
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_features_n_seed_stop_logprobs_continue() {
    let s = TestServer::shared(|_| {}).await;
    // n = 2 with a seed: two choices, usage counts the prompt once; the same seed repeats.
    let body = json!({"messages": user("Write a word."), "max_tokens": 5, "n": 2, "seed": 7, "temperature": 1.0});
    let a = post(s.addr, "/v1/chat/completions", &body).await.json();
    let b = post(s.addr, "/v1/chat/completions", &body).await.json();
    assert_eq!(a["choices"].as_array().unwrap().len(), 2);
    assert_eq!(a["choices"][1]["index"], 1);
    assert_eq!(
        a["choices"][0]["message"]["content"],
        b["choices"][0]["message"]["content"]
    );
    let single = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": user("Write a word."), "max_tokens": 1}),
    )
    .await
    .json();
    assert_eq!(
        a["usage"]["prompt_tokens"],
        single["usage"]["prompt_tokens"]
    );

    // Stop string: finish_reason stop, stop_reason names it.
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": user("Count from 1 to 10 separated by commas."), "max_tokens": 40, "temperature": 0, "stop": [","]}),
    )
    .await
    .json();
    let c = &r["choices"][0];
    if c["finish_reason"] == "stop" && c["stop_reason"] == "," {
        assert!(!c["message"]["content"].as_str().unwrap().contains(','));
    }

    // Logprobs in chat format.
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": user("Hi"), "max_tokens": 3, "logprobs": true, "top_logprobs": 2, "temperature": 0}),
    )
    .await
    .json();
    let content = r["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        content.len() as u64,
        r["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for t in &content {
        assert!(
            t["token"].is_string()
                && t["logprob"].as_f64().unwrap() <= 0.0
                && t["bytes"].is_array()
        );
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 2);
    }

    // continue_final_message continues the assistant's text.
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2, 3,"}],
                "continue_final_message": true, "max_tokens": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Multi-part text content is accepted.
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}], "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_prompt_shapes_stream_and_logprobs() {
    let s = TestServer::shared(|_| {}).await;
    let ids = post(s.addr, "/tokenize", &json!({"prompt": "Once upon a time"}))
        .await
        .json();
    let ids: Vec<u64> = ids["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();

    for (prompt, prompts) in [
        (json!("Once upon a time"), 1),
        (json!(["Once upon a time", "The sky is"]), 2),
        (json!(ids), 1),
        (json!([ids, [1, 2, 3]]), 2),
    ] {
        let r = post(
            s.addr,
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 3, "n": 2, "temperature": 0}),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{prompt}: {}", r.text());
        let v = r.json();
        assert_eq!(v["object"], "text_completion");
        assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), prompts * 2, "{v}");
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], i);
            assert!(c["text"].is_string());
            assert!(c["logprobs"].is_null());
        }
        let completion: u64 = 3 * 2 * prompts as u64;
        assert_eq!(v["usage"]["completion_tokens"], completion, "{v}");
    }
    // The token-id prompt counts exactly its ids.
    let v = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 1}),
    )
    .await
    .json();
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    // Default max_tokens for completions is 16.
    let v = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "Hello", "ignore_eos": true}),
    )
    .await
    .json();
    assert_eq!(v["usage"]["completion_tokens"], 16, "{v}");

    // Logprobs in completions format.
    let v = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 4, "logprobs": 2, "ignore_eos": true}),
    )
    .await
    .json();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 4);
    assert_eq!(lp["text_offset"][0], 0);
    assert!(lp["top_logprobs"][0].as_object().unwrap().len() >= 2);

    // Streaming completions, two prompts, usage at the end.
    let r = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": ["A", "B"], "max_tokens": 4, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    let cs = chunks(&r.text());
    let mut finished = [false, false];
    for c in &cs[..cs.len() - 1] {
        assert_eq!(c["object"], "text_completion");
        let ch = &c["choices"][0];
        if ch["finish_reason"] == "length" {
            finished[ch["index"].as_u64().unwrap() as usize] = true;
        }
    }
    assert_eq!(finished, [true, true]);
    assert_eq!(cs.last().unwrap()["usage"]["completion_tokens"], 8);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_status() {
    let s = TestServer::shared(|c| c.max_body_bytes = 4096).await;
    let a = s.addr;
    let json_ct = [("content-type", "application/json")];

    // 400: invalid JSON, wrong type, out of range, context too long, unsupported options.
    let r = call(
        a,
        "POST",
        "/v1/chat/completions",
        &json_ct,
        b"{not json".to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    r.error();
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": user("x"), "temperature": "hot"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error()["param"], "temperature");
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": user("x"), "top_p": 0}),
    )
    .await;
    assert_eq!(
        (r.status, r.error()["param"].clone()),
        (StatusCode::BAD_REQUEST, json!("top_p"))
    );
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": user("x"), "n": 0}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": user("x"), "max_tokens": 3000}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let msg = r.error()["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("maximum context length is 2048 tokens")
            && msg.contains("3000 in the completion"),
        "{msg}"
    );
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": "x", "use_beam_search": true}),
    )
    .await;
    assert_eq!(
        (r.status, r.error()["param"].clone()),
        (StatusCode::BAD_REQUEST, json!("use_beam_search"))
    );
    let r = post(a, "/v1/completions", &json!({"prompt": []})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = post(a, "/v1/completions", &json!({"prompt": [999999999]})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = post(a, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = post(a, "/v1/chat/completions", &json!({"messages": []})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"messages": user("x"), "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // 404: unknown model, unknown route.
    let r = post(
        a,
        "/v1/chat/completions",
        &json!({"model": "gpt-9", "messages": user("x")}),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let e = r.error();
    assert_eq!(e["type"], "NotFoundError");
    assert_eq!(e["message"], "The model `gpt-9` does not exist.");
    assert_eq!(get(a, "/v2/nothing").await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        get(a, "/v1/models/gpt-9").await.status,
        StatusCode::NOT_FOUND
    );

    // 405 with Allow.
    let r = get(a, "/v1/chat/completions").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(r.headers["allow"].to_str().unwrap().contains("POST"));
    r.error();
    assert_eq!(
        call(a, "POST", "/health", &[], Vec::new()).await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );

    // 413: declared too large, and streamed (chunked) too large.
    let big = json!({"prompt": "x".repeat(10_000)});
    let r = post(a, "/v1/completions", &big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    r.error();

    // 415 for a non-JSON content type.
    let r = call(
        a,
        "POST",
        "/v1/completions",
        &[("content-type", "text/plain")],
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    r.error();
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_the_limit_is_413() {
    let s = TestServer::shared(|c| c.max_body_bytes = 1024).await;
    let stream = TcpStream::connect(s.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    // A body without Content-Length (chunked): the limit applies while reading.
    let req = Request::post(format!("http://{}/v1/completions", s.addr))
        .header("content-type", "application/json")
        .body(Chunked(10))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    conn.abort();
    s.shutdown().await;
}

/// A body of `n` 512-byte frames with no declared length, so it is sent chunked.
struct Chunked(usize);

impl hyper::body::Body for Chunked {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if self.0 == 0 {
            return std::task::Poll::Ready(None);
        }
        self.0 -= 1;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from(vec![
            b' ';
            512
        ])))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_v1_only() {
    let s = TestServer::shared(|c| c.api_key = Some("sekrit".into())).await;
    let a = s.addr;
    let r = get(a, "/v1/models").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.error()["type"], "AuthenticationError");
    assert_eq!(
        call(
            a,
            "GET",
            "/v1/models",
            &[("authorization", "Bearer nope")],
            Vec::new()
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(
            a,
            "GET",
            "/v1/models",
            &[("authorization", "sekrit")],
            Vec::new()
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    let ok = call(
        a,
        "GET",
        "/v1/models",
        &[("authorization", "Bearer sekrit")],
        Vec::new(),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    let r = call(
        a,
        "POST",
        "/v1/completions",
        &[
            ("authorization", "Bearer sekrit"),
            ("content-type", "application/json"),
        ],
        json!({"prompt": "Hi", "max_tokens": 1})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    for open in ["/health", "/metrics", "/version"] {
        assert_eq!(get(a, open).await.status, StatusCode::OK, "{open}");
    }
    // A preflight carries no credentials and must pass.
    let r = call(
        a,
        "OPTIONS",
        "/v1/chat/completions",
        &[
            ("origin", "http://app.example"),
            ("access-control-request-method", "POST"),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    s.shutdown().await;

    // Without a key, /v1 is open.
    let s = TestServer::shared(|_| {}).await;
    assert_eq!(get(s.addr, "/v1/models").await.status, StatusCode::OK);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_simple_requests() {
    let s = TestServer::shared(|c| c.allowed_origins = vec!["http://app.example".into()]).await;
    let a = s.addr;
    let r = call(
        a,
        "OPTIONS",
        "/v1/chat/completions",
        &[
            ("origin", "http://app.example"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization, content-type",
            ),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "http://app.example"
    );
    assert!(r.headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    assert_eq!(
        r.headers["access-control-allow-headers"],
        "authorization, content-type"
    );
    let r = call(
        a,
        "OPTIONS",
        "/v1/models",
        &[
            ("origin", "http://evil.example"),
            ("access-control-request-method", "GET"),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = call(
        a,
        "GET",
        "/v1/models",
        &[("origin", "http://app.example")],
        Vec::new(),
    )
    .await;
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "http://app.example"
    );
    let r = call(
        a,
        "GET",
        "/v1/models",
        &[("origin", "http://evil.example")],
        Vec::new(),
    )
    .await;
    assert!(r.headers.get("access-control-allow-origin").is_none());
    s.shutdown().await;

    // Default: any origin.
    let s = TestServer::shared(|_| {}).await;
    let r = call(
        s.addr,
        "GET",
        "/health",
        &[("origin", "http://x")],
        Vec::new(),
    )
    .await;
    assert_eq!(r.headers["access-control-allow-origin"], "*");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_version_models_tokenize() {
    let s = TestServer::shared(|_| {}).await;
    let a = s.addr;
    let r = get(a, "/health").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.is_empty());
    assert_eq!(
        get(a, "/version").await.json()["version"],
        env!("CARGO_PKG_VERSION")
    );
    let m = get(a, "/v1/models").await.json();
    assert_eq!(m["object"], "list");
    let data = m["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["id"], MODEL_NAME);
    assert_eq!(data[0]["object"], "model");
    assert_eq!(data[0]["owned_by"], "spindle");
    assert_eq!(data[0]["max_model_len"], 2048);
    assert_eq!(data[0]["root"], model_path());
    assert_eq!(
        get(a, &format!("/v1/models/{MODEL_NAME}")).await.json()["id"],
        MODEL_NAME
    );

    let t = post(
        a,
        "/tokenize",
        &json!({"prompt": "Hello world, how are you?", "return_token_strs": true}),
    )
    .await
    .json();
    assert_eq!(t["max_model_len"], 2048);
    assert_eq!(
        t["count"].as_u64().unwrap() as usize,
        t["tokens"].as_array().unwrap().len()
    );
    assert_eq!(
        t["token_strs"].as_array().unwrap().len(),
        t["tokens"].as_array().unwrap().len()
    );
    let d = post(a, "/detokenize", &json!({"tokens": t["tokens"]}))
        .await
        .json();
    assert_eq!(d["prompt"], "Hello world, how are you?");
    let chat = post(a, "/tokenize", &json!({"messages": user("Hi")}))
        .await
        .json();
    assert!(chat["count"].as_u64().unwrap() > 2);
    assert_eq!(
        post(a, "/detokenize", &json!({"tokens": [99999999]}))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post(a, "/tokenize", &json!({"model": "nope", "prompt": "x"}))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_vllm_names_and_move() {
    let s = TestServer::shared(|_| {}).await;
    let a = s.addr;
    let before = get(a, "/metrics").await;
    assert!(before.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let before = before.text();
    let label = format!("{{model_name=\"{MODEL_NAME}\"}}");
    let prompt_before = metric(&before, &format!("vllm:prompt_tokens_total{label}"));
    let gen_before = metric(&before, &format!("vllm:generation_tokens_total{label}"));
    let r = post(
        a,
        "/v1/completions",
        &json!({"prompt": "The metrics test", "max_tokens": 5, "ignore_eos": true, "stream": true}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let after = get(a, "/metrics").await.text();
    for name in [
        "vllm:num_requests_running{",
        "vllm:num_requests_waiting{",
        "vllm:kv_cache_usage_perc{",
        "vllm:prompt_tokens_total{",
        "vllm:generation_tokens_total{",
        "vllm:request_success_total{",
        "vllm:num_preemptions_total{",
        "vllm:prefix_cache_queries_total{",
        "vllm:prefix_cache_hits_total{",
        "vllm:time_to_first_token_seconds_bucket{",
        "vllm:inter_token_latency_seconds_bucket{",
        "vllm:e2e_request_latency_seconds_bucket{",
        "vllm:request_queue_time_seconds_bucket{",
        "vllm:request_prefill_time_seconds_bucket{",
        "vllm:request_decode_time_seconds_bucket{",
        "vllm:request_prompt_tokens_bucket{",
        "vllm:request_generation_tokens_bucket{",
        "vllm:iteration_tokens_total_bucket{",
        "vllm:cache_config_info{",
        "http_requests_total{",
    ] {
        assert!(after.contains(name), "{name} missing from /metrics");
    }
    assert!(metric(&after, &format!("vllm:prompt_tokens_total{label}")) > prompt_before);
    assert!(metric(&after, &format!("vllm:generation_tokens_total{label}")) >= gen_before + 5.0);
    assert!(
        metric(
            &after,
            &format!("vllm:inter_token_latency_seconds_count{label}")
        ) >= 4.0
    );
    assert!(
        metric(
            &after,
            &format!("vllm:e2e_request_latency_seconds_count{label}")
        ) >= 1.0
    );
    assert!(metric(&after, &format!("vllm:iteration_tokens_total_count{label}")) >= 1.0);
    assert!(after.contains(&format!(
        "vllm:request_success_total{{finished_reason=\"length\",model_name=\"{MODEL_NAME}\"}}"
    )));
    assert!(after.contains(
        "http_requests_total{handler=\"/v1/completions\",method=\"POST\",status=\"200\"}"
    ));
    assert!(after.contains("block_size=\"16\""));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge() {
    let s = TestServer::shared(|_| {}).await;
    let stream = TcpStream::connect(s.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::post(format!("http://{}/v1/completions", s.addr))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({"prompt": "Hi", "max_tokens": 2}).to_string(),
        )))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 2);
    conn.abort();
    s.shutdown().await;
}

async fn scrape(addr: SocketAddr) -> (f64, f64) {
    let text = get(addr, "/metrics").await.text();
    let label = format!("{{model_name=\"{MODEL_NAME}\"}}");
    (
        metric(&text, &format!("vllm:num_requests_running{label}")),
        metric(&text, &format!("vllm:kv_cache_usage_perc{label}")),
    )
}

/// Wait (up to 10 s) until no request runs; the KV usage then.
async fn wait_idle(addr: SocketAddr) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (running, kv) = scrape(addr).await;
        if running == 0.0 {
            return kv;
        }
        assert!(
            Instant::now() < deadline,
            "the engine never went idle: running={running}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnects_abort_and_free_kv() {
    // Its own engine: the running count and KV usage must not see other tests' requests.
    let metrics = Arc::new(Metrics::new(MODEL_NAME, 2048).unwrap());
    let engine = Engine::spawn(http_engine_config(&metrics)).expect("engine starts");
    let s = TestServer::start_with_alias(engine.clone(), metrics, |_| {}).await;
    // The warm-up request finished before the server started, but the engine publishes its
    // gauges after the step that finished it: wait for them to read idle.
    let idle_kv = wait_idle(s.addr).await;

    // 20 streams (chat and completions), each dropped after its first token.
    let mut open_streams = Vec::new();
    for i in 0..20 {
        let (path, body) = if i % 2 == 0 {
            (
                "/v1/completions",
                json!({"prompt": format!("Story number {i}:"), "max_tokens": 1000, "ignore_eos": true, "stream": true}),
            )
        } else {
            (
                "/v1/chat/completions",
                json!({"messages": user(&format!("Tell story {i}")), "max_tokens": 1000, "ignore_eos": true, "stream": true}),
            )
        };
        let (resp, conn) = open(
            s.addr,
            "POST",
            path,
            &[("content-type", "application/json")],
            body.to_string().into_bytes(),
        )
        .await
        .expect("send");
        assert_eq!(resp.status(), StatusCode::OK);
        open_streams.push((resp, conn));
    }
    for (resp, _) in open_streams.iter_mut() {
        wait_first_token(resp).await;
    }
    let (running, kv) = scrape(s.addr).await;
    assert!(
        running > 0.0 && kv > idle_kv,
        "requests should be running: running={running} kv={kv}"
    );
    for (resp, conn) in open_streams {
        drop(resp);
        conn.abort();
    }
    let dropped_at = Instant::now();
    loop {
        let (running, kv) = scrape(s.addr).await;
        if running == 0.0 && kv <= idle_kv {
            break;
        }
        assert!(
            dropped_at.elapsed() < Duration::from_secs(10),
            "not freed within 10 s: running={running} kv={kv}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A non-streaming request whose client leaves is aborted too.
    let (resp_fut_conn, _) = {
        let stream = TcpStream::connect(s.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let req = Request::post(format!("http://{}/v1/completions", s.addr))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                json!({"prompt": "Long", "max_tokens": 1500, "ignore_eos": true}).to_string(),
            )))
            .unwrap();
        let pending = tokio::spawn(async move { sender.send_request(req).await });
        ((pending, conn), ())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while scrape(s.addr).await.0 == 0.0 {
        assert!(
            Instant::now() < deadline,
            "non-streaming request never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (pending, conn) = resp_fut_conn;
    pending.abort();
    conn.abort();
    let dropped_at = Instant::now();
    loop {
        let (running, kv) = scrape(s.addr).await;
        if running == 0.0 && kv <= idle_kv {
            break;
        }
        assert!(
            dropped_at.elapsed() < Duration::from_secs(10),
            "non-streaming abort not freed within 10 s: running={running} kv={kv}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.shutdown().await;
    engine.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_429_and_engine_death_is_503() {
    let metrics = Arc::new(Metrics::new(MODEL_NAME, 2048).unwrap());
    let cfg = EngineConfig {
        max_num_seqs: 1,
        max_waiting_requests: 1,
        ..http_engine_config(&metrics)
    };
    let engine = Engine::spawn(cfg).expect("engine starts");
    let s = TestServer::start_with_alias(engine.clone(), metrics, |_| {}).await;
    let long = json!({"prompt": "Go on", "max_tokens": 1500, "ignore_eos": true, "stream": true});
    // One runs, one waits, the next is refused.
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..6 {
        let (resp, conn) = open(
            s.addr,
            "POST",
            "/v1/completions",
            &[("content-type", "application/json")],
            long.to_string().into_bytes(),
        )
        .await
        .expect("send");
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(resp);
            break;
        }
        assert_eq!(resp.status(), StatusCode::OK);
        held.push((resp, conn));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = refused.expect("a request must be refused with 429");
    assert!(refused.headers().contains_key("retry-after"));
    let body = refused.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], 429);
    drop(held);

    // Engine gone: /health and generation answer 503.
    engine.shutdown();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !engine.is_dead() {
        assert!(Instant::now() < deadline, "engine did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        get(s.addr, "/health").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let r = post(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    r.error();
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_streams_finish() {
    let s = TestServer::shared(|c| c.shutdown_timeout = Duration::from_secs(60)).await;
    let addr = s.addr;
    let body = json!({"prompt": "Once", "max_tokens": 24, "ignore_eos": true, "stream": true});
    let (mut resp, conn) = open(
        addr,
        "POST",
        "/v1/completions",
        &[("content-type", "application/json")],
        body.to_string().into_bytes(),
    )
    .await
    .expect("send");
    wait_first_token(&mut resp).await;
    let stopping = tokio::spawn(s.shutdown());
    let rest = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.ends_with("data: [DONE]\n\n"), "stream was cut: {text}");
    assert!(text.contains("\"finish_reason\":\"length\""));
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .expect("stops after drain")
        .unwrap();
    conn.abort();
    // The listener is closed.
    assert!(TcpStream::connect(addr).await.is_err());
}
