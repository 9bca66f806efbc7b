//! The field table against `docs/api.md` and against the validation path.

use super::*;
use serde_json::json;

const DOC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.md");
const BEGIN: &str = "<!-- field tables: generated from crates/server/src/fields.rs -->\n";
const END: &str = "<!-- end of field tables -->";

fn tables() -> String {
    Endpoint::ALL
        .iter()
        .map(|&e| markdown_table(e))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `docs/api.md` holds exactly this table (regenerate with `SPINDLE_WRITE_API_DOCS=1`).
#[test]
fn docs_table_matches_the_code() {
    let doc = std::fs::read_to_string(DOC_PATH).expect("docs/api.md");
    let (Some(start), Some(end)) = (doc.find(BEGIN), doc.find(END)) else {
        panic!("docs/api.md lacks the field-table markers");
    };
    let current = &doc[start + BEGIN.len()..end];
    let want = tables();
    if std::env::var_os("SPINDLE_WRITE_API_DOCS").is_some() {
        let updated = format!("{}{BEGIN}{want}{}", &doc[..start], &doc[end..]);
        std::fs::write(DOC_PATH, updated).expect("write docs/api.md");
        return;
    }
    assert_eq!(
        current, want,
        "docs/api.md's field tables differ from crates/server/src/fields.rs; run the test with SPINDLE_WRITE_API_DOCS=1"
    );
}

#[test]
fn names_are_unique_per_endpoint() {
    for e in Endpoint::ALL {
        let mut names: Vec<_> = e.fields().iter().map(|f| f.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "{}", e.path());
        assert!(!names.contains(&""), "{}", e.path());
    }
}

fn active_value(neutral: Neutral) -> Value {
    match neutral {
        Neutral::Empty | Neutral::Null => json!(true),
        Neutral::Number(_) => json!(12345),
        Neutral::Text(_) => json!("something-else"),
    }
}

/// Every refused field is a 400 naming it, unless it carries its neutral value.
#[test]
fn refused_fields_are_400s_naming_them() {
    for e in Endpoint::ALL {
        for f in e.fields() {
            let Treatment::Refused { neutral, .. } = f.treatment else {
                continue;
            };
            let mut body = Map::new();
            body.insert(f.name.into(), active_value(neutral));
            let err = check(e, &body).expect_err(f.name);
            assert_eq!(err.status, hyper::StatusCode::BAD_REQUEST);
            assert_eq!(err.param.as_deref(), Some(f.name));
            assert!(err.message.contains("not supported"), "{}", err.message);
            body.insert(f.name.into(), json!(null));
            assert!(check(e, &body).is_ok(), "{} {}", e.path(), f.name);
            if neutral == Neutral::Null {
                body.insert(f.name.into(), json!(false));
                assert!(check(e, &body).is_err(), "{} {}", e.path(), f.name);
                continue;
            }
            body.insert(f.name.into(), json!(false));
            assert!(check(e, &body).is_ok(), "{} {}", e.path(), f.name);
            let neutral_value = match neutral {
                Neutral::Empty | Neutral::Null => json!([]),
                Neutral::Number(n) => json!(n),
                Neutral::Text(t) => json!(t),
            };
            body.insert(f.name.into(), neutral_value);
            assert!(check(e, &body).is_ok(), "{} {}", e.path(), f.name);
        }
    }
}

/// Honoured and ignored fields pass the check; unknown ones are only logged.
#[test]
fn other_fields_pass() {
    for e in Endpoint::ALL {
        for f in e.fields() {
            if matches!(f.treatment, Treatment::Refused { .. }) {
                continue;
            }
            let mut body = Map::new();
            body.insert(f.name.into(), json!(1));
            assert!(check(e, &body).is_ok(), "{} {}", e.path(), f.name);
        }
        let mut body = Map::new();
        body.insert("some_future_field".into(), json!({"a": 1}));
        assert!(check(e, &body).is_ok());
    }
}

/// A valid value for every honoured generation field; the request validates with each (so a
/// field marked honoured is one the request types read).
#[test]
fn every_honoured_generation_field_validates() {
    use crate::protocol::{ChatCompletionRequest, CompletionRequest};
    use crate::validation::{chat_params, completion_params, parse_request, ModelLimits};
    use spindle_engine::SchedulingPolicy;
    let limits = ModelLimits {
        vocab_size: 1000,
        max_model_len: 100,
    };
    let sample = |name: &str| -> Option<Value> {
        Some(match name {
            "model" => json!("m"),
            "messages" => json!([{"role": "user", "content": "hi"}]),
            "prompt" => json!("hi"),
            "frequency_penalty" | "presence_penalty" => json!(0.5),
            "logit_bias" => json!({"5": 1}),
            "logprobs" => return None, // typed per endpoint below
            "max_tokens" | "max_completion_tokens" => json!(5),
            "n" => json!(2),
            "best_of" => json!(1), // equal to n: a different best_of is a 400
            "response_format" => json!({"type": "json_object"}),
            "seed" => json!(7),
            "stop" => json!(["x"]),
            "stream" => json!(true),
            "stream_options" => return None, // needs stream
            "temperature" | "top_p" | "min_p" | "repetition_penalty" => json!(0.5),
            "top_k" => json!(3),
            "stop_token_ids" | "allowed_token_ids" => json!([3]),
            "include_stop_str_in_output"
            | "ignore_eos"
            | "skip_special_tokens"
            | "spaces_between_special_tokens"
            | "return_tokens_as_token_ids"
            | "return_token_ids"
            | "add_special_tokens"
            | "add_generation_prompt"
            | "continue_final_message"
            | "parallel_tool_calls" => json!(true),
            "echo" => json!(true),
            "min_tokens" => json!(1),
            "truncate_prompt_tokens" => json!(10),
            "truncation_side" => json!("right"),
            "prompt_logprobs" | "top_logprobs" => json!(2),
            "bad_words" => json!(["bad"]),
            "structured_outputs" => json!({"regex": "[a-z]+"}),
            "priority" => json!(0),
            "request_id" => json!("my-id"),
            "cache_salt" => json!("tenant"),
            "tools" => {
                json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}])
            }
            "tool_choice" => json!("none"),
            "reasoning_effort" => json!("low"),
            "include_reasoning" => json!(false),
            "documents" => json!([{"title": "t", "text": "x"}]),
            "chat_template_kwargs" => json!({"a": 1}),
            "guided_json" => json!({"type": "integer"}),
            "guided_regex" => json!("[0-9]+"),
            "guided_choice" => json!(["a", "b"]),
            "guided_grammar" => json!("start: \"a\""),
            "guided_whitespace_pattern" => json!(" "),
            other => panic!("no sample value for honoured field `{other}`: add one"),
        })
    };
    for e in [Endpoint::ChatCompletions, Endpoint::Completions] {
        for f in e.fields() {
            if f.treatment != Treatment::Honoured {
                continue;
            }
            let mut body = match e {
                Endpoint::ChatCompletions => {
                    json!({"messages": [{"role": "user", "content": "hi"}]})
                }
                _ => json!({"prompt": "hi"}),
            };
            match sample(f.name) {
                Some(v) => body[f.name] = v,
                None if f.name == "logprobs" => {
                    body["logprobs"] = if e == Endpoint::Completions {
                        json!(2)
                    } else {
                        json!(true)
                    }
                }
                None => {
                    body["stream"] = json!(true);
                    body[f.name] = json!({"include_usage": true});
                }
            }
            if f.name == "tools" {
                body["tool_choice"] = json!("required");
            }
            if f.name == "top_logprobs" {
                body["logprobs"] = json!(true);
            }
            if f.name.starts_with("guided_whitespace") {
                body["guided_regex"] = json!("[0-9]+");
            }
            let bytes = body.to_string();
            let result = match e {
                Endpoint::ChatCompletions => {
                    parse_request::<ChatCompletionRequest>(bytes.as_bytes(), e)
                        .and_then(|r| chat_params(&r, limits, SchedulingPolicy::Fcfs, None))
                }
                _ => parse_request::<CompletionRequest>(bytes.as_bytes(), e)
                    .and_then(|r| completion_params(&r, limits, SchedulingPolicy::Fcfs)),
            };
            if let Err(err) = result {
                panic!("{} `{}`: {}", e.path(), f.name, err.message);
            }
        }
    }
}
