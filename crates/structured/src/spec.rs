//! The constraint kinds a request can ask for, and the llguidance grammar of each.

use llguidance::api::TopLevelGrammar;
use serde_json::{json, Value};

/// Whitespace allowed between JSON tokens. Unbounded whitespace lets a small model loop on
/// spaces, so it is never the default.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Whitespace {
    /// `", "` between items and `": "` after keys, nothing else (Python's `json.dumps`).
    #[default]
    Compact,
    /// `","` and `":"` only (vLLM's `disable_any_whitespace`).
    None,
    /// Whitespace matching this regex wherever JSON allows it (vLLM's `whitespace_pattern`).
    Pattern(String),
}

/// One constraint on a completion.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// JSON valid against this schema.
    JsonSchema {
        schema: Value,
        whitespace: Whitespace,
    },
    /// Any JSON object (`response_format: json_object`).
    JsonObject { whitespace: Whitespace },
    /// Text matching this regex (the whole output).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect).
    Grammar(String),
}

impl ConstraintSpec {
    /// A stable key for the compile cache.
    pub fn cache_key(&self) -> String {
        match self {
            ConstraintSpec::JsonSchema { schema, whitespace } => {
                format!("json:{whitespace:?}:{schema}")
            }
            ConstraintSpec::JsonObject { whitespace } => format!("object:{whitespace:?}"),
            ConstraintSpec::Regex(r) => format!("regex:{r}"),
            ConstraintSpec::Choice(c) => format!("choice:{}", json!(c)),
            ConstraintSpec::Grammar(g) => format!("grammar:{g}"),
        }
    }

    /// The llguidance grammar.
    pub(crate) fn grammar(&self) -> TopLevelGrammar {
        match self {
            ConstraintSpec::JsonSchema { schema, whitespace } => {
                TopLevelGrammar::from_json_schema(with_whitespace(schema.clone(), whitespace))
            }
            ConstraintSpec::JsonObject { whitespace } => TopLevelGrammar::from_json_schema(
                with_whitespace(json!({"type": "object"}), whitespace),
            ),
            ConstraintSpec::Regex(r) => TopLevelGrammar::from_regex(r),
            ConstraintSpec::Choice(choices) => {
                let alternatives: Vec<String> = choices.iter().map(|c| regex_escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("({})", alternatives.join("|")))
            }
            ConstraintSpec::Grammar(g) => TopLevelGrammar::from_lark(g.clone()),
        }
    }
}

/// Put the whitespace rule into the schema's `x-guidance` options (kept if the client set them).
fn with_whitespace(mut schema: Value, whitespace: &Whitespace) -> Value {
    let options = match whitespace {
        Whitespace::Compact => {
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
        }
        Whitespace::None => {
            json!({"whitespace_flexible": false, "item_separator": ",", "key_separator": ":"})
        }
        Whitespace::Pattern(p) => json!({"whitespace_pattern": p}),
    };
    if let Value::Object(map) = &mut schema {
        map.entry("x-guidance").or_insert(options);
        schema
    } else {
        // `true`/`false` schemas: wrap so the options have a place.
        json!({"allOf": [schema], "x-guidance": options})
    }
}

/// Escape every regex metacharacter so `s` matches itself.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_literals_literal() {
        assert_eq!(regex_escape("a.b|c"), "a\\.b\\|c");
        assert_eq!(regex_escape("plain"), "plain");
    }

    #[test]
    fn whitespace_options_go_into_x_guidance() {
        let s = with_whitespace(json!({"type": "object"}), &Whitespace::None);
        assert_eq!(s["x-guidance"]["item_separator"], ",");
        let s = with_whitespace(
            json!({"x-guidance": {"lenient": true}}),
            &Whitespace::Compact,
        );
        assert_eq!(s["x-guidance"], json!({"lenient": true}));
        let s = with_whitespace(json!(true), &Whitespace::Compact);
        assert!(s["allOf"].is_array());
    }
}
