//! Tool calling by constrained decoding: `tool_choice: "required"` and a named tool work with
//! any model, because the output is constrained to a valid call. For a named tool the output is
//! that tool's arguments object (its `parameters` schema); for `required` it is a JSON array of
//! `{"name", "parameters"}` objects, one of the declared tools each, at least one call, at most
//! one when `parallel_tool_calls` is false. The generated JSON is then turned into OpenAI
//! `tool_calls`.
//!
//! `tool_choice: "auto"` (the default when `tools` are given, as in vLLM) needs the server's
//! `--enable-auto-tool-choice --tool-call-parser NAME`: the model decides, and its text is
//! parsed ([`ToolParser`]); without the flags it is a 400 naming them.

use serde_json::{json, Value};
use spindle_structured::{ConstraintSpec, Whitespace};

use crate::error::ApiError;
use crate::protocol::ChatCompletionRequest;

/// One declared function.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    /// JSON schema of the arguments (an empty object schema when the tool declares none).
    pub parameters: Value,
}

pub use crate::tool_formats::ToolParser;

/// How the answer must call tools.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolMode {
    /// At least one call of any declared tool (at most one unless `parallel`).
    Required { tools: Vec<Tool>, parallel: bool },
    /// Exactly one call of this tool.
    Named(Tool),
    /// The model decides; its text is parsed for calls of declared tools.
    Auto {
        tools: Vec<Tool>,
        parser: ToolParser,
    },
}

/// What a finished answer is, under a tool mode.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedAnswer {
    /// Text before the first call, trimmed (`None` when there is none).
    pub content: Option<String>,
    pub calls: Vec<ToolCallOut>,
    /// Bytes of the raw answer before its first call (all of it when there is no call).
    pub content_end: usize,
}

impl ParsedAnswer {
    /// The part of the content before the calls that a stream has not sent yet, when `sent`
    /// bytes of the raw `answer` went out as content.
    pub fn unsent_content<'a>(&self, answer: &'a str, sent: usize) -> &'a str {
        answer
            .get(sent.min(self.content_end)..self.content_end)
            .unwrap_or("")
    }
}

/// One call as the API returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCallOut {
    pub id: String,
    pub name: String,
    /// The arguments as a JSON string.
    pub arguments: String,
}

impl ToolCallOut {
    /// `{id, type, function: {name, arguments}}`.
    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
    }
}

fn bad(param: &str, m: impl Into<String>) -> ApiError {
    ApiError::invalid_param(param, m)
}

/// Parse `tools`: a non-empty list of `{"type": "function", "function": {"name", "description"?,
/// "parameters"?}}`.
fn parse_tools(v: &Value) -> Result<Vec<Tool>, ApiError> {
    let Some(list) = v.as_array() else {
        return Err(bad("tools", "`tools` must be a list of tool objects."));
    };
    if list.is_empty() {
        return Err(bad(
            "tools",
            "`tools` must not be empty; leave it out instead.",
        ));
    }
    let mut tools = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad(
                "tools",
                format!("tools[{i}].type must be \"function\"."),
            ));
        }
        let Some(f) = t.get("function").and_then(Value::as_object) else {
            return Err(bad(
                "tools",
                format!("tools[{i}].function must be an object."),
            ));
        };
        let name = match f.get("name").and_then(Value::as_str) {
            Some(n)
                if !n.is_empty()
                    && n.len() <= 64
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
            {
                n.to_string()
            }
            _ => {
                return Err(bad(
                    "tools",
                    format!(
                        "tools[{i}].function.name must be 1 to 64 letters, digits, '_' or '-'."
                    ),
                ))
            }
        };
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                return Err(bad(
                    "tools",
                    format!("tools[{i}].function.parameters must be a JSON schema object."),
                ))
            }
        };
        if tools.iter().any(|t: &Tool| t.name == name) {
            return Err(bad(
                "tools",
                format!("Tool name `{name}` is declared twice."),
            ));
        }
        tools.push(Tool { name, parameters });
    }
    Ok(tools)
}

/// The tool mode a chat request asks for: forced calls (`required`, a named tool) or parsed
/// ones (`auto`, with `parser` from the server's flags).
pub fn tool_mode(
    req: &ChatCompletionRequest,
    parser: Option<ToolParser>,
) -> Result<Option<ToolMode>, ApiError> {
    let tools = match &req.tools {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_tools(v)?),
    };
    let choice = req.tool_choice.as_ref().filter(|v| !v.is_null());
    let auto = |tools: Vec<Tool>| {
        match parser {
        Some(parser) => Ok(Some(ToolMode::Auto { tools, parser })),
        None => Err(bad(
            "tool_choice",
            "\"auto\" tool choice requires the server to run with --enable-auto-tool-choice and --tool-call-parser (or send tool_choice \"none\", \"required\" or a named tool).",
        )),
    }
    };
    let mode = match (choice, tools) {
        (None, None) => None,
        (None, Some(tools)) => auto(tools)?,
        (Some(Value::String(s)), _) if s == "none" => None,
        (Some(Value::String(s)), None) if s == "auto" => None,
        (Some(Value::String(s)), Some(tools)) if s == "auto" => auto(tools)?,
        (Some(_), None) => {
            return Err(bad("tool_choice", "`tool_choice` needs `tools`."));
        }
        (Some(Value::String(s)), Some(tools)) if s == "required" => Some(ToolMode::Required {
            tools,
            parallel: req.parallel_tool_calls.unwrap_or(true),
        }),
        (Some(Value::Object(o)), Some(tools))
            if o.get("type").and_then(Value::as_str) == Some("function") =>
        {
            let Some(name) = o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str)
            else {
                return Err(bad("tool_choice", "`tool_choice.function.name` is required."));
            };
            let Some(tool) = tools.into_iter().find(|t| t.name == name) else {
                return Err(bad("tool_choice", format!("Tool `{name}` named in `tool_choice` is not in `tools`.")));
            };
            Some(ToolMode::Named(tool))
        }
        (Some(_), Some(_)) => {
            return Err(bad(
                "tool_choice",
                "`tool_choice` must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}.",
            ))
        }
    };
    if matches!(mode, Some(ToolMode::Required { .. } | ToolMode::Named(_))) {
        let constrained = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
        let text_format = req
            .common
            .response_format
            .as_ref()
            .and_then(|v| v.get("type"))
            .and_then(Value::as_str)
            .is_none_or(|t| t == "text");
        if constrained(&req.common.structured_outputs) || !text_format {
            return Err(bad(
                "tool_choice",
                "A forced `tool_choice` cannot be combined with `response_format` or `structured_outputs`.",
            ));
        }
    }
    Ok(mode)
}

/// Tool arguments are strict by default, as OpenAI's strict mode and vLLM's default grammar
/// backend treat them: every object schema that does not say otherwise admits no properties
/// beyond those it declares (a tool without parameters takes exactly `{}`; without this a small
/// model stuffs the call envelope into the open object). A schema that sets
/// `additionalProperties` or `patternProperties` keeps its choice.
pub fn strict(mut schema: Value) -> Value {
    close_objects(&mut schema);
    schema
}

fn close_objects(node: &mut Value) {
    let Some(obj) = node.as_object_mut() else {
        if let Some(items) = node.as_array_mut() {
            items.iter_mut().for_each(close_objects);
        }
        return;
    };
    let is_object = obj.get("type").is_some_and(|t| {
        t == "object"
            || t.as_array()
                .is_some_and(|a| a.iter().any(|x| x == "object"))
    }) || obj.contains_key("properties");
    if is_object
        && !obj.contains_key("additionalProperties")
        && !obj.contains_key("patternProperties")
        && !obj.contains_key("unevaluatedProperties")
    {
        obj.insert("additionalProperties".into(), Value::Bool(false));
    }
    for key in ["properties", "$defs", "definitions"] {
        if let Some(Value::Object(children)) = obj.get_mut(key) {
            children.values_mut().for_each(close_objects);
        }
    }
    for key in [
        "items",
        "prefixItems",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "additionalProperties",
    ] {
        if let Some(child) = obj.get_mut(key) {
            close_objects(child);
        }
    }
}

impl ToolMode {
    /// The constraint that makes the output a valid call (or calls); none for `auto`.
    pub fn constraint(&self) -> Option<ConstraintSpec> {
        let schema = match self {
            ToolMode::Auto { .. } => return None,
            ToolMode::Named(t) => strict(t.parameters.clone()),
            ToolMode::Required { tools, parallel } => {
                let calls: Vec<Value> = tools
                    .iter()
                    .map(|t| {
                        json!({"type": "object", "additionalProperties": false,
                               "properties": {"name": {"const": t.name}, "parameters": strict(t.parameters.clone())},
                               "required": ["name", "parameters"]})
                    })
                    .collect();
                let mut array = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}});
                if !parallel {
                    array["maxItems"] = json!(1);
                }
                array
            }
        };
        Some(ConstraintSpec::JsonSchema {
            schema,
            whitespace: Whitespace::Compact,
        })
    }

    /// Streaming: how much of `text` (from its start) is surely content, so it can be sent
    /// before the answer ends. Forced calls are never content; under `auto`, the parser says
    /// ([`ToolParser::content_prefix_len`]).
    pub fn content_prefix_len(&self, text: &str) -> usize {
        match self {
            ToolMode::Auto { parser, .. } => parser.content_prefix_len(text),
            _ => 0,
        }
    }

    /// What a finished answer is: its calls and the text before them. `None` when forced calls
    /// are incomplete (e.g. cut by `max_tokens`); an `auto` answer without a call is content.
    pub fn parse_answer(&self, text: &str) -> Option<ParsedAnswer> {
        match self {
            ToolMode::Auto { tools, parser } => Some(parser.parse_answer(text, tools)),
            _ => self.parse_calls(text).map(|calls| ParsedAnswer {
                content: None,
                calls,
                content_end: 0,
            }),
        }
    }

    /// The calls in a finished output, or `None` when it is not a complete call (e.g. cut by
    /// `max_tokens`).
    pub fn parse_calls(&self, text: &str) -> Option<Vec<ToolCallOut>> {
        let value: Value = serde_json::from_str(text).ok()?;
        let id = crate::tool_formats::call_id;
        match self {
            ToolMode::Named(t) => Some(vec![ToolCallOut {
                id: id(),
                name: t.name.clone(),
                arguments: serde_json::to_string(&value).ok()?,
            }]),
            ToolMode::Auto { .. } => None,
            ToolMode::Required { .. } => value
                .as_array()?
                .iter()
                .map(|c| {
                    Some(ToolCallOut {
                        id: id(),
                        name: c.get("name")?.as_str()?.to_string(),
                        arguments: serde_json::to_string(c.get("parameters")?).ok()?,
                    })
                })
                .collect(),
        }
    }
}

/// Assistant messages carry `tool_calls[].function.arguments` as JSON strings; chat templates
/// expect objects (as vLLM passes them), so decode them before rendering.
pub fn decode_tool_call_arguments(message: &mut serde_json::Map<String, Value>) {
    let Some(Value::Array(calls)) = message.get_mut("tool_calls") else {
        return;
    };
    for call in calls {
        if let Some(args) = call.pointer_mut("/function/arguments") {
            if let Value::String(s) = args {
                if let Ok(v) = serde_json::from_str::<Value>(s) {
                    *args = v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: Value) -> ChatCompletionRequest {
        serde_json::from_value(body).expect("request")
    }

    fn tool_mode(r: &ChatCompletionRequest) -> Result<Option<ToolMode>, ApiError> {
        super::tool_mode(r, None)
    }

    fn weather() -> Value {
        json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "get_time"}}
        ])
    }

    #[test]
    fn modes() {
        assert!(matches!(
            tool_mode(&req(
                json!({"tools": weather(), "tool_choice": "required", "parallel_tool_calls": false})
            ))
            .unwrap(),
            Some(ToolMode::Required {
                parallel: false,
                ..
            })
        ));
        let named = tool_mode(&req(json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "get_time"}}}))).unwrap();
        assert_eq!(
            named,
            Some(ToolMode::Named(Tool {
                name: "get_time".into(),
                parameters: json!({"type": "object", "properties": {}})
            }))
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({"tools": []}), "tools"),
            (json!({"tools": [{"type": "function"}]}), "tools"),
            (
                json!({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}),
                "tools",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}),
                "tools",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "x", "parameters": 3}}]}),
                "tools",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "x"}}, {"type": "function", "function": {"name": "x"}}]}),
                "tools",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "tool_choice",
            ),
            (
                json!({"tools": weather(), "tool_choice": {"type": "function"}}),
                "tool_choice",
            ),
            (
                json!({"tools": weather(), "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (
                json!({"tools": weather(), "tool_choice": "required", "response_format": {"type": "json_object"}}),
                "tool_choice",
            ),
        ];
        for (body, param) in cases {
            let e = tool_mode(&req(body.clone())).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }

    #[test]
    fn outputs_become_calls() {
        let tools = match tool_mode(&req(json!({"tools": weather(), "tool_choice": "required"})))
            .unwrap()
        {
            Some(m) => m,
            None => panic!("mode"),
        };
        let calls = tools
            .parse_calls(r#"[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]"#)
            .expect("calls");
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (calls[0].name.as_str(), calls[0].arguments.as_str()),
            ("get_weather", r#"{"city":"Paris"}"#)
        );
        assert_eq!(calls[1].arguments, "{}");
        assert_ne!(calls[0].id, calls[1].id);
        assert!(tools
            .parse_calls(r#"[{"name": "get_weather", "param"#)
            .is_none());
        let mut msg = json!({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{\"a\": 1}"}}]});
        decode_tool_call_arguments(msg.as_object_mut().expect("object"));
        assert_eq!(
            msg["tool_calls"][0]["function"]["arguments"],
            json!({"a": 1})
        );
    }

    #[test]
    fn auto_needs_the_flags() {
        for body in [
            json!({"tools": weather()}),
            json!({"tools": weather(), "tool_choice": "auto"}),
        ] {
            let e = tool_mode(&req(body.clone())).unwrap_err();
            assert!(
                e.message.contains("--enable-auto-tool-choice"),
                "{}",
                e.message
            );
            let with = super::tool_mode(&req(body), Some(ToolParser::Hermes)).unwrap();
            assert!(matches!(with, Some(ToolMode::Auto { .. })));
        }
        assert_eq!(
            tool_mode(&req(json!({"tools": weather(), "tool_choice": "none"}))).unwrap(),
            None
        );
    }

    fn auto(parser: ToolParser) -> ToolMode {
        match tool_mode(&req(json!({"tools": weather(), "tool_choice": "required"}))).unwrap() {
            Some(ToolMode::Required { tools, .. }) => ToolMode::Auto { tools, parser },
            _ => panic!("tools"),
        }
    }

    #[test]
    fn hermes_answers() {
        let m = auto(ToolParser::Hermes);
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>";
        let p = m.parse_answer(text).unwrap();
        assert_eq!(p.content.as_deref(), Some("Let me check."));
        let calls: Vec<(&str, &str)> = p
            .calls
            .iter()
            .map(|c| (c.name.as_str(), c.arguments.as_str()))
            .collect();
        assert_eq!(
            calls,
            [("get_weather", r#"{"city":"Paris"}"#), ("get_time", "{}")]
        );
        // Bare and fenced JSON naming a declared tool (small Qwen models).
        for text in [
            "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}",
            "```json\n{\n  \"name\": \"get_weather\",\n  \"arguments\": {\"city\": \"Oslo\"}\n}\n```",
        ] {
            let p = m.parse_answer(text).unwrap();
            assert_eq!((p.content, p.calls.len()), (None, 1), "{text}");
        }
        // JSON that does not name a declared tool, plain text, or a broken call stays content.
        for text in [
            "```json\n{\"name\": \"add_numbers\", \"arguments\": {\"a\": 1}}\n```",
            "{\"answer\": 4}",
            "Four.",
            "<tool_call>not json</tool_call>",
        ] {
            let p = m.parse_answer(text).unwrap();
            assert_eq!(
                (p.content.as_deref(), p.calls.len()),
                (Some(text), 0),
                "{text}"
            );
        }
    }

    #[test]
    fn llama3_json_answers() {
        let m = auto(ToolParser::Llama3Json);
        let text = "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\"}}; {\"name\": \"get_time\", \"parameters\": {}}";
        let p = m.parse_answer(text).unwrap();
        assert_eq!(p.calls.len(), 2);
        assert_eq!(p.calls[0].arguments, r#"{"city":"Rome"}"#);
        assert_eq!(m.parse_answer("Hello there").unwrap().calls.len(), 0);
    }

    #[test]
    fn streaming_holds_back_what_may_be_a_call() {
        let m = auto(ToolParser::Hermes);
        assert_eq!(m.content_prefix_len("Hello, world"), 12);
        assert_eq!(m.content_prefix_len("Sure. <tool_call>{"), 6);
        assert_eq!(m.content_prefix_len("Sure. <tool_"), 6);
        assert_eq!(m.content_prefix_len("Code: ``"), 6);
        assert_eq!(m.content_prefix_len("  {\"name\""), 0);
        assert_eq!(m.content_prefix_len(""), 0);
        let forced = ToolMode::Named(Tool {
            name: "f".into(),
            parameters: json!({}),
        });
        assert_eq!(forced.content_prefix_len("anything"), 0);
    }

    #[test]
    fn a_stream_sends_the_rest_of_the_content_before_the_calls() {
        let m = auto(ToolParser::Hermes);
        let answer = "  Hello <tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>";
        let p = m.parse_answer(answer).unwrap();
        assert_eq!(p.content.as_deref(), Some("Hello"));
        // "  Hel" went out before the last delta brought "lo " and the call.
        assert_eq!(p.unsent_content(answer, 5), "lo ");
        assert_eq!(p.unsent_content(answer, 8), "");
        assert_eq!(p.unsent_content(answer, 0), "  Hello ");
        let bare = "{\"name\": \"get_time\", \"arguments\": {}}";
        assert_eq!(m.parse_answer(bare).unwrap().unsent_content(bare, 0), "");
    }

    #[test]
    fn argument_schemas_are_strict_unless_they_say_otherwise() {
        assert_eq!(
            strict(json!({"type": "object", "properties": {}})),
            json!({"type": "object", "properties": {}, "additionalProperties": false})
        );
        let nested = strict(json!({"type": "object", "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "string"}}},
            "list": {"type": "array", "items": {"type": "object"}},
            "open": {"type": "object", "additionalProperties": true},
            "map": {"type": "object", "additionalProperties": {"type": "object", "properties": {}}}
        }}));
        assert_eq!(nested["additionalProperties"], json!(false));
        assert_eq!(
            nested["properties"]["a"]["additionalProperties"],
            json!(false)
        );
        assert_eq!(
            nested["properties"]["list"]["items"]["additionalProperties"],
            json!(false)
        );
        assert_eq!(
            nested["properties"]["open"]["additionalProperties"],
            json!(true)
        );
        assert_eq!(
            nested["properties"]["map"]["additionalProperties"]["additionalProperties"],
            json!(false)
        );
        assert_eq!(strict(json!({"type": "string"})), json!({"type": "string"}));
    }
}
