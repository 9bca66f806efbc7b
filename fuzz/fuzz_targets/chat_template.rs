//! The default model's chat template rendered with hostile conversations: odd roles, special
//! tokens and template syntax in contents, multi-part contents, extra fields, arbitrary `tools`
//! and `chat_template_kwargs`. Rendering may refuse (a 400) but must never panic or hang.

#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};
use spindle_server::template::{normalize_messages, ChatTemplate, RenderOptions};

#[derive(Debug, Arbitrary)]
enum Role {
    System,
    User,
    Assistant,
    Tool,
    Developer,
    Other(String),
}

#[derive(Debug, Arbitrary)]
enum Content {
    Text(String),
    Parts(Vec<String>),
    Null,
    /// Raw JSON (objects, numbers, nested arrays) as a client might send it.
    Json(String),
}

#[derive(Debug, Arbitrary)]
struct Message {
    role: Role,
    content: Content,
    name: Option<String>,
    extra_json: Option<String>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    messages: Vec<Message>,
    add_generation_prompt: Option<bool>,
    continue_final_message: bool,
    tools_json: Option<String>,
    kwargs_json: Option<String>,
}

fn template() -> &'static ChatTemplate {
    static T: OnceLock<ChatTemplate> = OnceLock::new();
    T.get_or_init(|| {
        let b = spindle_fuzz::bundle();
        let src = b
            .chat_template
            .as_deref()
            .expect("the default model has a chat template");
        ChatTemplate::new(src, b.bos_token.as_deref(), b.eos_token.as_deref())
            .expect("the template compiles")
    })
}

fn to_json(m: &Message) -> Value {
    let role = match &m.role {
        Role::System => "system".to_string(),
        Role::User => "user".to_string(),
        Role::Assistant => "assistant".to_string(),
        Role::Tool => "tool".to_string(),
        Role::Developer => "developer".to_string(),
        Role::Other(r) => r.clone(),
    };
    let content = match &m.content {
        Content::Text(t) => Value::String(t.clone()),
        Content::Parts(parts) => Value::Array(
            parts
                .iter()
                .map(|p| json!({"type": "text", "text": p}))
                .collect(),
        ),
        Content::Null => Value::Null,
        Content::Json(j) => serde_json::from_str(j).unwrap_or(Value::Null),
    };
    let mut obj = Map::new();
    obj.insert("role".into(), Value::String(role));
    obj.insert("content".into(), content);
    if let Some(n) = &m.name {
        obj.insert("name".into(), Value::String(n.clone()));
    }
    if let Some(Ok(Value::Object(extra))) =
        m.extra_json.as_deref().map(serde_json::from_str::<Value>)
    {
        for (k, v) in extra {
            obj.entry(k).or_insert(v);
        }
    }
    Value::Object(obj)
}

fuzz_target!(|input: Input| {
    let raw = Value::Array(input.messages.iter().map(to_json).collect());
    let Ok(messages) = normalize_messages(Some(&raw)) else {
        return;
    };
    let tools = input
        .tools_json
        .as_deref()
        .and_then(|t| serde_json::from_str(t).ok());
    let extra = match input
        .kwargs_json
        .as_deref()
        .map(serde_json::from_str::<Value>)
    {
        Some(Ok(Value::Object(m))) => Some(m),
        _ => None,
    };
    let opts = RenderOptions {
        add_generation_prompt: input
            .add_generation_prompt
            .unwrap_or(!input.continue_final_message),
        continue_final_message: input.continue_final_message,
        tools,
        extra,
    };
    if let Ok(text) = template().render(&messages, &opts) {
        // What the handler does next: tokenize the rendered prompt.
        let _ = spindle_fuzz::bundle().encode(&text, false);
    }
});
