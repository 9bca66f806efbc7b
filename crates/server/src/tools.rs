//! Tool calling by constrained decoding: `tool_choice: "required"` and a named tool work with
//! any model, because the output is constrained to a valid call. For a named tool the output is
//! that tool's arguments object (its `parameters` schema); for `required` it is a JSON array of
//! `{"name", "parameters"}` objects, one of the declared tools each, at least one call, at most
//! one when `parallel_tool_calls` is false. The generated JSON is then turned into OpenAI
//! `tool_calls`. `tool_choice: "auto"` (model-initiated calls parsed from text) is not handled
//! here: tools are passed to the chat template and the answer stays text.

use rand::Rng;
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

/// How the answer must call tools.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolMode {
    /// At least one call of any declared tool (at most one unless `parallel`).
    Required { tools: Vec<Tool>, parallel: bool },
    /// Exactly one call of this tool.
    Named(Tool),
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

/// The tool mode a chat request asks for, if calls are forced (`required` or a named tool).
pub fn tool_mode(req: &ChatCompletionRequest) -> Result<Option<ToolMode>, ApiError> {
    let tools = match &req.tools {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_tools(v)?),
    };
    let choice = req.tool_choice.as_ref().filter(|v| !v.is_null());
    let mode = match (choice, tools) {
        (None, _) => None,
        (Some(Value::String(s)), _) if s == "none" => None,
        (Some(Value::String(s)), _) if s == "auto" => None,
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
    if mode.is_some() {
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

impl ToolMode {
    /// The constraint that makes the output a valid call (or calls).
    pub fn constraint(&self) -> ConstraintSpec {
        let schema = match self {
            ToolMode::Named(t) => t.parameters.clone(),
            ToolMode::Required { tools, parallel } => {
                let calls: Vec<Value> = tools
                    .iter()
                    .map(|t| {
                        json!({"type": "object", "additionalProperties": false,
                               "properties": {"name": {"const": t.name}, "parameters": t.parameters},
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
        ConstraintSpec::JsonSchema {
            schema,
            whitespace: Whitespace::Compact,
        }
    }

    /// The calls in a finished output, or `None` when it is not a complete call (e.g. cut by
    /// `max_tokens`).
    pub fn parse_calls(&self, text: &str) -> Option<Vec<ToolCallOut>> {
        let value: Value = serde_json::from_str(text).ok()?;
        let id = || format!("chatcmpl-tool-{:032x}", rand::rng().random::<u128>());
        match self {
            ToolMode::Named(t) => Some(vec![ToolCallOut {
                id: id(),
                name: t.name.clone(),
                arguments: serde_json::to_string(&value).ok()?,
            }]),
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

    fn weather() -> Value {
        json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "get_time"}}
        ])
    }

    #[test]
    fn modes() {
        assert_eq!(tool_mode(&req(json!({"tools": weather()}))).unwrap(), None);
        assert_eq!(
            tool_mode(&req(json!({"tools": weather(), "tool_choice": "auto"}))).unwrap(),
            None
        );
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
}
