//! Structured outputs end to end on the default model: `response_format` (json_object,
//! json_schema) and `structured_outputs` (json, regex, choice, grammar) on both endpoints, with
//! outputs checked by a JSON-schema validator; streamed equals non-streamed for a seed; n > 1;
//! constrained and unconstrained requests batched together; the 400 matrix.

mod reliability;

use hyper::StatusCode;
use reliability::*;
use serde_json::{json, Value};

fn chat_text(r: &Reply) -> String {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn completion_texts(r: &Reply) -> Vec<String> {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| c["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "hobbies": {"type": "array", "items": {"enum": ["chess", "music", "hiking"]}, "minItems": 1, "maxItems": 2}
        },
        "required": ["name", "age", "hobbies"],
        "additionalProperties": false
    })
}

fn valid(schema: &Value, text: &str) -> bool {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => return false,
    };
    jsonschema::validator_for(schema)
        .expect("schema")
        .is_valid(&v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn response_format_and_structured_outputs_on_both_endpoints() {
    let server = TestServer::start_default().await;
    let addr = server.addr;
    let schema = person_schema();
    let user = json!([{"role": "user", "content": "Describe a person as JSON."}]);

    // response_format json_schema, chat and completions.
    let r = post(addr, "/v1/chat/completions", &json!({
        "messages": user, "max_tokens": 120,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": true}}
    })).await;
    let text = chat_text(&r);
    assert!(valid(&schema, &text), "{text}");
    assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");
    let r = post(addr, "/v1/completions", &json!({
        "prompt": "A person as JSON:", "max_tokens": 120,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    })).await;
    let text = &completion_texts(&r)[0];
    assert!(valid(&schema, text), "{text}");

    // json_object.
    let r = post(
        addr,
        "/v1/chat/completions",
        &json!({
            "messages": user, "max_tokens": 150, "response_format": {"type": "json_object"}
        }),
    )
    .await;
    let text = chat_text(&r);
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    assert!(v.is_object());

    // structured_outputs: json (string form, no whitespace), regex, choice, grammar.
    let r = post(addr, "/v1/completions", &json!({
        "prompt": "Numbers:", "max_tokens": 60,
        "structured_outputs": {"json": "{\"type\": \"array\", \"items\": {\"type\": \"integer\"}, \"minItems\": 2, \"maxItems\": 4}", "disable_any_whitespace": true}
    })).await;
    let text = &completion_texts(&r)[0];
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    assert!(
        v.as_array().is_some_and(|a| (2..=4).contains(&a.len())),
        "{text}"
    );
    assert!(!text.contains(' '), "{text}");
    let r = post(addr, "/v1/completions", &json!({
        "prompt": "Call me at", "max_tokens": 20, "structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}
    })).await;
    let text = &completion_texts(&r)[0];
    assert!(
        text.len() == 8
            && text.chars().enumerate().all(|(i, c)| if i == 3 {
                c == '-'
            } else {
                c.is_ascii_digit()
            }),
        "{text}"
    );
    let r = post(
        addr,
        "/v1/chat/completions",
        &json!({
            "messages": [{"role": "user", "content": "Is the sky blue?"}], "max_tokens": 10,
            "structured_outputs": {"choice": ["yes", "no", "maybe"]}
        }),
    )
    .await;
    let text = chat_text(&r);
    assert!(["yes", "no", "maybe"].contains(&text.as_str()), "{text}");
    let r = post(addr, "/v1/completions", &json!({
        "prompt": "Q: 2+2? A:", "max_tokens": 20,
        "structured_outputs": {"grammar": "start: \" The answer is \" NUMBER \".\"\nNUMBER: /[0-9]{1,2}/"}
    })).await;
    let text = &completion_texts(&r)[0];
    assert!(
        text.starts_with(" The answer is ") && text.ends_with('.'),
        "{text}"
    );

    // n > 1 with sampling: every choice is valid.
    let r = post(addr, "/v1/completions", &json!({
        "prompt": "A person as JSON:", "max_tokens": 120, "n": 3, "temperature": 1.0, "seed": 5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    })).await;
    for text in completion_texts(&r) {
        assert!(valid(&schema, &text), "{text}");
    }

    // Streamed equals non-streamed for the same seed.
    let body = json!({
        "messages": user, "max_tokens": 120, "temperature": 0.9, "seed": 11,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    });
    let whole = chat_text(&post(addr, "/v1/chat/completions", &body).await);
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let r = post(addr, "/v1/chat/completions", &streamed_body).await;
    let streamed = check_chat_stream(&r.text()).expect("well-formed stream");
    assert_eq!(streamed, whole);
    assert!(valid(&schema, &streamed), "{streamed}");

    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn constrained_and_unconstrained_requests_share_batches() {
    let server = TestServer::start_default().await;
    let addr = server.addr;
    let schema = person_schema();
    let plain = json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0});
    let alone = completion_texts(&post(addr, "/v1/completions", &plain).await)[0].clone();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let schema = schema.clone();
        let plain = plain.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let r = post(addr, "/v1/completions", &json!({
                    "prompt": format!("Person {i} as JSON:"), "max_tokens": 120,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
                })).await;
                let text = completion_texts(&r)[0].clone();
                assert!(valid(&schema, &text), "{text}");
                None
            } else {
                Some(completion_texts(&post(addr, "/v1/completions", &plain).await)[0].clone())
            }
        }));
    }
    for t in tasks {
        if let Some(text) = t.await.expect("task") {
            assert_eq!(
                text, alone,
                "an unconstrained request is unaffected by constrained neighbours"
            );
        }
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_constraints_are_400s_naming_the_field() {
    let server = TestServer::start_default().await;
    let addr = server.addr;
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/v1/chat/completions",
            json!({"messages": user, "response_format": {"type": "json_schema"}}),
            "response_format",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}}),
            "response_format",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": true}}}}),
            "response_format",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user, "response_format": {"type": "xml"}}),
            "response_format",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "structured_outputs": {"regex": "(unclosed"}}),
            "structured_outputs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "structured_outputs": {"grammar": "start: missing_rule"}}),
            "structured_outputs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}}),
            "structured_outputs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "structured_outputs": {}}),
            "structured_outputs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "structured_outputs": {"choice": []}}),
            "structured_outputs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "structured_outputs": {"json": {"$ref": "#/$defs/nope"}}}),
            "structured_outputs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}),
            "structured_outputs",
        ),
    ];
    for (path, body, param) in cases {
        expect_api_error(addr, path, &body, 400, Some(param)).await;
    }
    assert_eq!(get(addr, "/health").await.status, StatusCode::OK);
    server.shutdown().await;
}
