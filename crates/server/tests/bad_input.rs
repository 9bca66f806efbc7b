//! Bad-input catalogue: malformed requests, table-driven, sent as raw bytes over TCP so that
//! requests a well-behaved client library cannot produce (truncated bodies, invalid UTF-8, bad
//! framing, slow senders, pipelining, HTTP/1.0) are covered too. Each case must get its
//! documented status (docs/reliability.md): requests that reach the API get the OpenAI error
//! body `{"error": {"message", "type", "param", "code"}}`; requests hyper's HTTP parser rejects
//! before any route exists get hyper's bodiless status; silent clients are disconnected. After
//! the catalogue the server must still be healthy and serve normally.

mod reliability;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use reliability::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Small limits so the "too large" and "too slow" cases are cheap to provoke.
const MAX_BODY: usize = 1 << 20;
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
const BODY_TIMEOUT: Duration = Duration::from_secs(1);
/// max_model_len of the test engine (reliability::engine_config).
const MAX_MODEL_LEN: usize = 1024;
/// SmolLM2's vocabulary.
const VOCAB: usize = 49152;

/// What a case must get back.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// This status with an OpenAI error body, and (if given) `param` naming the field.
    Api(u16, Option<&'static str>),
    /// This status from hyper's HTTP/1 parser (no route was reached, so no JSON body).
    Http(u16),
    /// No response: the server closes the connection (it never got a request).
    Closed,
    /// This status with an Anthropic error body (`/v1/messages`) of this error type.
    Anthropic(u16, &'static str),
}

/// How a case is sent.
enum Send {
    /// One HTTP/1.1 request with `Connection: close`, read to EOF.
    Raw(Vec<u8>),
    /// Bytes written in pieces with pauses (slow clients); read to EOF.
    Slow(Vec<(Vec<u8>, Duration)>),
    /// Several requests in one write; every response is checked against `Expect`s in order.
    Pipelined(Vec<u8>, Vec<Expect>),
}

struct Case {
    name: &'static str,
    send: Send,
    expect: Expect,
}

fn head(method: &str, path: &str, extra: &str, body_len: Option<usize>) -> Vec<u8> {
    let len = body_len
        .map(|n| format!("content-length: {n}\r\n"))
        .unwrap_or_default();
    format!("{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n{extra}{len}\r\n")
        .into_bytes()
}

/// A POST with a JSON content type and the given body bytes.
fn post_bytes(path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = head(
        "POST",
        path,
        "content-type: application/json\r\n",
        Some(body.len()),
    );
    r.extend_from_slice(body);
    r
}

fn chat(body: Value) -> Send {
    Send::Raw(post_bytes(
        "/v1/chat/completions",
        body.to_string().as_bytes(),
    ))
}

fn completion(body: Value) -> Send {
    Send::Raw(post_bytes("/v1/completions", body.to_string().as_bytes()))
}

fn user(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

fn catalogue() -> Vec<Case> {
    let bad = |status| Expect::Api(status, None);
    let param = |status, p| Expect::Api(status, Some(p));
    let anthropic = |status| Expect::Anthropic(status, "invalid_request_error");
    let c = |name, send, expect| Case { name, send, expect };
    let chat_path = "/v1/chat/completions";

    // A body whose JSON string holds invalid UTF-8 bytes.
    let mut invalid_utf8 = br#"{"messages": [{"role": "user", "content": "abc"#.to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    invalid_utf8.extend_from_slice(br#""}]}"#);
    // A 2 MiB chunked body (no Content-Length): the limit applies while reading.
    let mut chunked = head(
        "POST",
        chat_path,
        "content-type: application/json\r\ntransfer-encoding: chunked\r\n",
        None,
    );
    for _ in 0..(2 * MAX_BODY / 65536) {
        chunked.extend_from_slice(format!("{:x}\r\n", 65536).as_bytes());
        chunked.extend_from_slice(&[b' '; 65536]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    // A chunked body with a size line that is not hex.
    let mut bad_chunk = head(
        "POST",
        chat_path,
        "content-type: application/json\r\ntransfer-encoding: chunked\r\n",
        None,
    );
    bad_chunk.extend_from_slice(b"zz\r\n{}\r\n0\r\n\r\n");
    // Declares 100 bytes, sends 40, then waits: the body timeout answers 408.
    let slow_body = {
        let body = json!({"messages": user("hello"), "max_tokens": 1}).to_string();
        let mut h = head(
            "POST",
            chat_path,
            "content-type: application/json\r\n",
            Some(body.len() + 60),
        );
        h.extend_from_slice(&body.as_bytes()[..20]);
        vec![
            (h, Duration::from_millis(300)),
            (body.as_bytes()[20..].to_vec(), BODY_TIMEOUT * 3),
        ]
    };
    // Sends the request head one byte at a time, slower than the header timeout allows.
    let slow_headers: Vec<(Vec<u8>, Duration)> =
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\n"
            .iter()
            .map(|&b| (vec![b], Duration::from_millis(150)))
            .collect();
    // HTTP/1.0 (no Host, no keep-alive) with invalid JSON.
    let http10 = b"POST /v1/completions HTTP/1.0\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\n{not json".to_vec();
    // Three pipelined requests in one write; the last closes the connection.
    let mut pipelined = b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\n{not json".to_vec();
    let n0 = json!({"prompt": "x", "n": 0}).to_string();
    pipelined.extend_from_slice(
        format!("POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{n0}", n0.len())
            .as_bytes(),
    );
    pipelined.extend_from_slice(b"GET /health HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n");
    let too_long_ids: Vec<u32> = (0..MAX_MODEL_LEN as u32 + 50)
        .map(|i| 100 + i % 1000)
        .collect();
    let nested = format!("{{\"messages\": {}{}}}", "[".repeat(5000), "]".repeat(5000));

    vec![
        // --- Body framing and encoding ---
        c("invalid JSON", Send::Raw(post_bytes(chat_path, b"{not json")), bad(400)),
        c("truncated JSON document", Send::Raw(post_bytes(chat_path, br#"{"messages": [{"role": "user", "content": "hi""#)), bad(400)),
        c("empty body", Send::Raw(post_bytes(chat_path, b"")), bad(400)),
        c("body is null", Send::Raw(post_bytes(chat_path, b"null")), bad(400)),
        c("body is an array", Send::Raw(post_bytes(chat_path, b"[1, 2]")), bad(400)),
        c("body is a string", Send::Raw(post_bytes(chat_path, b"\"hello\"")), bad(400)),
        c("invalid UTF-8 in a JSON string", Send::Raw(post_bytes(chat_path, &invalid_utf8)), bad(400)),
        c("JSON nested 5000 deep", Send::Raw(post_bytes(chat_path, nested.as_bytes())), bad(400)),
        c("NaN literal", Send::Raw(post_bytes(chat_path, br#"{"messages": [{"role":"user","content":"x"}], "temperature": NaN}"#)), bad(400)),
        c("Infinity literal", Send::Raw(post_bytes(chat_path, br#"{"messages": [{"role":"user","content":"x"}], "top_p": Infinity}"#)), bad(400)),
        c("number out of f64 range", Send::Raw(post_bytes(chat_path, br#"{"messages": [{"role":"user","content":"x"}], "temperature": 1e400}"#)), bad(400)),
        c(
            "wrong content type",
            Send::Raw({
                let mut r = head("POST", chat_path, "content-type: text/plain\r\n", Some(2));
                r.extend_from_slice(b"{}");
                r
            }),
            bad(415),
        ),
        c(
            "content type with invalid bytes",
            Send::Raw({
                let mut r = b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nconnection: close\r\ncontent-type: application/\xffjson\r\ncontent-length: 2\r\n\r\n".to_vec();
                r.extend_from_slice(b"{}");
                r
            }),
            bad(415),
        ),
        c(
            "huge declared body",
            Send::Raw(head("POST", chat_path, "content-type: application/json\r\n", Some(100 << 20))),
            bad(413),
        ),
        c("huge chunked body", Send::Raw(chunked), bad(413)),
        c("malformed chunk size", Send::Raw(bad_chunk), bad(400)),
        c("slow body (slowloris)", Send::Slow(slow_body), bad(408)),
        c("slow headers (slowloris)", Send::Slow(slow_headers), Expect::Closed),
        c("silent connection", Send::Slow(vec![(Vec::new(), HEADER_TIMEOUT * 3)]), Expect::Closed),
        c("half an HTTP/2 preface, then silence", Send::Slow(vec![(b"PRI * HTTP/2.0\r\n".to_vec(), HEADER_TIMEOUT * 3)]), Expect::Closed),
        // --- HTTP-level garbage (hyper's parser answers before any route) ---
        c("garbage request line", Send::Raw(b"HELLO THERE\r\n\r\n".to_vec()), Expect::Http(400)),
        c("non-numeric content-length", Send::Raw(head("POST", chat_path, "content-length: ten\r\n", None)), Expect::Http(400)),
        // Chunked wins over Content-Length (RFC 9112 6.3): the empty chunked body is invalid
        // JSON, and the bytes Content-Length would have counted are not read as a request.
        c(
            "content-length and chunked together",
            Send::Raw({
                let mut r = head("POST", chat_path, "content-type: application/json\r\ntransfer-encoding: chunked\r\ncontent-length: 30\r\n", None);
                r.extend_from_slice(b"0\r\n\r\nGET /health HTTP/1.1\r\n\r\n");
                r
            }),
            bad(400),
        ),
        c(
            "512 KiB header",
            Send::Raw(head("GET", "/health", &format!("x-big: {}\r\n", "a".repeat(512 * 1024)), None)),
            Expect::Http(431),
        ),
        c("HTTP/1.0 with invalid JSON", Send::Raw(http10), bad(400)),
        c(
            "pipelined requests",
            Send::Pipelined(pipelined, vec![bad(400), param(400, "n"), Expect::Http(200)]),
            bad(400),
        ),
        // --- Routing ---
        c("unknown route", Send::Raw(head("GET", "/v2/whatever", "", None)), bad(404)),
        c("GET on a POST route", Send::Raw(head("GET", chat_path, "", None)), bad(405)),
        c("unknown model", chat(json!({"model": "gpt-9", "messages": user("x")})), param(404, "model")),
        c(
            "header injection in the model name",
            chat(json!({"model": "smollm2\r\nX-Injected: yes\r\n\r\nHTTP/1.1 200 OK", "messages": user("x")})),
            param(404, "model"),
        ),
        // --- Wrong types ---
        c("messages is a string", chat(json!({"messages": "hello"})), param(400, "messages")),
        c("max_tokens is a string", chat(json!({"messages": user("x"), "max_tokens": "ten"})), param(400, "max_tokens")),
        c("stream is a string", chat(json!({"messages": user("x"), "stream": "yes"})), param(400, "stream")),
        c("seed is a string", chat(json!({"messages": user("x"), "seed": "abc"})), param(400, "seed")),
        c("prompt is an object", completion(json!({"prompt": {"a": 1}})), param(400, "prompt")),
        c("stop is a number", chat(json!({"messages": user("x"), "stop": 7})), param(400, "stop")),
        // --- Out-of-range numbers ---
        c("negative max_tokens", chat(json!({"messages": user("x"), "max_tokens": -5})), param(400, "max_tokens")),
        c("max_tokens = 0", chat(json!({"messages": user("x"), "max_tokens": 0})), param(400, "max_tokens")),
        c("max_tokens beyond i64", Send::Raw(post_bytes(chat_path, br#"{"messages": [{"role":"user","content":"x"}], "max_tokens": 99999999999999999999}"#)), param(400, "max_tokens")),
        c("max_tokens = i64::MAX", chat(json!({"messages": user("x"), "max_tokens": i64::MAX})), param(400, "messages")),
        c("negative temperature", chat(json!({"messages": user("x"), "temperature": -1})), param(400, "temperature")),
        c("top_p = 0", chat(json!({"messages": user("x"), "top_p": 0})), param(400, "top_p")),
        c("n = 10000", chat(json!({"messages": user("x"), "n": 10_000})), param(400, "n")),
        c("best_of != n", completion(json!({"prompt": "x", "best_of": 3})), param(400, "best_of")),
        c("min_tokens > max_tokens", chat(json!({"messages": user("x"), "min_tokens": 9, "max_tokens": 2})), param(400, "min_tokens")),
        c("top_logprobs = 21", chat(json!({"messages": user("x"), "logprobs": true, "top_logprobs": 21})), param(400, "top_logprobs")),
        c("completion logprobs = 1000", completion(json!({"prompt": "x", "logprobs": 1000})), param(400, "logprobs")),
        // --- The field contract (crates/server/src/fields.rs, docs/api.md) ---
        c("use_beam_search true", completion(json!({"prompt": "x", "use_beam_search": true})), param(400, "use_beam_search")),
        c("length_penalty set", chat(json!({"messages": user("x"), "length_penalty": 2.0})), param(400, "length_penalty")),
        c("per-request chat_template", chat(json!({"messages": user("x"), "chat_template": "{{ x }}"})), param(400, "chat_template")),
        c("vllm_xargs", completion(json!({"prompt": "x", "vllm_xargs": {"a": 1}})), param(400, "vllm_xargs")),
        c("suffix", completion(json!({"prompt": "x", "suffix": "y"})), param(400, "suffix")),
        c("prompt_embeds", completion(json!({"prompt": "x", "prompt_embeds": "AAAA"})), param(400, "prompt_embeds")),
        c("logprob_token_ids", completion(json!({"prompt": "x", "logprobs": 1, "logprob_token_ids": [1]})), param(400, "logprob_token_ids")),
        c("prompt_logprobs = 21", completion(json!({"prompt": "x", "prompt_logprobs": 21})), param(400, "prompt_logprobs")),
        c("prompt_logprobs is a string", chat(json!({"messages": user("x"), "prompt_logprobs": "all"})), param(400, "prompt_logprobs")),
        c("max_tokens 0 without echo", completion(json!({"prompt": "x", "max_tokens": 0})), param(400, "max_tokens")),
        c("chat echo with max_tokens 0", chat(json!({"messages": user("x"), "echo": true, "max_tokens": 0})), param(400, "max_tokens")),
        c("allowed_token_ids empty", completion(json!({"prompt": "x", "allowed_token_ids": []})), param(400, "allowed_token_ids")),
        c("allowed_token_ids >= vocab", completion(json!({"prompt": "x", "allowed_token_ids": [VOCAB]})), param(400, "allowed_token_ids")),
        c("bad_words not strings", completion(json!({"prompt": "x", "bad_words": [1]})), param(400, "bad_words")),
        c("bad_words blank", chat(json!({"messages": user("x"), "bad_words": ["  "]})), param(400, "bad_words")),
        c("truncate_prompt_tokens 0", completion(json!({"prompt": "x", "truncate_prompt_tokens": 0})), param(400, "truncate_prompt_tokens")),
        c("truncation_side unknown", completion(json!({"prompt": "x", "truncate_prompt_tokens": 2, "truncation_side": "middle"})), param(400, "truncation_side")),
        c("cache_salt empty", completion(json!({"prompt": "x", "cache_salt": ""})), param(400, "cache_salt")),
        c("cache_salt too long", chat(json!({"messages": user("x"), "cache_salt": "s".repeat(1025)})), param(400, "cache_salt")),
        c("request_id with a space", completion(json!({"prompt": "x", "request_id": "a b"})), param(400, "request_id")),
        c("guided_regex empty", completion(json!({"prompt": "x", "guided_regex": ""})), param(400, "guided_regex")),
        c("guided_json with structured_outputs", chat(json!({"messages": user("x"), "guided_json": {}, "structured_outputs": {"regex": "a"}})), param(400, "guided_json")),
        c(
            "X-Request-Id with a space",
            Send::Raw({
                let body = json!({"prompt": "x", "max_tokens": 1}).to_string();
                let mut r = head("POST", "/v1/completions", "content-type: application/json\r\nx-request-id: a b\r\n", Some(body.len()));
                r.extend_from_slice(body.as_bytes());
                r
            }),
            param(400, "X-Request-Id"),
        ),
        c("embeddings normalize set", Send::Raw(post_bytes("/v1/embeddings", json!({"input": "x", "normalize": false}).to_string().as_bytes())), param(400, "normalize")),
        // --- Messages ---
        c("empty messages", chat(json!({"messages": []})), param(400, "messages")),
        c("message without a role", chat(json!({"messages": [{"content": "x"}]})), param(400, "messages")),
        c("role is a number", chat(json!({"messages": [{"role": 7, "content": "x"}]})), param(400, "messages")),
        c("role is empty", chat(json!({"messages": [{"role": "", "content": "x"}]})), param(400, "messages")),
        c("content is a number", chat(json!({"messages": [{"role": "user", "content": 42}]})), param(400, "messages")),
        c("message is a string", chat(json!({"messages": ["hello"]})), param(400, "messages")),
        c(
            "image content part",
            chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]})),
            param(400, "messages"),
        ),
        c(
            "continue_final_message with add_generation_prompt",
            chat(json!({"messages": user("x"), "continue_final_message": true, "add_generation_prompt": true})),
            bad(400),
        ),
        // --- Lists and ids ---
        c("10k stop strings", chat(json!({"messages": user("x"), "stop": vec!["s"; 10_000]})), param(400, "stop")),
        c("2 KiB stop string", chat(json!({"messages": user("x"), "stop": "s".repeat(2048)})), param(400, "stop")),
        c("logit_bias key not a number", chat(json!({"messages": user("x"), "logit_bias": {"abc": 1}})), param(400, "logit_bias")),
        c("logit_bias id >= vocab", chat(json!({"messages": user("x"), "logit_bias": {"49152": 1}})), param(400, "logit_bias")),
        c("logit_bias negative id", chat(json!({"messages": user("x"), "logit_bias": {"-3": 1}})), param(400, "logit_bias")),
        c("logit_bias value 1000", chat(json!({"messages": user("x"), "logit_bias": {"5": 1000}})), param(400, "logit_bias")),
        c("stop_token_ids >= vocab", chat(json!({"messages": user("x"), "stop_token_ids": [VOCAB]})), param(400, "stop_token_ids")),
        c("prompt token id >= vocab", completion(json!({"prompt": [1, 2, VOCAB]})), param(400, "prompt")),
        c("prompt token id negative", completion(json!({"prompt": [1, -2]})), param(400, "prompt")),
        c("257 prompts", completion(json!({"prompt": vec!["x"; 257]})), param(400, "prompt")),
        c("empty prompt", completion(json!({"prompt": ""})), param(400, "prompt")),
        c("prompt over max-model-len", completion(json!({"prompt": too_long_ids, "max_tokens": 1})), param(400, "prompt")),
        c("messages over max-model-len", chat(json!({"messages": user(&"hello ".repeat(1500)), "max_tokens": 1})), param(400, "messages")),
        c("stream_options without stream", chat(json!({"messages": user("x"), "stream_options": {"include_usage": true}})), param(400, "stream_options")),
        c("detokenize id >= vocab", Send::Raw(post_bytes("/detokenize", json!({"tokens": [VOCAB]}).to_string().as_bytes())), param(400, "tokens")),
        c("tokenize prompt not a string", Send::Raw(post_bytes("/tokenize", json!({"prompt": [1, 2]}).to_string().as_bytes())), param(400, "prompt")),
        // --- Structured outputs ---
        c("response_format not an object", Send::Raw(post_bytes(chat_path, json!({"messages": user("x"), "response_format": "json"}).to_string().as_bytes())), param(400, "response_format")),
        c("json_schema without schema", Send::Raw(post_bytes(chat_path, json!({"messages": user("x"), "response_format": {"type": "json_schema", "json_schema": {"name": "n"}}}).to_string().as_bytes())), param(400, "response_format")),
        c("invalid regex constraint", Send::Raw(post_bytes("/v1/completions", json!({"prompt": "x", "structured_outputs": {"regex": "[z-a]"}}).to_string().as_bytes())), param(400, "structured_outputs")),
        c("two constraints at once", Send::Raw(post_bytes("/v1/completions", json!({"prompt": "x", "structured_outputs": {"regex": "a", "grammar": "start: \"a\""}}).to_string().as_bytes())), param(400, "structured_outputs")),
        // --- Tool calling ---
        c("empty tools list", Send::Raw(post_bytes(chat_path, json!({"messages": user("x"), "tools": []}).to_string().as_bytes())), param(400, "tools")),
        c("tool_choice required without tools", Send::Raw(post_bytes(chat_path, json!({"messages": user("x"), "tool_choice": "required"}).to_string().as_bytes())), param(400, "tool_choice")),
        c("tools with auto but no tool-call parser", Send::Raw(post_bytes(chat_path, json!({"messages": user("x"), "tools": [{"type": "function", "function": {"name": "f"}}]}).to_string().as_bytes())), param(400, "tool_choice")),
        // --- Embedding endpoints on a text-generation model (the embedding model's own cases are
        // in tests/embeddings.rs) ---
        c("embeddings on a generative model", Send::Raw(post_bytes("/v1/embeddings", json!({"input": "hi"}).to_string().as_bytes())), bad(400)),
        c("embeddings invalid JSON", Send::Raw(post_bytes("/v1/embeddings", b"{not json")), bad(400)),
        c("embeddings input of wrong type", Send::Raw(post_bytes("/v1/embeddings", json!({"input": {"a": 1}}).to_string().as_bytes())), bad(400)),
        c("embeddings unknown model", Send::Raw(post_bytes("/v1/embeddings", json!({"model": "nope", "input": "hi"}).to_string().as_bytes())), param(404, "model")),
        c("rerank on a generative model", Send::Raw(post_bytes("/v1/rerank", json!({"query": "q", "documents": ["d"]}).to_string().as_bytes())), bad(400)),
        c("rerank alias, body is an array", Send::Raw(post_bytes("/rerank", b"[1]")), bad(400)),
        c("score on a generative model", Send::Raw(post_bytes("/v1/score", json!({"text_1": "a", "text_2": "b"}).to_string().as_bytes())), bad(400)),
        c("score alias, text_1 of wrong type", Send::Raw(post_bytes("/score", json!({"text_1": 5, "text_2": "b"}).to_string().as_bytes())), bad(400)),
        // --- Renderer API (token ids without running the model) ---
        c("completions render, invalid JSON", Send::Raw(post_bytes("/v1/completions/render", b"{nope")), bad(400)),
        c("completions render, prompt token id >= vocab", Send::Raw(post_bytes("/v1/completions/render", json!({"prompt": [1, VOCAB]}).to_string().as_bytes())), param(400, "prompt")),
        c("completions render, unknown model", Send::Raw(post_bytes("/v1/completions/render", json!({"model": "nope", "prompt": "x"}).to_string().as_bytes())), param(404, "model")),
        c("chat render, messages not a list", Send::Raw(post_bytes("/v1/chat/completions/render", json!({"messages": "hi"}).to_string().as_bytes())), param(400, "messages")),
        c("chat render, GET", Send::Raw(head("GET", "/v1/chat/completions/render", "", None)), bad(405)),
        // --- Scheduling ---
        c("priority under the fcfs policy", completion(json!({"prompt": "x", "priority": 5})), param(400, "priority")),
        c("priority out of 32-bit range", completion(json!({"prompt": "x", "priority": 1u64 << 40})), param(400, "priority")),
        // --- Batch API: files ---
        c("upload as JSON", Send::Raw(post_bytes("/v1/files", b"{}")), bad(415)),
        c("upload multipart without boundary", Send::Raw(upload_bytes("multipart/form-data", b"x")), bad(415)),
        c("upload truncated multipart", Send::Raw(upload_bytes(MULTIPART, b"--B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbat")), bad(400)),
        c("upload without purpose", Send::Raw(upload_bytes(MULTIPART, &form(&[("file", Some("a.jsonl"), b"{}")]))), param(400, "purpose")),
        c("upload with purpose fine-tune", Send::Raw(upload_bytes(MULTIPART, &form(&[("purpose", None, b"fine-tune"), ("file", Some("a"), b"{}")]))), param(400, "purpose")),
        c("upload without file", Send::Raw(upload_bytes(MULTIPART, &form(&[("purpose", None, b"batch")]))), param(400, "file")),
        c("upload over --max-batch-file-size", Send::Raw(upload_bytes(MULTIPART, &form(&[("purpose", None, b"batch"), ("file", Some("big"), &vec![b'x'; MAX_BATCH_FILE + 1])]))), bad(413)),
        c("unknown file", Send::Raw(head("GET", "/v1/files/file-nope", "", None)), param(404, "id")),
        c("unknown file content", Send::Raw(head("GET", "/v1/files/file-nope/content", "", None)), param(404, "id")),
        c("delete unknown file", Send::Raw(head("DELETE", "/v1/files/file-nope", "", None)), param(404, "id")),
        c("files limit 0", Send::Raw(head("GET", "/v1/files?limit=0", "", None)), param(400, "limit")),
        c("files order sideways", Send::Raw(head("GET", "/v1/files?order=sideways", "", None)), param(400, "order")),
        c("unknown file action", Send::Raw(head("GET", "/v1/files/file-x/unknown", "", None)), bad(404)),
        // --- Batch API: batches ---
        c("batch invalid JSON", Send::Raw(post_bytes("/v1/batches", b"{nope")), bad(400)),
        c("batch without input_file_id", Send::Raw(post_bytes("/v1/batches", json!({"endpoint": "/v1/completions", "completion_window": "24h"}).to_string().as_bytes())), param(400, "input_file_id")),
        c("batch on an unknown file", Send::Raw(post_bytes("/v1/batches", json!({"input_file_id": "file-nope", "endpoint": "/v1/completions", "completion_window": "24h"}).to_string().as_bytes())), param(404, "input_file_id")),
        c("batch endpoint /v1/responses", Send::Raw(post_bytes("/v1/batches", json!({"input_file_id": "f", "endpoint": "/v1/responses", "completion_window": "24h"}).to_string().as_bytes())), param(400, "endpoint")),
        c("batch embeddings on a generative model", Send::Raw(post_bytes("/v1/batches", json!({"input_file_id": "f", "endpoint": "/v1/embeddings", "completion_window": "24h"}).to_string().as_bytes())), param(400, "endpoint")),
        c("batch completion_window 1h", Send::Raw(post_bytes("/v1/batches", json!({"input_file_id": "f", "endpoint": "/v1/completions", "completion_window": "1h"}).to_string().as_bytes())), param(400, "completion_window")),
        c("batch metadata with 17 keys", Send::Raw(post_bytes("/v1/batches", json!({"input_file_id": "f", "endpoint": "/v1/completions", "completion_window": "24h", "metadata": (0..17).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()}).to_string().as_bytes())), param(400, "metadata")),
        c("batches limit 1000", Send::Raw(head("GET", "/v1/batches?limit=1000", "", None)), param(400, "limit")),
        c("unknown batch", Send::Raw(head("GET", "/v1/batches/batch_nope", "", None)), param(404, "id")),
        c("cancel unknown batch", Send::Raw(post_bytes("/v1/batches/batch_nope/cancel", b"{}")), param(404, "id")),
        c("PATCH a batch", Send::Raw(head("PATCH", "/v1/batches/batch_x", "", Some(0))), bad(405)),
        // --- Responses API ---
        c("response invalid JSON", Send::Raw(post_bytes("/v1/responses", b"{nope")), bad(400)),
        c("response without input", Send::Raw(post_bytes("/v1/responses", b"{}")), param(400, "input")),
        c("response input a number", Send::Raw(post_bytes("/v1/responses", json!({"input": 3}).to_string().as_bytes())), param(400, "input")),
        c("response input image", Send::Raw(post_bytes("/v1/responses", json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}).to_string().as_bytes())), param(400, "input")),
        c("response unknown item type", Send::Raw(post_bytes("/v1/responses", json!({"input": [{"type": "item_reference", "id": "x"}]}).to_string().as_bytes())), param(400, "input")),
        c("response web_search tool", Send::Raw(post_bytes("/v1/responses", json!({"input": "x", "tools": [{"type": "web_search"}]}).to_string().as_bytes())), param(400, "tools")),
        c("response computer tool", Send::Raw(post_bytes("/v1/responses", json!({"input": "x", "tools": [{"type": "computer_use_preview", "display_width": 1, "display_height": 1, "environment": "linux"}]}).to_string().as_bytes())), param(400, "tools")),
        c("response hosted tool_choice", Send::Raw(post_bytes("/v1/responses", json!({"input": "x", "tool_choice": {"type": "file_search"}}).to_string().as_bytes())), param(400, "tool_choice")),
        c("response text.format yaml", Send::Raw(post_bytes("/v1/responses", json!({"input": "x", "text": {"format": {"type": "yaml"}}}).to_string().as_bytes())), param(400, "text.format")),
        c("response bad json_schema", Send::Raw(post_bytes("/v1/responses", json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "nope"}}}}).to_string().as_bytes())), param(400, "text.format")),
        c("response background without store", Send::Raw(post_bytes("/v1/responses", json!({"input": "x", "background": true, "store": false}).to_string().as_bytes())), param(400, "background")),
        c("response background streamed", Send::Raw(post_bytes("/v1/responses", json!({"input": "x", "background": true, "stream": true}).to_string().as_bytes())), param(400, "background")),
        c("cancel unknown response", Send::Raw(post_bytes("/v1/responses/resp_nope/cancel", b"{}")), param(404, "response_id")),
        c("response truncation auto", Send::Raw(post_bytes("/v1/responses", json!({"input": "x", "truncation": "auto"}).to_string().as_bytes())), param(400, "truncation")),
        c("response conversation", Send::Raw(post_bytes("/v1/responses", json!({"input": "x", "conversation": "conv_1"}).to_string().as_bytes())), param(400, "conversation")),
        c("response max_output_tokens 0", Send::Raw(post_bytes("/v1/responses", json!({"input": "x", "max_output_tokens": 0}).to_string().as_bytes())), param(400, "max_output_tokens")),
        c("response temperature -1", Send::Raw(post_bytes("/v1/responses", json!({"input": "x", "temperature": -1}).to_string().as_bytes())), param(400, "temperature")),
        c("response unknown previous_response_id", Send::Raw(post_bytes("/v1/responses", json!({"input": "x", "previous_response_id": "resp_nope"}).to_string().as_bytes())), param(404, "previous_response_id")),
        c("unknown response", Send::Raw(head("GET", "/v1/responses/resp_nope", "", None)), param(404, "response_id")),
        c("delete unknown response", Send::Raw(head("DELETE", "/v1/responses/resp_nope", "", None)), param(404, "response_id")),
        c("input items of unknown response", Send::Raw(head("GET", "/v1/responses/resp_nope/input_items", "", None)), param(404, "response_id")),
        c("unknown response action", Send::Raw(head("GET", "/v1/responses/resp_x/retry", "", None)), bad(404)),
        c("GET a cancel", Send::Raw(head("GET", "/v1/responses/resp_x/cancel", "", None)), bad(405)),
        c("GET /v1/responses", Send::Raw(head("GET", "/v1/responses", "", None)), bad(405)),
        c("PATCH a response", Send::Raw(head("PATCH", "/v1/responses/resp_x", "", Some(0))), bad(405)),
        // --- Anthropic Messages API (Anthropic's error shape) ---
        c("message invalid JSON", Send::Raw(post_bytes("/v1/messages", b"{nope")), anthropic(400)),
        c("message without max_tokens", Send::Raw(post_bytes("/v1/messages", json!({"messages": [{"role": "user", "content": "x"}]}).to_string().as_bytes())), anthropic(400)),
        c("message without messages", Send::Raw(post_bytes("/v1/messages", json!({"max_tokens": 5}).to_string().as_bytes())), anthropic(400)),
        c("message system role", Send::Raw(post_bytes("/v1/messages", json!({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}).to_string().as_bytes())), anthropic(400)),
        c("message image block", Send::Raw(post_bytes("/v1/messages", json!({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}).to_string().as_bytes())), anthropic(400)),
        c("message tool_result without id", Send::Raw(post_bytes("/v1/messages", json!({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]}).to_string().as_bytes())), anthropic(400)),
        c("message server tool", Send::Raw(post_bytes("/v1/messages", json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "bash_20250124", "name": "bash"}]}).to_string().as_bytes())), anthropic(400)),
        c("message tool_choice unknown", Send::Raw(post_bytes("/v1/messages", json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "maybe"}}).to_string().as_bytes())), anthropic(400)),
        c("message max_tokens 0", Send::Raw(post_bytes("/v1/messages", json!({"max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}).to_string().as_bytes())), anthropic(400)),
        c("message thinking sideways", Send::Raw(post_bytes("/v1/messages", json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "thinking": {"type": "sideways"}}).to_string().as_bytes())), anthropic(400)),
        c("message unknown model", Send::Raw(post_bytes("/v1/messages", json!({"model": "claude-nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}).to_string().as_bytes())), Expect::Anthropic(404, "not_found_error")),
        c("count_tokens without messages", Send::Raw(post_bytes("/v1/messages/count_tokens", b"{}")), anthropic(400)),
        c("GET /v1/messages", Send::Raw(head("GET", "/v1/messages", "", None)), Expect::Anthropic(405, "invalid_request_error")),
    ]
}

/// Batch uploads' size limit in the catalogue's server.
const MAX_BATCH_FILE: usize = 64 * 1024;
const MULTIPART: &str = "multipart/form-data; boundary=B";

/// A POST to /v1/files with this content type and body.
fn upload_bytes(content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut r = head(
        "POST",
        "/v1/files",
        &format!("content-type: {content_type}\r\n"),
        Some(body.len()),
    );
    r.extend_from_slice(body);
    r
}

/// A multipart/form-data body with boundary `B`.
fn form(fields: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, data) in fields {
        let disposition = match filename {
            Some(f) => format!("form-data; name=\"{name}\"; filename=\"{f}\""),
            None => format!("form-data; name=\"{name}\""),
        };
        body.extend_from_slice(
            format!("--B\r\nContent-Disposition: {disposition}\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--B--\r\n");
    body
}

/// Send one case and return the raw bytes the server answered with.
async fn send(addr: SocketAddr, send: &Send) -> Vec<u8> {
    let quiet = Duration::from_secs(20);
    match send {
        Send::Raw(bytes) | Send::Pipelined(bytes, _) => {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            // The server may answer (413, 431) and close before taking all of a huge request.
            let _ = s.write_all(bytes).await;
            read_until_quiet(&mut s, quiet).await
        }
        Send::Slow(pieces) => {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            for (bytes, pause) in pieces {
                if !bytes.is_empty() && s.write_all(bytes).await.is_err() {
                    break;
                }
                tokio::time::sleep(*pause).await;
            }
            read_until_quiet(&mut s, quiet).await
        }
    }
}

/// Check one response against its expectation; returns a description of the mismatch.
fn check(r: Option<&RawResponse>, expect: Expect) -> Result<(), String> {
    match (expect, r) {
        (Expect::Closed, None) => Ok(()),
        (Expect::Closed, Some(r)) => Err(format!(
            "expected the connection to be closed, got {}",
            r.status
        )),
        (_, None) => Err("no response".into()),
        (Expect::Http(status), Some(r)) => {
            if r.status != status {
                return Err(format!(
                    "status {} (expected {status}): {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ));
            }
            Ok(())
        }
        (Expect::Anthropic(status, kind), Some(r)) => {
            let body: Value = serde_json::from_slice(&r.body)
                .map_err(|_| format!("not JSON: {}", String::from_utf8_lossy(&r.body)))?;
            let ok = r.status == status
                && body["type"] == "error"
                && body["error"]["type"] == kind
                && body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty());
            match ok {
                true => Ok(()),
                false => Err(format!("{} (expected {status} {kind}): {body}", r.status)),
            }
        }
        (Expect::Api(status, param), Some(r)) => {
            if r.status != status {
                return Err(format!(
                    "status {} (expected {status}): {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ));
            }
            if !r
                .header("content-type")
                .is_some_and(|c| c.starts_with("application/json"))
            {
                return Err(format!(
                    "error without a JSON content type: {:?}",
                    r.headers
                ));
            }
            let e = std::panic::catch_unwind(|| {
                assert_openai_error(StatusCode::from_u16(status).unwrap(), &r.body)
            })
            .map_err(|_| {
                format!(
                    "not an OpenAI error body: {}",
                    String::from_utf8_lossy(&r.body)
                )
            })?;
            if let Some(p) = param {
                if e["param"] != p {
                    return Err(format!("param {} (expected {p}): {e}", e["param"]));
                }
            }
            if r.headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("x-injected"))
            {
                return Err("a header was injected into the response".into());
            }
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_documented_errors_and_the_server_survives() {
    let (engine, metrics) = start_engine(|_| {});
    let data_dir = std::env::temp_dir().join(format!("spindle-bad-input-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let s = TestServer::start(engine.clone(), metrics, |c| {
        c.max_body_bytes = MAX_BODY;
        c.header_read_timeout = HEADER_TIMEOUT;
        c.body_read_timeout = BODY_TIMEOUT;
        let mut batch = spindle_server::batch::BatchConfig::new(&data_dir);
        batch.max_file_bytes = MAX_BATCH_FILE;
        c.batch = Some(batch);
    })
    .await;
    let cases = catalogue();
    assert!(
        cases.len() >= 30,
        "the catalogue must have at least 30 cases, has {}",
        cases.len()
    );

    // Run the cases concurrently (the slow ones take seconds), each on its own connection.
    let started = Instant::now();
    let runs: Vec<_> = cases
        .into_iter()
        .map(|case| {
            let addr = s.addr;
            tokio::spawn(async move {
                let bytes = send(addr, &case.send).await;
                let responses = parse_responses(&bytes);
                let outcome = match &case.send {
                    Send::Pipelined(_, expects) => {
                        if responses.len() != expects.len() {
                            Err(format!(
                                "{} responses to {} pipelined requests",
                                responses.len(),
                                expects.len()
                            ))
                        } else {
                            responses
                                .iter()
                                .zip(expects)
                                .try_for_each(|(r, &e)| check(Some(r), e))
                        }
                    }
                    _ if responses.len() > 1 => {
                        Err(format!("{} responses to one request", responses.len()))
                    }
                    _ => check(responses.first(), case.expect),
                };
                let first = responses.first().map(|r| (r.version.clone(), r.status));
                (case.name, outcome, first)
            })
        })
        .collect();
    let mut failures = Vec::new();
    let total = runs.len();
    for run in runs {
        let (name, outcome, first) = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("case finishes")
            .expect("case task");
        match outcome {
            Ok(()) => println!("ok    {name}: {first:?}"),
            Err(why) => {
                println!("FAIL  {name}: {why}");
                failures.push(format!("{name}: {why}"));
            }
        }
    }
    println!(
        "{total} malformed requests in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // HTTP/1.0 is answered as HTTP/1.x and the connection closes (checked by reading to EOF).
    let r = parse_responses(
        &raw(
            s.addr,
            b"GET /health HTTP/1.0\r\n\r\n",
            Duration::from_secs(10),
        )
        .await,
    );
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].status, 200);

    // An idle keep-alive connection is closed once the header timeout passes without a request.
    let mut conn = TcpStream::connect(s.addr).await.expect("connect");
    conn.write_all(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .expect("write");
    let opened = Instant::now();
    let bytes = read_until_quiet(&mut conn, Duration::from_secs(20)).await;
    let closed_after = opened.elapsed();
    assert_eq!(parse_responses(&bytes).first().map(|r| r.status), Some(200));
    assert!(
        closed_after < HEADER_TIMEOUT * 5,
        "idle keep-alive connection still open after {closed_after:?}"
    );

    // Still healthy, nothing stuck in the engine, and a normal request works.
    assert_eq!(get(s.addr, "/health").await.status, StatusCode::OK);
    wait_engine_idle(s.addr, Duration::from_secs(10)).await;
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": user("Hi"), "max_tokens": 3}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);
    s.shutdown().await;
    engine.shutdown();
}
