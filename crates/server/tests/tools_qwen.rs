//! `tool_choice: "auto"` end to end on Qwen2.5-Coder-0.5B-Instruct (scripts/fetch-qwen.sh) with
//! the `hermes` parser, as `spindle serve --enable-auto-tool-choice --tool-call-parser hermes`:
//! a weather question becomes a `get_weather` call (this model writes it as bare or fenced JSON,
//! which the parser accepts when it names a declared tool), a request for a haiku stays text,
//! JSON naming an undeclared tool stays content, and a streamed call sends no markup as content.

mod reliability;

use hyper::StatusCode;
use reliability::*;
use serde_json::{json, Value};
use spindle_server::tools::ToolParser;

fn qwen() -> String {
    qwen_path()
}

fn tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a given city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}}, "required": ["city"]}}}])
}

fn ask(text: &str, extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": text}], "tools": tools(), "max_tokens": 80, "temperature": 0});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_tool_choice_with_the_hermes_parser() {
    let (engine, metrics) = start_engine(|cfg| {
        cfg.model.model = qwen();
        cfg.model.max_model_len = Some(4096);
        cfg.kv_cache_memory_bytes = Some(256 << 20);
    });
    let server = TestServer::start(engine, metrics, |c| {
        c.tool_call_parser = Some(ToolParser::Hermes);
        c.model_root = qwen();
    })
    .await;
    let addr = server.addr;

    // A weather question: a call of the declared tool, no content.
    let r = post(
        addr,
        "/v1/chat/completions",
        &ask("What is the weather like in Paris today?", json!({})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert!(choice["message"]["content"].is_null(), "{v}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap_or(""))
        .expect("arguments");
    assert!(
        args["city"].as_str().is_some_and(|c| c.contains("Paris")),
        "{args}"
    );

    // A plain request: text, no call.
    let r = post(
        addr,
        "/v1/chat/completions",
        &ask("Write a haiku about the sea.", json!({})),
    )
    .await;
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty()),
        "{v}"
    );
    assert!(
        v["choices"][0]["message"]["tool_calls"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "{v}"
    );

    // JSON that names a tool nobody declared stays content.
    let r = post(
        addr,
        "/v1/chat/completions",
        &ask("Write a Python function that adds two numbers.", json!({})),
    )
    .await;
    let v = r.json();
    if v["choices"][0]["message"]["content"]
        .as_str()
        .is_some_and(|c| c.contains("\"name\""))
    {
        assert!(
            v["choices"][0]["message"]["tool_calls"]
                .as_array()
                .is_none_or(Vec::is_empty),
            "{v}"
        );
        assert_ne!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    }

    // Streamed (this question gets a fenced JSON call from this model): no markup as content.
    let r = post(
        addr,
        "/v1/chat/completions",
        &ask(
            "Please check the weather in Tokyo for me.",
            json!({"stream": true}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let (mut content, mut names, mut args, mut finish) =
        (String::new(), Vec::new(), String::new(), None);
    for e in sse_events(&r.text())
        .expect("stream")
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
    {
        let v: Value = serde_json::from_str(e).expect("chunk");
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        content.push_str(c["delta"]["content"].as_str().unwrap_or(""));
        for d in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            if let Some(n) = d["function"]["name"].as_str() {
                names.push(n.to_string());
            }
            args.push_str(d["function"]["arguments"].as_str().unwrap_or(""));
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"), "content {content:?}");
    assert_eq!(names, ["get_weather"]);
    assert!(
        !content.contains("```")
            && !content.contains("<tool_call>")
            && !content.contains("\"name\""),
        "{content:?}"
    );
    let args: Value = serde_json::from_str(&args).expect("streamed arguments");
    assert!(
        args["city"].as_str().is_some_and(|c| c.contains("Tokyo")),
        "{args}"
    );

    server.shutdown().await;
}

/// A tool without parameters (absent, or an empty object schema), forced by name or by
/// `required`, gets exactly `{}` as arguments: argument schemas are strict by default, so the
/// model cannot stuff the call envelope into an open object (it did: `{"name": "ping",
/// "arguments": {...}}`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tools_without_parameters_get_empty_arguments() {
    let (engine, metrics) = start_engine(|cfg| {
        cfg.model.model = qwen();
        cfg.model.max_model_len = Some(4096);
        cfg.kv_cache_memory_bytes = Some(256 << 20);
    });
    let server = TestServer::start(engine, metrics, |c| c.model_root = qwen()).await;
    let addr = server.addr;
    for function in [
        json!({"name": "ping", "description": "Check that the service is up"}),
        json!({"name": "ping", "description": "Check that the service is up", "parameters": {"type": "object", "properties": {}}}),
    ] {
        let tools = json!([{"type": "function", "function": function}]);
        for choice in [
            json!("required"),
            json!({"type": "function", "function": {"name": "ping"}}),
        ] {
            let body = json!({"messages": [{"role": "user", "content": "Is the service up? Call ping."}],
                "tools": tools, "tool_choice": choice, "max_tokens": 60, "temperature": 0});
            let r = post(addr, "/v1/chat/completions", &body).await;
            assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
            let v = r.json();
            let calls = &v["choices"][0]["message"]["tool_calls"];
            assert_eq!(calls.as_array().map(Vec::len), Some(1), "{v}");
            assert_eq!(calls[0]["function"]["name"], "ping");
            assert_eq!(calls[0]["function"]["arguments"], "{}", "{v}");
        }
    }
}
