//! Structured outputs at the API: `response_format` (OpenAI) and `structured_outputs` (vLLM)
//! parsed into one [`ConstraintSpec`] (a 400 naming the field for anything malformed or
//! ambiguous), and compiled on the blocking pool with a time bound, so a hostile schema never
//! stalls the runtime or the engine. Compiled specs are cached by the compiler.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use spindle_structured::{
    Constraint, ConstraintSpec, GrammarCompiler, StructuredError, Whitespace,
};

use crate::error::ApiError;
use crate::protocol::CommonFields;

/// Longest a grammar may take to compile before the request is refused.
pub const COMPILE_TIMEOUT: Duration = Duration::from_secs(10);

/// A constraint and the request field it came from (named by a compile error's 400).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestedConstraint {
    pub spec: ConstraintSpec,
    pub param: &'static str,
}

/// The constraint a request asks for, if any.
pub fn constraint_spec(c: &CommonFields) -> Result<Option<RequestedConstraint>, ApiError> {
    let from_format = response_format(c.response_format.as_ref())?;
    let from_outputs = structured_outputs(c.structured_outputs.as_ref(), "structured_outputs")?;
    let (legacy_param, legacy) = legacy_guided(c);
    let from_legacy = match &legacy {
        Some(obj) => structured_outputs(Some(obj), legacy_param)?,
        None => None,
    };
    let requested = |spec, param| Some(RequestedConstraint { spec, param });
    match (from_format, from_outputs, from_legacy) {
        (Some(spec), None, None) => Ok(requested(spec, "response_format")),
        (None, Some(spec), None) => Ok(requested(spec, "structured_outputs")),
        (None, None, Some(spec)) => Ok(requested(spec, legacy_param)),
        (None, None, None) => Ok(None),
        (_, _, Some(_)) => Err(ApiError::invalid_param(
            legacy_param,
            format!("Give either `{legacy_param}` or `response_format` / `structured_outputs`, not both."),
        )),
        _ => Err(ApiError::invalid_param(
            "structured_outputs",
            "Give either `response_format` or `structured_outputs`, not both.",
        )),
    }
}

/// vLLM's removed `guided_*` fields as a `structured_outputs` object (never silently dropped:
/// vLLM once ignored them and its users got unconstrained output), and the field to name in
/// errors.
fn legacy_guided(c: &CommonFields) -> (&'static str, Option<Value>) {
    let given = |v: &Option<Value>| v.as_ref().filter(|v| !v.is_null()).cloned();
    let mut obj = serde_json::Map::new();
    let mut param = "guided_json";
    for (name, key, value) in [
        ("guided_json", "json", &c.guided_json),
        ("guided_regex", "regex", &c.guided_regex),
        ("guided_choice", "choice", &c.guided_choice),
        ("guided_grammar", "grammar", &c.guided_grammar),
    ] {
        if let Some(v) = given(value) {
            if obj.is_empty() {
                param = name;
            }
            obj.insert(key.to_string(), v);
        }
    }
    if obj.is_empty() {
        return (param, None);
    }
    if let Some(p) = given(&c.guided_whitespace_pattern) {
        obj.insert("whitespace_pattern".to_string(), p);
    }
    (param, Some(Value::Object(obj)))
}

fn response_format(v: Option<&Value>) -> Result<Option<ConstraintSpec>, ApiError> {
    let bad = |m: String| ApiError::invalid_param("response_format", m);
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let Some(obj) = v.as_object() else {
        return Err(bad(
            "`response_format` must be an object with a `type`.".into()
        ));
    };
    match obj.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(ConstraintSpec::JsonObject {
            whitespace: Whitespace::Compact,
        })),
        Some("json_schema") => {
            let Some(js) = obj.get("json_schema").and_then(Value::as_object) else {
                return Err(bad(
                    "`response_format` of type `json_schema` needs a `json_schema` object with a `schema`.".into(),
                ));
            };
            let schema = match js.get("schema") {
                Some(s @ (Value::Object(_) | Value::Bool(_))) => s.clone(),
                Some(_) => {
                    return Err(bad(
                        "`json_schema.schema` must be a JSON schema object.".into()
                    ))
                }
                None => return Err(bad("`json_schema.schema` is required.".into())),
            };
            Ok(Some(ConstraintSpec::JsonSchema {
                schema,
                whitespace: Whitespace::Compact,
            }))
        }
        Some(other) => Err(bad(format!(
            "`response_format.type` must be `text`, `json_object` or `json_schema`, got `{other}`."
        ))),
        None => Err(bad("`response_format.type` is required.".into())),
    }
}

fn structured_outputs(
    v: Option<&Value>,
    param: &'static str,
) -> Result<Option<ConstraintSpec>, ApiError> {
    let bad = |m: String| ApiError::invalid_param(param, m);
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let Some(obj) = v.as_object() else {
        return Err(bad("`structured_outputs` must be an object.".into()));
    };
    const KINDS: [&str; 5] = ["json", "regex", "choice", "grammar", "json_object"];
    const OPTIONS: [&str; 2] = ["disable_any_whitespace", "whitespace_pattern"];
    if let Some(k) = obj
        .keys()
        .find(|k| !KINDS.contains(&k.as_str()) && !OPTIONS.contains(&k.as_str()))
    {
        return Err(bad(format!(
            "Unknown key `{k}` in `structured_outputs` (supported: json, regex, choice, grammar, json_object, disable_any_whitespace, whitespace_pattern)."
        )));
    }
    let given: Vec<&str> = KINDS
        .iter()
        .copied()
        .filter(|k| {
            obj.get(*k)
                .is_some_and(|v| !v.is_null() && *v != Value::Bool(false))
        })
        .collect();
    let whitespace = match (
        obj.get("disable_any_whitespace").and_then(Value::as_bool),
        obj.get("whitespace_pattern"),
    ) {
        (Some(true), Some(p)) if !p.is_null() => {
            return Err(bad(
                "`disable_any_whitespace` and `whitespace_pattern` exclude each other.".into(),
            ))
        }
        (Some(true), _) => Whitespace::None,
        (_, Some(Value::String(p))) => Whitespace::Pattern(p.clone()),
        (_, Some(v)) if !v.is_null() => {
            return Err(bad("`whitespace_pattern` must be a string.".into()))
        }
        _ => Whitespace::Compact,
    };
    let kind = match given.as_slice() {
        [] => {
            return Err(bad(format!(
                "`structured_outputs` needs exactly one of {}.",
                KINDS.join(", ")
            )))
        }
        [one] => *one,
        many => {
            return Err(bad(format!(
                "`structured_outputs` takes exactly one constraint, got {}.",
                many.join(", ")
            )))
        }
    };
    let field = &obj[kind];
    let spec = match kind {
        "json" => {
            let schema = match field {
                Value::String(s) => serde_json::from_str(s).map_err(|e| {
                    bad(format!("`structured_outputs.json` is not valid JSON: {e}"))
                })?,
                other => other.clone(),
            };
            if !(schema.is_object() || schema.is_boolean()) {
                return Err(bad(
                    "`structured_outputs.json` must be a JSON schema object.".into(),
                ));
            }
            ConstraintSpec::JsonSchema { schema, whitespace }
        }
        "json_object" => ConstraintSpec::JsonObject { whitespace },
        "regex" => match field {
            Value::String(r) if !r.is_empty() => ConstraintSpec::Regex(r.clone()),
            _ => {
                return Err(bad(
                    "`structured_outputs.regex` must be a non-empty string.".into(),
                ))
            }
        },
        "grammar" => match field {
            Value::String(g) if !g.trim().is_empty() => ConstraintSpec::Grammar(g.clone()),
            _ => {
                return Err(bad(
                    "`structured_outputs.grammar` must be a non-empty Lark grammar string.".into(),
                ))
            }
        },
        _ => {
            let choices: Option<Vec<String>> = field
                .as_array()
                .and_then(|a| a.iter().map(|v| v.as_str().map(str::to_string)).collect());
            match choices {
                Some(c) if !c.is_empty() && c.iter().all(|s| !s.is_empty()) => {
                    ConstraintSpec::Choice(c)
                }
                _ => return Err(bad(
                    "`structured_outputs.choice` must be a non-empty list of non-empty strings."
                        .into(),
                )),
            }
        }
    };
    Ok(Some(spec))
}

/// Compile `spec` on the blocking pool, within [`COMPILE_TIMEOUT`], to apply once the output
/// contains `after` (a reasoning model's end of thinking; empty: from the start). A bad spec
/// is a 400 naming `param`.
pub async fn compile(
    compiler: Option<&Arc<GrammarCompiler>>,
    spec: ConstraintSpec,
    param: &'static str,
    after: &'static str,
) -> Result<Constraint, ApiError> {
    let Some(compiler) = compiler.cloned() else {
        return Err(ApiError::invalid_param(
            param,
            "Structured outputs are not available for this model.",
        ));
    };
    let task = tokio::task::spawn_blocking(move || compiler.compile_after(&spec, after));
    match tokio::time::timeout(COMPILE_TIMEOUT, task).await {
        Err(_) => Err(ApiError::invalid_param(
            param,
            format!(
                "The constraint took longer than {} s to compile; simplify it.",
                COMPILE_TIMEOUT.as_secs()
            ),
        )),
        Ok(Err(e)) => Err(ApiError::internal(format!(
            "grammar compilation task failed: {e}"
        ))),
        Ok(Ok(Err(StructuredError::InvalidSpec(m)))) => Err(ApiError::invalid_param(
            param,
            format!("Invalid or unsupported constraint: {m}"),
        )),
        Ok(Ok(Err(e))) => Err(ApiError::internal(e.to_string())),
        Ok(Ok(Ok(c))) => Ok(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(body: Value) -> Result<Option<ConstraintSpec>, ApiError> {
        let c: CommonFields = serde_json::from_value(body).expect("fields");
        constraint_spec(&c).map(|r| r.map(|r| r.spec))
    }

    #[test]
    fn accepted_forms() {
        assert_eq!(spec(json!({})).unwrap(), None);
        assert_eq!(
            spec(json!({"response_format": {"type": "text"}})).unwrap(),
            None
        );
        assert!(matches!(
            spec(json!({"response_format": {"type": "json_object"}})).unwrap(),
            Some(ConstraintSpec::JsonObject { .. })
        ));
        assert!(matches!(
            spec(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": true}}})).unwrap(),
            Some(ConstraintSpec::JsonSchema { .. })
        ));
        assert_eq!(
            spec(json!({"structured_outputs": {"regex": "[0-9]+"}})).unwrap(),
            Some(ConstraintSpec::Regex("[0-9]+".into()))
        );
        assert_eq!(
            spec(json!({"structured_outputs": {"choice": ["a", "b"]}})).unwrap(),
            Some(ConstraintSpec::Choice(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            spec(json!({"structured_outputs": {"json": "{\"type\": \"integer\"}", "disable_any_whitespace": true}})).unwrap(),
            Some(ConstraintSpec::JsonSchema { schema: json!({"type": "integer"}), whitespace: Whitespace::None })
        );
        assert_eq!(
            spec(json!({"structured_outputs": {"json_object": true, "whitespace_pattern": " ?"}}))
                .unwrap(),
            Some(ConstraintSpec::JsonObject {
                whitespace: Whitespace::Pattern(" ?".into())
            })
        );
        assert!(matches!(
            spec(json!({"structured_outputs": {"grammar": "start: \"a\""}})).unwrap(),
            Some(ConstraintSpec::Grammar(_))
        ));
    }

    #[test]
    fn malformed_forms_are_400s_naming_the_field() {
        let cases = [
            (json!({"response_format": "json"}), "response_format"),
            (json!({"response_format": {}}), "response_format"),
            (
                json!({"response_format": {"type": "yaml"}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}),
                "response_format",
            ),
            (json!({"structured_outputs": []}), "structured_outputs"),
            (json!({"structured_outputs": {}}), "structured_outputs"),
            (
                json!({"structured_outputs": {"regex": "a", "choice": ["a"]}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"choice": []}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"choice": ["a", 1]}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"regex": ""}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"json": "{not json"}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"json": 5}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"grammar": " "}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"regex": "a", "guided_json": {}}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"json_object": true, "disable_any_whitespace": true, "whitespace_pattern": " "}}),
                "structured_outputs",
            ),
            (
                json!({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}),
                "structured_outputs",
            ),
        ];
        for (body, param) in cases {
            let e = spec(body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }

    #[test]
    fn legacy_guided_fields_map_onto_structured_outputs() {
        assert_eq!(
            spec(json!({"guided_json": {"type": "integer"}})).unwrap(),
            Some(ConstraintSpec::JsonSchema {
                schema: json!({"type": "integer"}),
                whitespace: Whitespace::Compact
            })
        );
        assert_eq!(
            spec(json!({"guided_choice": ["yes", "no"]})).unwrap(),
            Some(ConstraintSpec::Choice(vec!["yes".into(), "no".into()]))
        );
        assert_eq!(
            spec(json!({"guided_regex": "[0-9]+", "guided_whitespace_pattern": " "})).unwrap(),
            Some(ConstraintSpec::Regex("[0-9]+".into()))
        );
        assert!(matches!(
            spec(json!({"guided_grammar": "start: \"a\""})).unwrap(),
            Some(ConstraintSpec::Grammar(_))
        ));
        for (body, param) in [
            (json!({"guided_regex": ""}), "guided_regex"),
            (json!({"guided_json": "{bad"}), "guided_json"),
            (
                json!({"guided_json": {}, "guided_regex": "a"}),
                "guided_json",
            ),
            (
                json!({"guided_choice": ["a"], "response_format": {"type": "json_object"}}),
                "guided_choice",
            ),
        ] {
            let e = spec(body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }
}
