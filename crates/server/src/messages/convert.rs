//! Anthropic's Messages API in terms of chat completions: a request (system, messages of text /
//! `tool_use` / `tool_result` / `thinking` blocks, tools with `input_schema`, `tool_choice`,
//! `stop_sequences`, `thinking`) becomes a chat request for the existing pipeline, and a
//! finished chat choice becomes content blocks with Anthropic's `stop_reason`.

use serde_json::{json, Map, Value};

use crate::error::ApiError;

/// `POST /v1/messages` (and `/v1/messages/count_tokens`, which needs no `max_tokens`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct MessagesRequest {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub messages: Option<Value>,
    pub system: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub stop_sequences: Option<Value>,
    pub temperature: Option<Value>,
    pub top_p: Option<Value>,
    pub top_k: Option<Value>,
    pub stream: Option<bool>,
    pub thinking: Option<Value>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_param(param, message)
}

/// The text of `text` blocks (or a string); other blocks are refused (text-only models).
fn text_of(content: &Value, at: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut out = Vec::new();
            for (j, b) in blocks.iter().enumerate() {
                match (
                    b.get("type").and_then(Value::as_str),
                    b.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => out.push(t),
                    (kind, _) => {
                        return Err(bad(
                            "messages",
                            format!(
                                "{at}[{j}]: `{}` blocks are not supported here (text-only models).",
                                kind.unwrap_or("untyped")
                            ),
                        ))
                    }
                }
            }
            Ok(out.join("\n"))
        }
        Value::Null => Ok(String::new()),
        _ => Err(bad(
            "messages",
            format!("{at} must be a string or a list of blocks."),
        )),
    }
}

/// One Anthropic message as chat messages (a user turn's tool results become tool messages).
fn chat_messages(i: usize, m: &Value, out: &mut Vec<Value>) -> Result<(), ApiError> {
    let at = format!("messages[{i}]");
    let role = match m.get("role").and_then(Value::as_str) {
        Some(r @ ("user" | "assistant")) => r,
        _ => {
            return Err(bad(
                "messages",
                format!("{at}.role must be user or assistant."),
            ))
        }
    };
    let content = m.get("content").unwrap_or(&Value::Null);
    let blocks = match content {
        Value::String(s) => {
            out.push(json!({"role": role, "content": s}));
            return Ok(());
        }
        Value::Array(b) => b,
        _ => {
            return Err(bad(
                "messages",
                format!("{at}.content must be a string or a list of blocks."),
            ))
        }
    };
    let (mut text, mut calls, mut thinking) = (Vec::new(), Vec::new(), Vec::new());
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("{at}.content[{j}]");
        match (role, b.get("type").and_then(Value::as_str).unwrap_or("")) {
            (_, "text") => text.push(b.get("text").and_then(Value::as_str).unwrap_or("").to_string()),
            ("user", "tool_result") => {
                let Some(id) = b.get("tool_use_id").and_then(Value::as_str) else {
                    return Err(bad("messages", format!("{at}: a tool_result needs `tool_use_id`.")));
                };
                let mut result = text_of(b.get("content").unwrap_or(&Value::Null), &format!("{at}.content"))?;
                if b.get("is_error") == Some(&Value::Bool(true)) {
                    result = format!("Error: {result}");
                }
                out.push(json!({"role": "tool", "tool_call_id": id, "content": result}));
            }
            ("assistant", "tool_use") => {
                let (Some(id), Some(name)) = (
                    b.get("id").and_then(Value::as_str),
                    b.get("name").and_then(Value::as_str),
                ) else {
                    return Err(bad("messages", format!("{at}: a tool_use needs `id` and `name`.")));
                };
                let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                calls.push(json!({"id": id, "type": "function", "function": {"name": name, "arguments": input.to_string()}}));
            }
            ("assistant", "thinking") => {
                thinking.push(b.get("thinking").and_then(Value::as_str).unwrap_or("").to_string())
            }
            ("assistant", "redacted_thinking") => {}
            (_, kind) => {
                return Err(bad(
                    "messages",
                    format!("{at}: `{kind}` blocks are not supported in {role} messages (text, tool_use, tool_result and thinking are)."),
                ))
            }
        }
    }
    if role == "assistant" {
        let mut msg = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text.join("")) }});
        if !calls.is_empty() {
            msg["tool_calls"] = json!(calls);
        }
        if !thinking.is_empty() {
            msg["reasoning_content"] = json!(thinking.join("\n"));
        }
        out.push(msg);
    } else if !text.is_empty() {
        out.push(json!({"role": "user", "content": text.join("\n")}));
    }
    Ok(())
}

/// Anthropic tools as chat function tools; server tools (`web_search_…`, `bash_…`,
/// `text_editor_…`, `computer_…`, `code_execution_…`) are a 400 naming them.
fn chat_tools(tools: &Value) -> Result<Value, ApiError> {
    let Some(list) = tools.as_array() else {
        return Err(bad("tools", "`tools` must be a list."));
    };
    let mut out = Vec::new();
    for (i, t) in list.iter().enumerate() {
        if let Some(kind) = t
            .get("type")
            .and_then(Value::as_str)
            .filter(|k| *k != "custom")
        {
            return Err(bad(
                "tools",
                format!("tools[{i}]: `{kind}` is a server tool spindle cannot run; only custom tools (name, input_schema) are supported."),
            ));
        }
        let Some(name) = t.get("name").and_then(Value::as_str) else {
            return Err(bad("tools", format!("tools[{i}] needs a `name`.")));
        };
        let mut f = json!({"name": name, "parameters": t.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"}))});
        if let Some(d) = t.get("description").filter(|d| d.is_string()) {
            f["description"] = d.clone();
        }
        out.push(json!({"type": "function", "function": f}));
    }
    Ok(Value::Array(out))
}

/// `tool_choice` as chat's, and whether parallel calls are off.
fn chat_tool_choice(choice: &Value) -> Result<(Value, bool), ApiError> {
    let parallel_off = choice.get("disable_parallel_tool_use") == Some(&Value::Bool(true));
    let c = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => match choice.get("name").and_then(Value::as_str) {
            Some(n) => json!({"type": "function", "function": {"name": n}}),
            None => {
                return Err(bad(
                    "tool_choice",
                    "`tool_choice` of type tool needs a `name`.",
                ))
            }
        },
        _ => {
            return Err(bad(
                "tool_choice",
                "`tool_choice.type` must be auto, any, tool or none.",
            ))
        }
    };
    Ok((c, parallel_off))
}

/// The chat request for a Messages request. `count_only`: for `count_tokens` (no
/// `max_tokens` needed, nothing generated).
pub fn chat_request(req: &MessagesRequest, count_only: bool) -> Result<Value, ApiError> {
    let mut messages = Vec::new();
    if let Some(system) = req.system.as_ref().filter(|s| !s.is_null()) {
        messages.push(
            json!({"role": "system", "content": text_of(system, "system").map_err(|mut e| {
            e.param = Some("system".into());
            e
        })?}),
        );
    }
    let Some(list) = req.messages.as_ref().and_then(Value::as_array) else {
        return Err(bad(
            "messages",
            "`messages` is required: a list of messages.",
        ));
    };
    for (i, m) in list.iter().enumerate() {
        chat_messages(i, m, &mut messages)?;
    }
    let mut body = json!({"messages": messages});
    if let Some(m) = &req.model {
        body["model"] = json!(m);
    }
    if !count_only {
        match req.max_tokens {
            Some(n) => body["max_tokens"] = json!(n),
            None => return Err(bad("max_tokens", "`max_tokens` is required.")),
        }
    }
    if let Some(t) = req
        .tools
        .as_ref()
        .filter(|t| t.as_array().is_none_or(|a| !a.is_empty()))
    {
        body["tools"] = chat_tools(t)?;
        if let Some(c) = &req.tool_choice {
            let (choice, parallel_off) = chat_tool_choice(c)?;
            body["tool_choice"] = choice;
            if parallel_off {
                body["parallel_tool_calls"] = json!(false);
            }
        } else if !count_only {
            body["tool_choice"] = json!("auto");
        }
    }
    if let Some(stop) = req.stop_sequences.as_ref().filter(|s| !s.is_null()) {
        body["stop"] = stop.clone();
    }
    for (k, v) in [
        ("temperature", &req.temperature),
        ("top_p", &req.top_p),
        ("top_k", &req.top_k),
    ] {
        if let Some(v) = v.as_ref().filter(|v| !v.is_null()) {
            body[k] = v.clone();
        }
    }
    if let Some(t) = req.thinking.as_ref().filter(|t| !t.is_null()) {
        let enable = match t.get("type").and_then(Value::as_str) {
            Some("enabled") => true,
            Some("disabled") => false,
            _ => {
                return Err(bad(
                    "thinking",
                    "`thinking.type` must be enabled or disabled.",
                ))
            }
        };
        body["chat_template_kwargs"] = json!({"enable_thinking": enable});
        body["include_reasoning"] = json!(enable);
    }
    if req.stream == Some(true) && !count_only {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true, "continuous_usage_stats": true});
    }
    Ok(body)
}

/// A new id: `prefix` then 24 hex digits.
pub fn new_id(prefix: &str) -> String {
    use rand::Rng;
    format!("{prefix}_{:024x}", rand::rng().random::<u128>() >> 32)
}

/// Anthropic's `stop_reason` (and `stop_sequence`) of a chat choice's finish.
pub fn stop_reason(finish_reason: &Value, stop_reason: &Value) -> (&'static str, Value) {
    match finish_reason.as_str() {
        Some("length") => ("max_tokens", Value::Null),
        Some("tool_calls") => ("tool_use", Value::Null),
        Some("stop") if stop_reason.is_string() => ("stop_sequence", stop_reason.clone()),
        _ => ("end_turn", Value::Null),
    }
}

/// The content blocks of a chat choice's message.
pub fn content_blocks(message: &Value) -> Vec<Value> {
    let mut blocks = Vec::new();
    if let Some(r) = message.get("reasoning_content").and_then(Value::as_str) {
        blocks.push(json!({"type": "thinking", "thinking": r, "signature": ""}));
    }
    let calls = message["tool_calls"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if let Some(t) = message.get("content").and_then(Value::as_str) {
        if !t.is_empty() || calls.is_empty() {
            blocks.push(json!({"type": "text", "text": t}));
        }
    }
    for c in calls {
        let input: Value = c["function"]["arguments"]
            .as_str()
            .and_then(|a| serde_json::from_str(a).ok())
            .unwrap_or_else(|| json!({}));
        blocks.push(json!({"type": "tool_use", "id": c["id"], "name": c["function"]["name"], "input": input}));
    }
    blocks
}

/// Anthropic's `usage` from a chat `usage`.
pub fn usage(u: &Value) -> Value {
    json!({"input_tokens": u["prompt_tokens"].as_u64().unwrap_or(0),
           "output_tokens": u["completion_tokens"].as_u64().unwrap_or(0),
           "cache_read_input_tokens": u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0),
           "cache_creation_input_tokens": 0})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> MessagesRequest {
        serde_json::from_value(v).expect("request")
    }

    #[test]
    fn blocks_become_chat_messages() {
        let r = req(json!({
            "model": "m", "max_tokens": 64, "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "Use the tool.", "signature": "x"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
                    {"type": "text", "text": "Thanks."}]}
            ],
            "tools": [{"name": "get_weather", "description": "d", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "stop_sequences": ["END"], "top_k": 5, "thinking": {"type": "enabled", "budget_tokens": 1024},
            "stream": true
        }));
        let body = chat_request(&r, false).expect("converts");
        let m = body["messages"].as_array().expect("messages");
        assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(
            m[2]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Paris\"}"
        );
        assert_eq!(m[2]["reasoning_content"], "Use the tool.");
        assert_eq!(
            m[3],
            json!({"role": "tool", "tool_call_id": "toolu_1", "content": "18C"})
        );
        assert_eq!(m[4], json!({"role": "user", "content": "Thanks."}));
        assert_eq!(body["tool_choice"], "required");
        assert_eq!(body["parallel_tool_calls"], false);
        assert_eq!(
            body["tools"][0]["function"]["parameters"],
            json!({"type": "object"})
        );
        assert_eq!(body["stop"], json!(["END"]));
        assert_eq!(body["chat_template_kwargs"]["enable_thinking"], true);
        assert_eq!(body["stream_options"]["continuous_usage_stats"], true);
    }

    #[test]
    fn bad_requests_name_their_field() {
        let ok = json!([{"role": "user", "content": "x"}]);
        for (body, param) in [
            (json!({"messages": ok}), "max_tokens"),
            (json!({"max_tokens": 5}), "messages"),
            (
                json!({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
                "messages",
            ),
            (
                json!({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}),
                "messages",
            ),
            (
                json!({"max_tokens": 5, "messages": ok, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
                "tools",
            ),
            (
                json!({"max_tokens": 5, "messages": ok, "tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": "some"}}),
                "tool_choice",
            ),
            (
                json!({"max_tokens": 5, "messages": ok, "thinking": {"type": "maybe"}}),
                "thinking",
            ),
            (
                json!({"max_tokens": 5, "messages": ok, "system": [{"type": "image"}]}),
                "system",
            ),
        ] {
            let e = chat_request(&req(body.clone()), false).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
        assert!(
            chat_request(&req(json!({"messages": ok})), true).is_ok(),
            "count_tokens needs no max_tokens"
        );
    }

    #[test]
    fn a_chat_answer_becomes_blocks() {
        let message = json!({"content": "", "reasoning_content": "hmm",
            "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{\"a\":1}"}}]});
        let blocks = content_blocks(&message);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0]["type"], "thinking");
        assert_eq!(blocks[1]["input"], json!({"a": 1}));
        assert_eq!(
            stop_reason(&json!("tool_calls"), &Value::Null).0,
            "tool_use"
        );
        assert_eq!(
            stop_reason(&json!("stop"), &json!("END")),
            ("stop_sequence", json!("END"))
        );
        assert_eq!(stop_reason(&json!("length"), &Value::Null).0, "max_tokens");
        assert_eq!(stop_reason(&json!("stop"), &json!(2)).0, "end_turn");
    }
}
