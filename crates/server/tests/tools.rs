//! Forced tool calls end to end on the default model, whose chat template ignores tools:
//! `tool_choice: "required"` and a named tool are constrained, so the answer is always a valid
//! call (`finish_reason: "tool_calls"`, `content: null`, arguments valid for the tool's schema);
//! `parallel_tool_calls: false` gives one call; a tool without parameters gives `"{}"`; streamed
//! calls equal non-streamed ones and no markup reaches `content`; a conversation carrying an
//! assistant tool call and a tool result renders; bad tool fields are 400s.

mod reliability;

use hyper::StatusCode;
use reliability::*;
use serde_json::{json, Value};

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
         "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                        "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "description": "The current time"}}
    ])
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// (name, arguments) of every call of a non-streamed answer.
fn calls(r: &Reply) -> Vec<(String, Value)> {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert!(choice["message"]["content"].is_null(), "{v}");
    choice["message"]["tool_calls"]
        .as_array()
        .expect("tool_calls")
        .iter()
        .map(|c| {
            assert_eq!(c["type"], "function");
            assert!(c["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("chatcmpl-tool-")));
            let args = c["function"]["arguments"]
                .as_str()
                .expect("arguments are a JSON string");
            (
                c["function"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                serde_json::from_str(args).expect("arguments parse"),
            )
        })
        .collect()
}

fn check_weather_args(args: &Value) {
    let unit = args["unit"].as_str().unwrap_or_default();
    assert!(
        args["city"].is_string() && ["celsius", "fahrenheit"].contains(&unit),
        "{args}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forced_tool_calls() {
    let server = TestServer::start_default().await;
    let addr = server.addr;

    // required: one or more calls of declared tools.
    let r = post(addr, "/v1/chat/completions", &json!({
        "messages": user("What is the weather in Paris?"), "tools": tools(), "tool_choice": "required", "max_tokens": 120
    })).await;
    let got = calls(&r);
    assert!(!got.is_empty());
    for (name, args) in &got {
        match name.as_str() {
            "get_weather" => check_weather_args(args),
            "get_time" => assert_eq!(args, &json!({})),
            other => panic!("undeclared tool {other}"),
        }
    }

    // parallel_tool_calls: false -> exactly one call.
    for seed in 0..3 {
        let r = post(addr, "/v1/chat/completions", &json!({
            "messages": user("Weather in Rome and the time?"), "tools": tools(), "tool_choice": "required",
            "parallel_tool_calls": false, "max_tokens": 120, "temperature": 1.0, "seed": seed
        })).await;
        assert_eq!(calls(&r).len(), 1);
    }

    // Named tool: exactly that one; a tool without parameters gives "{}".
    let r = post(addr, "/v1/chat/completions", &json!({
        "messages": user("Weather?"), "tools": tools(),
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 120
    })).await;
    let got = calls(&r);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "get_weather");
    check_weather_args(&got[0].1);
    let r = post(
        addr,
        "/v1/chat/completions",
        &json!({
            "messages": user("Time?"), "tools": tools(),
            "tool_choice": {"type": "function", "function": {"name": "get_time"}}, "max_tokens": 40
        }),
    )
    .await;
    let v = r.json();
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], "{}",
        "{v}"
    );

    // Streamed: the same calls as non-streamed for a seed, no content, finish tool_calls.
    let body = json!({
        "messages": user("What is the weather in Oslo?"), "tools": tools(), "tool_choice": "required",
        "max_tokens": 120, "temperature": 0.8, "seed": 3
    });
    let whole = calls(&post(addr, "/v1/chat/completions", &body).await);
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let r = post(addr, "/v1/chat/completions", &sbody).await;
    assert_eq!(r.status, StatusCode::OK);
    let events = sse_events(&r.text()).expect("stream");
    let mut streamed: Vec<(String, String)> = Vec::new();
    let mut finish = None;
    for e in events.iter().filter(|e| e.as_str() != "[DONE]") {
        let v: Value = serde_json::from_str(e).expect("chunk json");
        let Some(choice) = v["choices"].get(0) else {
            continue;
        };
        if let Some(c) = choice["delta"]["content"].as_str() {
            assert!(
                c.is_empty(),
                "content leaked into a tool-call stream: {c:?}"
            );
        }
        for d in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = d["index"].as_u64().expect("index") as usize;
            if streamed.len() <= i {
                assert!(
                    d["id"].is_string() && d["type"] == "function",
                    "first delta of a call: {d}"
                );
                streamed.push((
                    d["function"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    String::new(),
                ));
            }
            streamed[i]
                .1
                .push_str(d["function"]["arguments"].as_str().unwrap_or_default());
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    let streamed: Vec<(String, Value)> = streamed
        .into_iter()
        .map(|(n, a)| {
            (
                n,
                serde_json::from_str(&a).expect("streamed arguments parse"),
            )
        })
        .collect();
    assert_eq!(streamed, whole);

    // A follow-up turn with the assistant's call and the tool's result renders and answers.
    let (name, args) = &whole[0];
    let r = post(addr, "/v1/chat/completions", &json!({
        "messages": [
            {"role": "user", "content": "What is the weather in Oslo?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
              "function": {"name": name, "arguments": args.to_string()}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 3, \"unit\": \"celsius\"}"}
        ],
        "tools": tools(), "tool_choice": "none", "max_tokens": 16
    })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(r.json()["choices"][0]["message"]["content"].is_string());

    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tool_fields_are_400s() {
    let server = TestServer::start_default().await;
    let addr = server.addr;
    let cases = [
        (json!({"messages": user("x"), "tools": []}), "tools"),
        // Tools without tool_choice mean "auto", which needs --enable-auto-tool-choice.
        (
            json!({"messages": user("x"), "tools": tools()}),
            "tool_choice",
        ),
        (
            json!({"messages": user("x"), "tools": tools(), "tool_choice": "auto"}),
            "tool_choice",
        ),
        (
            json!({"messages": user("x"), "tools": [{"type": "function", "function": {"name": "has space"}}]}),
            "tools",
        ),
        (
            json!({"messages": user("x"), "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"messages": user("x"), "tools": tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            json!({"messages": user("x"), "tools": tools(), "tool_choice": "required", "structured_outputs": {"regex": "a"}}),
            "tool_choice",
        ),
        (
            json!({"messages": user("x"), "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": true}}}], "tool_choice": "required"}),
            "tools",
        ),
    ];
    for (body, param) in cases {
        expect_api_error(addr, "/v1/chat/completions", &body, 400, Some(param)).await;
    }
    server.shutdown().await;
}
