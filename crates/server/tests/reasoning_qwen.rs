//! `--reasoning-parser qwen3` end to end on Qwen2.5-Coder-0.5B-Instruct (scripts/fetch-qwen.sh),
//! which writes `<think> … </think>` when asked to (as text: this model has no thinking tokens,
//! so the marker also arrives split across tokens, e.g. `.</`, `think`, `>`). The thinking
//! lands in `reasoning_content` and `reasoning`, the answer in `content` with no markup;
//! streamed deltas concatenate to the non-streamed fields; `include_reasoning: false` drops the
//! thinking; a JSON schema applies from the end of the thinking on; thinking cut by
//! `max_tokens` is all reasoning with a null answer.

mod reliability;

use hyper::StatusCode;
use reliability::*;
use serde_json::{json, Value};
use spindle_server::reasoning::ReasoningParser;

fn qwen() -> String {
    qwen_path()
}

const ASK: &str = "Answer in this exact format: <think>your reasoning</think>your answer. Question: What is the capital of France?";

fn ask(extra: Value) -> Value {
    let mut body =
        json!({"messages": [{"role": "user", "content": ASK}], "max_tokens": 80, "temperature": 0});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

/// The streamed thinking and answer, concatenated (`None` for a part that never came).
fn streamed(body: &str) -> (Option<String>, Option<String>, Option<String>) {
    let (mut reasoning, mut alias, mut content) = (None::<String>, None::<String>, None::<String>);
    for e in sse_events(body)
        .expect("stream")
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
    {
        let v: Value = serde_json::from_str(e).expect("chunk");
        let Some(delta) = v["choices"].get(0).map(|c| &c["delta"]) else {
            continue;
        };
        for (field, acc) in [
            ("reasoning_content", &mut reasoning),
            ("reasoning", &mut alias),
            ("content", &mut content),
        ] {
            if let Some(t) = delta[field].as_str().filter(|t| !t.is_empty()) {
                acc.get_or_insert_with(String::new).push_str(t);
            }
        }
    }
    (reasoning, alias, content)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thinking_is_split_from_the_answer() {
    let (engine, metrics) = start_engine(|cfg| {
        cfg.model.model = qwen();
        cfg.model.max_model_len = Some(4096);
        cfg.kv_cache_memory_bytes = Some(256 << 20);
    });
    let server = TestServer::start(engine, metrics, |c| {
        c.reasoning_parser = Some(ReasoningParser::Qwen3);
        c.model_root = qwen();
    })
    .await;
    let addr = server.addr;

    let r = post(addr, "/v1/chat/completions", &ask(json!({}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    let message = &v["choices"][0]["message"];
    let reasoning = message["reasoning_content"].as_str().expect("reasoning");
    let content = message["content"].as_str().expect("content");
    assert!(!reasoning.trim().is_empty(), "{v}");
    assert_eq!(message["reasoning"], message["reasoning_content"]);
    assert!(!content.trim().is_empty(), "{v}");
    for part in [reasoning, content] {
        assert!(!part.contains("think>") && !part.contains("</"), "{v}");
    }

    // Streamed: the same parts, piece by piece.
    let r = post(addr, "/v1/chat/completions", &ask(json!({"stream": true}))).await;
    assert_eq!(r.status, StatusCode::OK);
    let (s_reasoning, s_alias, s_content) = streamed(&r.text());
    assert_eq!(s_reasoning.as_deref(), Some(reasoning));
    assert_eq!(s_alias.as_deref(), Some(reasoning));
    assert_eq!(s_content.as_deref(), Some(content));

    // include_reasoning: false drops the thinking, streamed or not; the answer stays.
    let r = post(
        addr,
        "/v1/chat/completions",
        &ask(json!({"include_reasoning": false})),
    )
    .await;
    let v = r.json();
    let message = &v["choices"][0]["message"];
    assert!(message.get("reasoning_content").is_none() && message.get("reasoning").is_none());
    assert_eq!(message["content"], content, "{v}");
    let r = post(
        addr,
        "/v1/chat/completions",
        &ask(json!({"include_reasoning": false, "stream": true})),
    )
    .await;
    let (s_reasoning, _, s_content) = streamed(&r.text());
    assert_eq!((s_reasoning, s_content.as_deref()), (None, Some(content)));

    // A JSON schema applies to the answer, after the thinking.
    let schema = json!({"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]});
    let format = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}});
    for stream in [false, true] {
        let mut body = ask(format.clone());
        body["messages"][0]["content"] = json!(ASK.replace("your answer.", "your answer as JSON."));
        body["stream"] = json!(stream);
        let r = post(addr, "/v1/chat/completions", &body).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let (thinking, answer) = if stream {
            let (r, _, c) = streamed(&r.text());
            (r, c)
        } else {
            let v = r.json();
            let m = &v["choices"][0]["message"];
            let s = |f: &str| m[f].as_str().map(str::to_string);
            (s("reasoning_content"), s("content"))
        };
        assert!(thinking.is_some_and(|t| !t.trim().is_empty()));
        let answer: Value = serde_json::from_str(answer.as_deref().unwrap_or("")).expect("JSON");
        assert!(answer["capital"].is_string(), "{answer}");
    }

    // Cut inside the thinking: all of it is reasoning, and there is no answer.
    let r = post(addr, "/v1/chat/completions", &ask(json!({"max_tokens": 4}))).await;
    let v = r.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "length", "{v}");
    assert!(choice["message"]["content"].is_null(), "{v}");
    assert!(choice["message"]["reasoning_content"].is_string(), "{v}");
    let r = post(
        addr,
        "/v1/chat/completions",
        &ask(json!({"max_tokens": 4, "stream": true})),
    )
    .await;
    let (s_reasoning, _, s_content) = streamed(&r.text());
    assert_eq!(
        s_reasoning.as_deref(),
        choice["message"]["reasoning_content"].as_str()
    );
    assert_eq!(s_content, None);

    server.shutdown().await;
}
