//! Speculative decoding (n-gram drafts) through the HTTP API on the default model: drafts go
//! through JSON-schema and regex constraints (a draft token the grammar forbids is rejected),
//! so constrained outputs equal a server without speculation and validate; streamed deltas that
//! carry several tokens concatenate to the non-streamed text; vLLM's `spec_decode` counters
//! move on `/metrics`.

mod reliability;

use hyper::StatusCode;
use reliability::*;
use serde_json::{json, Value};
use spindle_engine::spec::SpeculativeConfig;

fn ngram() -> SpeculativeConfig {
    let mut spec = SpeculativeConfig::from_json(
        r#"{"method":"ngram","num_speculative_tokens":6,"prompt_lookup_max":3,"prompt_lookup_min":1}"#,
    )
    .expect("config");
    spec.disable_by_batch_size = 64;
    spec
}

fn people_schema() -> Value {
    json!({
        "type": "array", "minItems": 3, "maxItems": 3,
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 16},
                "age": {"type": "integer", "minimum": 0, "maximum": 99},
                "city": {"type": "string", "maxLength": 16}
            },
            "required": ["name", "age", "city"],
            "additionalProperties": false
        }
    })
}

fn valid(schema: &Value, text: &str) -> bool {
    serde_json::from_str::<Value>(text).is_ok_and(|v| {
        jsonschema::validator_for(schema)
            .expect("schema")
            .is_valid(&v)
    })
}

fn choices(r: &Reply) -> Value {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()["choices"].clone()
}

fn spec_counter(text: &str, name: &str) -> f64 {
    metric(
        text,
        &format!("vllm:spec_decode_{name}_total{{model_name=\"{MODEL_NAME}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drafts_obey_constraints_and_change_no_output() {
    let (engine, metrics) = start_engine(|_| {});
    let plain = TestServer::start(engine, metrics, |_| {}).await;
    let (engine, metrics) = start_engine(|c| c.speculative = Some(ngram()));
    let spec = TestServer::start(engine, metrics, |_| {}).await;
    let schema = people_schema();
    let format =
        json!({"type": "json_schema", "json_schema": {"name": "people", "schema": schema}});
    let bodies = [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Three people as JSON, please."}],
                   "max_tokens": 160, "temperature": 0, "response_format": format}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "People as JSON:", "max_tokens": 160, "temperature": 0.8,
                   "seed": 3, "response_format": format}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "Codes: AB-12, CD-34, EF-56, AB-12, CD-34, EF-56. Again:",
                   "max_tokens": 24, "temperature": 0,
                   "structured_outputs": {"regex": "( [A-F]{2}-[0-9]{2},){4}"}}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2,", "max_tokens": 40,
                   "temperature": 0, "logprobs": 2}),
        ),
    ];
    for (i, (path, body)) in bodies.iter().enumerate() {
        if i == 2 {
            // The JSON-schema outputs repeat their keys: drafts were verified under the grammar.
            let text = get(spec.addr, "/metrics").await.text();
            assert!(spec_counter(&text, "num_accepted_tokens") > 0.0, "{text}");
        }
        let a = choices(&post(plain.addr, path, body).await);
        let b = choices(&post(spec.addr, path, body).await);
        assert_eq!(a, b, "{path} {body}");
        if body.get("response_format").is_some() {
            let text = b[0]["message"]["content"]
                .as_str()
                .or(b[0]["text"].as_str())
                .unwrap_or_default();
            assert!(valid(&schema, text), "{text}");
        }
    }

    // Streamed: deltas may carry several tokens; their text adds up to the whole answer.
    let body = json!({"messages": [{"role": "user", "content": "Three people as JSON, please."}],
                      "max_tokens": 160, "temperature": 0, "response_format": format});
    let whole = post(spec.addr, "/v1/chat/completions", &body).await.json()["choices"][0]
        ["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = post(spec.addr, "/v1/chat/completions", &streamed).await;
    assert_eq!(
        check_chat_stream(&r.text()).expect("well-formed stream"),
        whole
    );

    let text = get(spec.addr, "/metrics").await.text();
    let (drafts, tokens, accepted) = (
        spec_counter(&text, "num_drafts"),
        spec_counter(&text, "num_draft_tokens"),
        spec_counter(&text, "num_accepted_tokens"),
    );
    assert!(
        drafts > 0.0 && accepted > 0.0 && accepted <= tokens,
        "{text}"
    );
    assert!(
        text.contains("vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name=\"smollm2\",position=\"0\"}"),
        "{text}"
    );
    let text = get(plain.addr, "/metrics").await.text();
    assert_eq!(spec_counter(&text, "num_drafts"), 0.0);
    plain.shutdown().await;
    spec.shutdown().await;
}
