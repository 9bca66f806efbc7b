//! Every format on answers as its models write them: calls with their arguments, content before
//! them, non-calls kept whole as content, and the streaming promise (content sent while
//! streaming, plus the rest at the end, equals the non-streamed content; no markup in it).

use serde_json::{json, Value};

use super::ToolParser;
use crate::tools::Tool;

fn tools() -> Vec<Tool> {
    vec![
        Tool {
            name: "get_weather".into(),
            parameters: json!({"type": "object", "properties": {
                "city": {"type": "string"}, "days": {"type": "integer"},
                "metric": {"type": "boolean"}, "hours": {"type": "array"}}}),
        },
        Tool {
            name: "get_time".into(),
            parameters: json!({"type": "object", "properties": {}}),
        },
    ]
}

/// (content, [(name, arguments as JSON)]) of a finished answer.
fn parse(p: ToolParser, text: &str) -> (Option<String>, Vec<(String, Value)>) {
    let a = p.parse_answer(text, &tools());
    let calls = a
        .calls
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                serde_json::from_str(&c.arguments).expect("JSON"),
            )
        })
        .collect();
    (a.content, calls)
}

/// What a client assembles from the stream, the answer arriving `step` bytes at a time: content
/// sent while streaming plus what the end sends, and the calls.
fn streamed(p: ToolParser, text: &str, step: usize) -> (String, usize) {
    let mut sent = 0;
    let mut content = String::new();
    let mut end = 0;
    while end < text.len() {
        end = (end + step).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        let safe = p.content_prefix_len(&text[..end]);
        if safe > sent {
            content.push_str(&text[sent..safe]);
            sent = safe;
        }
    }
    let a = p.parse_answer(text, &tools());
    if a.calls.is_empty() {
        content.push_str(&text[sent.min(text.len())..]);
    } else {
        content.push_str(a.unsent_content(text, sent));
    }
    (content, a.calls.len())
}

/// The streaming promise for one answer.
fn promise(p: ToolParser, text: &str, markup: &[&str]) {
    let whole = p.parse_answer(text, &tools());
    for step in [1, 3, 7, 1000] {
        let (content, calls) = streamed(p, text, step);
        assert_eq!(calls, whole.calls.len(), "{p:?} {text:?}");
        if whole.calls.is_empty() {
            assert_eq!(content, text, "{p:?}: a non-call streams whole");
        } else {
            assert_eq!(
                content.trim(),
                whole.content.as_deref().unwrap_or(""),
                "{p:?} step {step}: {text:?}"
            );
            for m in markup {
                assert!(!content.contains(m), "{p:?}: {m} in content {content:?}");
            }
        }
    }
}

#[test]
fn qwen3_coder_calls_are_typed_by_the_schema() {
    let p = ToolParser::Qwen3Coder;
    let text = "I'll check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n<parameter=hours>\n[9, 17]\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n</function>\n</tool_call>";
    let (content, calls) = parse(p, text);
    assert_eq!(content.as_deref(), Some("I'll check."));
    assert_eq!(
        calls,
        [
            (
                "get_weather".to_string(),
                json!({"city": "New York", "days": 3, "metric": true, "hours": [9, 17]})
            ),
            ("get_time".to_string(), json!({}))
        ]
    );
    // A value that does not parse as its type stays text; an undeclared tool or a cut call
    // leaves the whole answer as content.
    let (_, calls) = parse(p, "<tool_call><function=get_weather><parameter=days>\nthree\n</parameter></function></tool_call>");
    assert_eq!(calls[0].1, json!({"days": "three"}));
    for text in [
        "<tool_call><function=send_mail><parameter=to>\na\n</parameter></function></tool_call>",
        "<tool_call><function=get_weather><parameter=city>\nPar",
        "Just text.",
    ] {
        assert_eq!(parse(p, text), (Some(text.to_string()), vec![]), "{text}");
    }
    promise(p, text, &["<tool_call>", "<function=", "<parameter="]);
    promise(p, "No call <here>.", &[]);
}

#[test]
fn mistral_calls_in_both_tokenizer_generations() {
    let p = ToolParser::Mistral;
    let v3 = "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"get_time\", \"arguments\": {}}]";
    let v11 = "Sure.[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}[TOOL_CALLS]get_time[ARGS]{}";
    for text in [v3, v11] {
        let (_, calls) = parse(p, text);
        assert_eq!(
            calls,
            [
                ("get_weather".to_string(), json!({"city": "Paris"})),
                ("get_time".to_string(), json!({}))
            ],
            "{text}"
        );
        promise(p, text, &["[TOOL_CALLS]", "[ARGS]"]);
    }
    assert_eq!(parse(p, v11).0.as_deref(), Some("Sure."));
    let a = p.parse_answer(v3, &tools());
    assert!(a
        .calls
        .iter()
        .all(|c| c.id.len() == 9 && c.id.chars().all(|c| c.is_ascii_alphanumeric())));
    for text in [
        "[TOOL_CALLS]nope[ARGS]{}",
        "[TOOL_CALLS]get_time[ARGS]{",
        "Paris.",
    ] {
        assert_eq!(parse(p, text).1, vec![], "{text}");
    }
    assert!(p.needs_special_tokens());
}

#[test]
fn pythonic_calls_are_python_literals() {
    let p = ToolParser::Pythonic;
    let text =
        "[get_weather(city='San Francisco', days=2, metric=False, hours=[9, 17.5]), get_time()]";
    let (content, calls) = parse(p, text);
    assert_eq!(content, None);
    assert_eq!(
        calls,
        [
            (
                "get_weather".to_string(),
                json!({"city": "San Francisco", "days": 2, "metric": false, "hours": [9, 17.5]})
            ),
            ("get_time".to_string(), json!({}))
        ]
    );
    let (_, calls) = parse(
        p,
        "<|python_start|>[get_weather(city=\"Zürich \\\"old\\\" town\\n\", hours=(1, 2), days=None)]<|python_end|>",
    );
    assert_eq!(
        calls[0].1,
        json!({"city": "Zürich \"old\" town\n", "hours": [1, 2], "days": null})
    );
    let (_, calls) = parse(p, "[get_weather(city={'a': [True, None]})]");
    assert_eq!(calls[0].1, json!({"city": {"a": [true, null]}}));
    for text in [
        "[1, 2, 3]",
        "[get_weather(city='Paris')] and more",
        "[unknown(x=1)]",
        "[get_weather('Paris')]",
        "[get_weather(city='Par",
        "The list is [a, b].",
    ] {
        assert_eq!(parse(p, text), (Some(text.to_string()), vec![]), "{text}");
    }
    promise(p, text, &["get_weather("]);
    promise(p, "The list is [a, b].", &[]);
}

#[test]
fn hermes_and_llama3_json_keep_the_promise() {
    promise(
        ToolParser::Hermes,
        "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        &["<tool_call>", "\"name\""],
    );
    promise(
        ToolParser::Hermes,
        "```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n```",
        &["```", "\"name\""],
    );
    promise(
        ToolParser::Llama3Json,
        "<|python_tag|>{\"name\": \"get_time\", \"parameters\": {}}",
        &["python_tag", "\"name\""],
    );
    for name in [
        "hermes",
        "llama3_json",
        "qwen3_coder",
        "mistral",
        "pythonic",
    ] {
        assert!(ToolParser::parse(name).is_some(), "{name}");
        assert!(ToolParser::NAMES.contains(name));
    }
}

/// gpt-oss: the harmony splitter's output for a recorded answer (a preamble, then a call) is
/// parsed into the call; the streaming promise holds over the splitter and the parser together.
#[test]
fn openai_calls_come_from_the_harmony_splitter() {
    use crate::reasoning::{PromptState, ReasoningParser, ReasoningSplitter};
    let raw = "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary<|message|>Let me look.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Tokyo\", \"days\": 2}";
    let split =
        ReasoningSplitter::new(ReasoningParser::GptOss, PromptState::Reasoning).split_all(raw);
    assert_eq!(split.reasoning, "Need the weather.");
    let p = ToolParser::OpenAi;
    let (content, calls) = parse(p, &split.content);
    assert_eq!(content.as_deref(), Some("Let me look."));
    assert_eq!(
        calls,
        [(
            "get_weather".to_string(),
            json!({"city": "Tokyo", "days": 2})
        )]
    );
    promise(
        p,
        &split.content,
        &["<|start|>", "<|channel|>", "<|message|>", "<|call|>"],
    );
    // A recipient that is not a declared function (a built-in tool) stays content.
    let other =
        "<|start|>assistant to=browser.search<|channel|>commentary json<|message|>{}<|call|>";
    assert_eq!(parse(p, other).1, vec![]);
}
