//! The Responses API in terms of chat completions: a request (its input items, instructions,
//! function tools, `text.format`, `reasoning`) becomes a chat request the existing pipeline
//! validates and runs, and a finished chat choice becomes the response's output items
//! (`reasoning`, `message`, `function_call`). One generation path serves both APIs.

use serde_json::{json, Map, Value};

use crate::error::ApiError;

/// `POST /v1/responses`: the fields spindle reads (others are refused or ignored in
/// [`check_fields`]).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct ResponsesRequest {
    pub model: Option<String>,
    pub input: Option<Value>,
    pub instructions: Option<String>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub text: Option<Value>,
    pub reasoning: Option<Value>,
    pub max_output_tokens: Option<i64>,
    pub temperature: Option<Value>,
    pub top_p: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub stream: Option<bool>,
    pub store: Option<bool>,
    pub previous_response_id: Option<String>,
    pub metadata: Option<Value>,
    pub background: Option<bool>,
    pub truncation: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_param(param, message)
}

/// Fields that ask for what spindle does not do are 400s naming them; fields that cannot
/// change the output are ignored (`user`, `safety_identifier`, `prompt_cache_key`,
/// `service_tier`, `include`, `stream_options`).
pub fn check_fields(req: &ResponsesRequest) -> Result<(), ApiError> {
    if req.background == Some(true) {
        if req.store == Some(false) {
            return Err(bad(
                "background",
                "`background: true` needs `store` (it is polled by id).",
            ));
        }
        if req.stream == Some(true) {
            return Err(bad(
                "background",
                "`background: true` with `stream: true` is not supported; poll the response instead.",
            ));
        }
    }
    if let Some(t) = req.truncation.as_deref().filter(|t| *t != "disabled") {
        return Err(bad(
            "truncation",
            format!("`truncation: \"{t}\"` is not supported; only \"disabled\" (a prompt over the context is a 400)."),
        ));
    }
    for (name, why) in [
        (
            "conversation",
            "conversations are not stored; use `previous_response_id`",
        ),
        ("prompt", "stored prompt templates are not supported"),
        (
            "max_tool_calls",
            "built-in tools are not supported, so there is nothing to cap",
        ),
    ] {
        if req.other.get(name).is_some_and(|v| !v.is_null()) {
            return Err(bad(name, format!("`{name}` is not supported: {why}.")));
        }
    }
    for name in req.other.keys() {
        if !IGNORED.contains(&name.as_str()) {
            tracing::warn!(field = %name, "unknown /v1/responses field ignored");
        }
    }
    Ok(())
}

const IGNORED: [&str; 7] = [
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
    "include",
    "stream_options",
    "store",
];

/// The text of a message's `content`: a string, or `input_text` / `output_text` / `text`
/// parts (other parts, images and files, are refused: text-only models).
fn content_text(content: &Value, at: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                match (kind, p.get("text").and_then(Value::as_str)) {
                    ("input_text" | "output_text" | "text", Some(t)) => out.push_str(t),
                    ("refusal", _) => {
                        out.push_str(p.get("refusal").and_then(Value::as_str).unwrap_or(""))
                    }
                    _ => {
                        return Err(bad(
                            "input",
                            format!("{at}.content[{j}]: parts of type `{kind}` are not supported (text-only models)."),
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(bad(
            "input",
            format!("{at}.content must be a string or a list of parts."),
        )),
    }
}

/// Chat messages of input items (or an input string), appended to `messages`.
pub fn input_messages(input: &Value, messages: &mut Vec<Value>) -> Result<(), ApiError> {
    let items = match input {
        Value::String(s) => {
            messages.push(json!({"role": "user", "content": s}));
            return Ok(());
        }
        Value::Array(items) => items,
        _ => {
            return Err(bad(
                "input",
                "`input` must be a string or a list of input items.",
            ))
        }
    };
    // Reasoning items go with the assistant message that follows them.
    let mut reasoning: Option<String> = None;
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        match kind {
            "message" => {
                let role = match item.get("role").and_then(Value::as_str) {
                    Some("developer") => "system",
                    Some(r @ ("user" | "assistant" | "system")) => r,
                    _ => {
                        return Err(bad(
                            "input",
                            format!("{at}.role must be user, assistant, system or developer."),
                        ))
                    }
                };
                let content = item.get("content").unwrap_or(&Value::Null);
                let mut m = json!({"role": role, "content": content_text(content, &at)?});
                if role == "assistant" {
                    if let Some(r) = reasoning.take() {
                        m["reasoning_content"] = json!(r);
                    }
                }
                messages.push(m);
            }
            "function_call" => {
                let (Some(call_id), Some(name)) = (
                    item.get("call_id").and_then(Value::as_str),
                    item.get("name").and_then(Value::as_str),
                ) else {
                    return Err(bad("input", format!("{at}: a function_call needs `call_id` and `name`.")));
                };
                let arguments = item.get("arguments").and_then(Value::as_str).unwrap_or("{}");
                let call = json!({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}});
                // Consecutive calls are one assistant turn.
                match messages.last_mut() {
                    Some(last)
                        if last["role"] == "assistant"
                            && last["content"].is_null()
                            && last["tool_calls"].is_array() =>
                    {
                        if let Some(calls) = last["tool_calls"].as_array_mut() {
                            calls.push(call);
                        }
                    }
                    _ => {
                        let mut m = json!({"role": "assistant", "content": null, "tool_calls": [call]});
                        if let Some(r) = reasoning.take() {
                            m["reasoning_content"] = json!(r);
                        }
                        messages.push(m);
                    }
                }
            }
            "function_call_output" => {
                let Some(call_id) = item.get("call_id").and_then(Value::as_str) else {
                    return Err(bad("input", format!("{at}: a function_call_output needs `call_id`.")));
                };
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v @ Value::Array(_)) => content_text(v, &at)?,
                    Some(v) => v.to_string(),
                    None => String::new(),
                };
                messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
            }
            "reasoning" => {
                let text: String = ["content", "summary"]
                    .iter()
                    .filter_map(|k| item.get(*k).and_then(Value::as_array))
                    .flatten()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("\n");
                reasoning = Some(text);
            }
            other => {
                return Err(bad(
                    "input",
                    format!("{at}: items of type `{other}` are not supported (messages, function_call, function_call_output and reasoning are)."),
                ))
            }
        }
    }
    Ok(())
}

/// Responses function tools as chat tools; built-in (hosted) tools are a 400 naming them.
fn chat_tools(tools: &Value) -> Result<Value, ApiError> {
    let Some(list) = tools.as_array() else {
        return Err(bad("tools", "`tools` must be a list of tool objects."));
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        match t.get("type").and_then(Value::as_str) {
            Some("function") => {
                let mut f = Map::new();
                for k in ["name", "description", "parameters", "strict"] {
                    if let Some(v) = t.get(k).filter(|v| !v.is_null()) {
                        f.insert(k.to_string(), v.clone());
                    }
                }
                out.push(json!({"type": "function", "function": f}));
            }
            Some(other) => {
                return Err(bad(
                    "tools",
                    format!("tools[{i}]: `{other}` is a hosted tool spindle cannot run; only `function` tools are supported."),
                ))
            }
            None => return Err(bad("tools", format!("tools[{i}] has no `type`."))),
        }
    }
    Ok(Value::Array(out))
}

fn chat_tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(_) => Ok(choice.clone()),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o.get("name").cloned().unwrap_or(Value::Null);
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        _ => Err(bad(
            "tool_choice",
            "`tool_choice` must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"name\": ...}; hosted tools are not supported.",
        )),
    }
}

/// `text.format` as the chat `response_format`.
fn response_format(text: &Value) -> Result<Option<Value>, ApiError> {
    let Some(format) = text.get("format").filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Map::new();
            for k in ["name", "schema", "strict", "description"] {
                if let Some(v) = format.get(k).filter(|v| !v.is_null()) {
                    schema.insert(k.to_string(), v.clone());
                }
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        _ => Err(bad(
            "text.format",
            "`text.format.type` must be text, json_object or json_schema.",
        )),
    }
}

/// The chat request that runs this response: `history` (a previous response's conversation,
/// instructions not carried over) then the request's instructions and input.
pub fn chat_request(
    req: &ResponsesRequest,
    history: Vec<Value>,
) -> Result<(Value, Vec<Value>), ApiError> {
    let mut conversation = history;
    let Some(input) = req.input.as_ref() else {
        return Err(bad("input", "`input` is required."));
    };
    input_messages(input, &mut conversation)?;
    let mut messages = Vec::with_capacity(conversation.len() + 1);
    if let Some(i) = req.instructions.as_ref().filter(|i| !i.is_empty()) {
        messages.push(json!({"role": "system", "content": i}));
    }
    messages.extend(conversation.iter().cloned());
    let mut body = json!({"messages": messages});
    let set = |body: &mut Value, k: &str, v: Value| {
        body[k] = v;
    };
    if let Some(m) = &req.model {
        set(&mut body, "model", json!(m));
    }
    // An empty tool list (the Agents SDK sends one) means no tools, and then "auto" or
    // "none" mean nothing either.
    let tools = req
        .tools
        .as_ref()
        .filter(|t| t.as_array().is_none_or(|a| !a.is_empty()));
    if let Some(t) = tools {
        set(&mut body, "tools", chat_tools(t)?);
    }
    let idle_choice = |c: &Value| tools.is_none() && (c == "auto" || c == "none");
    if let Some(c) = req
        .tool_choice
        .as_ref()
        .filter(|c| !c.is_null() && !idle_choice(c))
    {
        set(&mut body, "tool_choice", chat_tool_choice(c)?);
    }
    if let Some(p) = req.parallel_tool_calls {
        set(&mut body, "parallel_tool_calls", json!(p));
    }
    if let Some(f) = req
        .text
        .as_ref()
        .map(response_format)
        .transpose()?
        .flatten()
    {
        set(&mut body, "response_format", f);
    }
    if let Some(effort) = req
        .reasoning
        .as_ref()
        .and_then(|r| r.get("effort"))
        .filter(|e| !e.is_null())
    {
        set(&mut body, "reasoning_effort", effort.clone());
    }
    if let Some(n) = req.max_output_tokens {
        set(&mut body, "max_completion_tokens", json!(n));
    }
    for (k, v) in [("temperature", &req.temperature), ("top_p", &req.top_p)] {
        if let Some(v) = v.as_ref().filter(|v| !v.is_null()) {
            set(&mut body, k, v.clone());
        }
    }
    if let Some(k) = req.top_logprobs.as_ref().filter(|v| !v.is_null()) {
        set(&mut body, "logprobs", json!(true));
        set(&mut body, "top_logprobs", k.clone());
    }
    if req.stream == Some(true) {
        set(&mut body, "stream", json!(true));
        set(&mut body, "stream_options", json!({"include_usage": true}));
    }
    Ok((body, conversation))
}

/// A new item id: `prefix` then 32 hex digits.
pub fn item_id(prefix: &str) -> String {
    use rand::Rng;
    format!("{prefix}_{:032x}", rand::rng().random::<u128>())
}

/// The output items of a finished chat choice (`message` of a chat completion).
pub fn output_items(message: &Value, status: Status) -> Vec<Value> {
    let mut items = Vec::new();
    if let Some(r) = message.get("reasoning_content").and_then(Value::as_str) {
        items.push(reasoning_item(&item_id("rs"), r));
    }
    if let Some(t) = message.get("content").and_then(Value::as_str) {
        if !t.is_empty() || message["tool_calls"].as_array().is_none_or(Vec::is_empty) {
            items.push(message_item(&item_id("msg"), t, status.item_status()));
        }
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        items.push(function_call_item(
            &item_id("fc"),
            call["id"].as_str().unwrap_or_default(),
            call["function"]["name"].as_str().unwrap_or_default(),
            call["function"]["arguments"].as_str().unwrap_or("{}"),
            "completed",
        ));
    }
    items
}

pub fn reasoning_item(id: &str, text: &str) -> Value {
    json!({"type": "reasoning", "id": id, "summary": [],
           "content": [{"type": "reasoning_text", "text": text}]})
}

pub fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
           "content": [output_text(text)]})
}

pub fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

pub fn function_call_item(
    id: &str,
    call_id: &str,
    name: &str,
    arguments: &str,
    status: &str,
) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
           "arguments": arguments, "status": status})
}

/// The chat messages a response's output items add to its conversation (for
/// `previous_response_id`).
pub fn output_messages(output: &[Value]) -> Result<Vec<Value>, ApiError> {
    let mut messages = Vec::new();
    input_messages(&Value::Array(output.to_vec()), &mut messages)?;
    Ok(messages)
}

/// Everything a response object repeats of its request.
pub struct Echo {
    pub model: String,
    pub instructions: Option<String>,
    pub tools: Value,
    pub tool_choice: Value,
    pub text: Value,
    pub reasoning: Value,
    pub max_output_tokens: Option<i64>,
    pub temperature: Value,
    pub top_p: Value,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<String>,
    pub store: bool,
    pub metadata: Value,
    pub background: bool,
}

impl Echo {
    pub fn of(req: &ResponsesRequest, model: String) -> Self {
        Self {
            model,
            instructions: req.instructions.clone(),
            tools: req.tools.clone().unwrap_or_else(|| json!([])),
            tool_choice: req.tool_choice.clone().unwrap_or_else(|| json!("auto")),
            text: req
                .text
                .clone()
                .unwrap_or_else(|| json!({"format": {"type": "text"}})),
            reasoning: req
                .reasoning
                .clone()
                .unwrap_or_else(|| json!({"effort": null, "summary": null})),
            max_output_tokens: req.max_output_tokens,
            temperature: req.temperature.clone().unwrap_or(json!(1.0)),
            top_p: req.top_p.clone().unwrap_or(json!(1.0)),
            parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
            previous_response_id: req.previous_response_id.clone(),
            store: req.store.unwrap_or(true),
            metadata: req.metadata.clone().unwrap_or_else(|| json!({})),
            background: req.background.unwrap_or(false),
        }
    }
}

/// What the response says of how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// A background response not started yet.
    Queued,
    InProgress,
    Completed,
    /// Cut by `max_output_tokens`.
    Incomplete,
}

impl Status {
    /// The `status` of the response's message item.
    pub fn item_status(self) -> &'static str {
        match self {
            Status::Incomplete => "incomplete",
            _ => "completed",
        }
    }
}

/// `response` failed with `message`.
pub fn failed(mut response: Value, message: Value) -> Value {
    response["status"] = json!("failed");
    response["error"] = json!({"code": "server_error", "message": message});
    response
}

/// The response object.
pub fn response_object(
    id: &str,
    created_at: u64,
    echo: &Echo,
    status: Status,
    output: &[Value],
    usage: Option<&Value>,
) -> Value {
    let (status, incomplete) = match status {
        Status::Queued => ("queued", Value::Null),
        Status::InProgress => ("in_progress", Value::Null),
        Status::Completed => ("completed", Value::Null),
        Status::Incomplete => ("incomplete", json!({"reason": "max_output_tokens"})),
    };
    let output_text: String = output
        .iter()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().into_iter().flatten())
        .filter_map(|p| p["text"].as_str())
        .collect();
    let usage = usage.map(|u| {
        let input = u["prompt_tokens"].as_u64().unwrap_or(0);
        let output_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
        json!({"input_tokens": input,
               "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0)},
               "output_tokens": output_tokens,
               "output_tokens_details": {"reasoning_tokens": 0},
               "total_tokens": input + output_tokens})
    });
    json!({
        "id": id, "object": "response", "created_at": created_at, "status": status,
        "error": null, "incomplete_details": incomplete,
        "instructions": echo.instructions, "max_output_tokens": echo.max_output_tokens,
        "model": echo.model, "output": output, "output_text": output_text,
        "parallel_tool_calls": echo.parallel_tool_calls,
        "previous_response_id": echo.previous_response_id,
        "reasoning": echo.reasoning, "store": echo.store,
        "temperature": echo.temperature, "text": echo.text, "tool_choice": echo.tool_choice,
        "tools": echo.tools, "top_p": echo.top_p, "truncation": "disabled",
        "usage": usage, "metadata": echo.metadata, "background": echo.background,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> ResponsesRequest {
        serde_json::from_value(v).expect("request")
    }

    #[test]
    fn items_become_chat_messages() {
        let r = req(json!({
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": "Weather in Paris?"},
                {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Call the tool."}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "18C"},
                {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Answer now."}]}
            ],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": true}},
            "reasoning": {"effort": "low"},
            "max_output_tokens": 50,
            "stream": true
        }));
        let (body, conversation) = chat_request(&r, Vec::new()).expect("converts");
        let m = body["messages"].as_array().expect("messages");
        assert_eq!(m[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(m[2]["tool_calls"].as_array().map(Vec::len), Some(2));
        assert_eq!(m[2]["reasoning_content"], "Call the tool.");
        assert_eq!(
            m[3],
            json!({"role": "tool", "tool_call_id": "c1", "content": "18C"})
        );
        assert_eq!(m[4]["role"], "system");
        assert_eq!(
            conversation.len(),
            m.len() - 1,
            "instructions are not history"
        );
        assert_eq!(body["tools"][0]["function"]["name"], "get_weather");
        assert_eq!(body["tool_choice"]["function"]["name"], "get_weather");
        assert_eq!(body["response_format"]["json_schema"]["name"], "w");
        assert_eq!(body["reasoning_effort"], "low");
        assert_eq!(body["max_completion_tokens"], 50);
        assert_eq!(body["stream_options"]["include_usage"], true);
    }

    #[test]
    fn unsupported_inputs_name_their_field() {
        let cases = [
            (json!({"input": 3}), "input"),
            (json!({}), "input"),
            (
                json!({"input": [{"type": "input_image", "image_url": "x"}]}),
                "input",
            ),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
                "input",
            ),
            (
                json!({"input": "x", "tools": [{"type": "web_search"}]}),
                "tools",
            ),
            (
                json!({"input": "x", "tool_choice": {"type": "file_search"}}),
                "tool_choice",
            ),
            (
                json!({"input": "x", "text": {"format": {"type": "yaml"}}}),
                "text.format",
            ),
            (
                json!({"input": "x", "tools": {"type": "function"}}),
                "tools",
            ),
        ];
        for (body, param) in cases {
            let e = chat_request(&req(body.clone()), Vec::new()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
        for (body, param) in [
            (
                json!({"input": "x", "background": true, "store": false}),
                "background",
            ),
            (
                json!({"input": "x", "background": true, "stream": true}),
                "background",
            ),
            (json!({"input": "x", "truncation": "auto"}), "truncation"),
            (
                json!({"input": "x", "conversation": "conv_1"}),
                "conversation",
            ),
        ] {
            let e = check_fields(&req(body.clone())).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
        assert!(check_fields(&req(
            json!({"input": "x", "user": "u", "truncation": "disabled"})
        ))
        .is_ok());
    }

    /// The Agents SDK sends `tools: []` (and may send `tool_choice: "auto"`) without tools.
    #[test]
    fn an_empty_tool_list_is_no_tools() {
        let r = req(json!({"input": "x", "tools": [], "tool_choice": "auto"}));
        let (body, _) = chat_request(&r, Vec::new()).expect("converts");
        assert!(
            body.get("tools").is_none() && body.get("tool_choice").is_none(),
            "{body}"
        );
    }

    #[test]
    fn a_chat_answer_becomes_output_items() {
        let message = json!({"role": "assistant", "content": "Hi", "reasoning_content": "think",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]});
        let items = output_items(&message, Status::Completed);
        let kinds: Vec<&str> = items.iter().filter_map(|i| i["type"].as_str()).collect();
        assert_eq!(kinds, ["reasoning", "message", "function_call"]);
        assert_eq!(items[2]["call_id"], "call_1");
        // Back into a conversation: the reasoning rides on the assistant turn.
        let msgs = output_messages(&items).expect("messages");
        assert_eq!(msgs[0]["reasoning_content"], "think");
        let echo = Echo::of(&req(json!({"input": "x"})), "m".into());
        let usage = json!({"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1}});
        let r = response_object("resp_1", 7, &echo, Status::Incomplete, &items, Some(&usage));
        assert_eq!(r["output_text"], "Hi");
        assert_eq!(r["usage"]["total_tokens"], 7);
        assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
    }
}
