//! Chat templates: the model's Jinja `chat_template` (or `--chat-template`) rendered with
//! minijinja the way Hugging Face's `apply_chat_template` renders it (trim/lstrip blocks, Python
//! string methods via pycompat, `raise_exception`, a Python-compatible `tojson`), so the prompt
//! the model sees is the one it was trained on.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, ValueKind};
use minijinja::{Environment, ErrorKind, Value as JinjaValue};
use serde_json::{Map, Value};

use crate::error::ApiError;

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template plus the special-token strings templates refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The template renders `tool_calls` itself; otherwise an assistant message's calls are
    /// shown to it as the message's text.
    knows_tool_calls: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// For a template that ignores `tool_calls` (e.g. SmolLM2's): an assistant message that only
/// carries calls gets them as its text, `[{"name": ..., "arguments": {...}}]`, so the
/// conversation renders and the model sees what was called.
fn calls_as_text(message: &Value) -> Value {
    let Some(calls) = message.get("tool_calls").and_then(Value::as_array) else {
        return message.clone();
    };
    let has_text = message
        .get("content")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty());
    if has_text || calls.is_empty() {
        return message.clone();
    }
    let shown: Vec<Value> = calls
        .iter()
        .map(|c| {
            serde_json::json!({"name": c.pointer("/function/name"), "arguments": c.pointer("/function/arguments")})
        })
        .collect();
    let mut m = message.clone();
    m["content"] = Value::String(Value::Array(shown).to_string());
    m
}

/// Per-request rendering switches (OpenAI/vLLM request fields).
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// Append the assistant header so the model answers.
    pub add_generation_prompt: bool,
    /// Leave the final (assistant) message open so the model continues it.
    pub continue_final_message: bool,
    /// Tool definitions, passed through as `tools`.
    pub tools: Option<Value>,
    /// Extra template variables (`chat_template_kwargs`).
    pub extra: Option<Map<String, Value>>,
}

impl ChatTemplate {
    /// Compile `source`; a syntax error is reported with minijinja's explanation.
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, String> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| e.to_string())?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| describe(&e))?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
            knows_tool_calls: source.contains("tool_calls"),
        })
    }

    /// Render already-normalized `messages` (see [`normalize_messages`]). Template errors
    /// (including `raise_exception`) are the client's 400: they come from the conversation.
    pub fn render(&self, messages: &[Value], opts: &RenderOptions) -> Result<String, ApiError> {
        if opts.continue_final_message && opts.add_generation_prompt {
            return Err(ApiError::bad_request(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to true.",
            ));
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ApiError::internal(format!("chat template missing: {e}")))?;

        let mut ctx = Map::new();
        if let Some(extra) = &opts.extra {
            for (k, v) in extra {
                ctx.insert(k.clone(), v.clone());
            }
        }
        let messages: Vec<Value> = if self.knows_tool_calls {
            messages.to_vec()
        } else {
            messages.iter().map(calls_as_text).collect()
        };
        ctx.insert("messages".into(), Value::Array(messages.clone()));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(opts.add_generation_prompt),
        );
        ctx.insert("bos_token".into(), Value::String(self.bos_token.clone()));
        ctx.insert("eos_token".into(), Value::String(self.eos_token.clone()));
        ctx.insert("tools".into(), opts.tools.clone().unwrap_or(Value::Null));
        let rendered = template
            .render(JinjaValue::from(Serde(&ctx)))
            .map_err(|e| ApiError::bad_request(format!("Chat template error: {}", describe(&e))))?;

        if opts.continue_final_message {
            return cut_after_final_message(rendered, &messages);
        }
        Ok(rendered)
    }
}

/// vLLM/HF `continue_final_message`: keep the rendered text only up to the end of the final
/// message's content, so generation continues that message instead of opening a new turn.
fn cut_after_final_message(rendered: String, messages: &[Value]) -> Result<String, ApiError> {
    let content = messages
        .last()
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let needle = content.trim();
    let Some(at) = rendered.rfind(needle) else {
        return Err(ApiError::invalid_param(
            "continue_final_message",
            "continue_final_message: the final message's content does not appear in the rendered chat template",
        ));
    };
    let head = content.trim_start();
    let end = if rendered[at..].starts_with(head) {
        at + head.len()
    } else {
        at + needle.len()
    };
    let mut rendered = rendered;
    rendered.truncate(end);
    Ok(rendered)
}

/// Check `messages` and flatten multi-part content into a string, the way vLLM feeds
/// text-only templates: text parts joined with newlines; any other part type is a 400.
/// Every other field of a message (`name`, `tool_calls`, `tool_call_id`, …) passes through.
pub fn normalize_messages(raw: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let Some(raw) = raw else {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` is required.",
        ));
    };
    let Some(list) = raw.as_array() else {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` must be a list of message objects.",
        ));
    };
    if list.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` must not be empty.",
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, msg) in list.iter().enumerate() {
        let Some(obj) = msg.as_object() else {
            return Err(ApiError::invalid_param(
                "messages",
                format!("messages[{i}] must be an object."),
            ));
        };
        match obj.get("role") {
            Some(Value::String(r)) if !r.is_empty() => {}
            _ => {
                return Err(ApiError::invalid_param(
                    "messages",
                    format!("messages[{i}].role must be a non-empty string."),
                ))
            }
        }
        let mut obj = obj.clone();
        crate::tools::decode_tool_call_arguments(&mut obj);
        share_reasoning(&mut obj);
        let content = match obj.remove("content") {
            None | Some(Value::Null) => Value::Null,
            Some(Value::String(s)) => Value::String(s),
            Some(Value::Array(parts)) => Value::String(join_text_parts(i, &parts)?),
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "messages",
                    format!("messages[{i}].content must be a string or a list of content parts."),
                ))
            }
        };
        obj.insert("content".into(), content);
        out.push(Value::Object(obj));
    }
    Ok(out)
}

/// Names of an assistant message's thinking: clients send `reasoning_content` (vLLM before
/// 0.10, DeepSeek) or `reasoning` (vLLM now, OpenRouter); Qwen3's template reads
/// `reasoning_content` and gpt-oss's `thinking`. Whichever is given fills the others.
const REASONING_NAMES: [&str; 3] = ["reasoning_content", "reasoning", "thinking"];

fn share_reasoning(message: &mut serde_json::Map<String, Value>) {
    let given = REASONING_NAMES
        .iter()
        .find_map(|k| message.get(*k).filter(|v| v.is_string()).cloned());
    if let Some(text) = given {
        for k in REASONING_NAMES {
            if !message.get(k).is_some_and(Value::is_string) {
                message.insert(k.to_string(), text.clone());
            }
        }
    }
}

fn join_text_parts(i: usize, parts: &[Value]) -> Result<String, ApiError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        // A bare string part is accepted too (some clients send it).
        if let Some(s) = part.as_str() {
            texts.push(s.to_string());
            continue;
        }
        let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
        match (kind, part.get("text")) {
            ("text" | "input_text" | "output_text", Some(Value::String(t))) => texts.push(t.clone()),
            ("text" | "input_text" | "output_text", _) => {
                return Err(ApiError::invalid_param(
                    "messages",
                    format!("messages[{i}].content[{j}] is a text part without a string `text`."),
                ))
            }
            ("", _) => {
                return Err(ApiError::invalid_param(
                    "messages",
                    format!("messages[{i}].content[{j}] has no `type`."),
                ))
            }
            (other, _) => {
                return Err(ApiError::invalid_param(
                    "messages",
                    format!(
                        "messages[{i}].content[{j}] has type `{other}`; this server only supports text content parts."
                    ),
                ))
            }
        }
    }
    Ok(texts.join("\n"))
}

/// The text of an error with its cause chain (minijinja puts the useful part in the source).
fn describe(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// `raise_exception(msg)`: templates use it to reject conversations (e.g. roles that do not
/// alternate); the message reaches the client.
fn raise_exception(msg: String) -> Result<JinjaValue, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)`: the current UTC time, as HF's template environment provides it (Llama 3
/// templates print today's date). Supports the common `%` directives.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_utc(secs, &fmt)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Format unix seconds (UTC) with a strftime subset.
fn format_utc(secs: u64, fmt: &str) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, mi, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('-') => match chars.next() {
                Some('d') => out.push_str(&d.to_string()),
                Some('m') => out.push_str(&m.to_string()),
                Some(o) => {
                    out.push_str("%-");
                    out.push(o);
                }
                None => out.push_str("%-"),
            },
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('j') => out.push_str(&format!("{:03}", day_of_year(y, m, d))),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

fn day_of_year(y: i64, m: i64, d: i64) -> i64 {
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    cum[(m - 1) as usize] + d + if leap && m > 2 { 1 } else { 0 }
}

/// `tojson` as HF's template environment defines it (Python `json.dumps` with
/// `ensure_ascii=False`): `", "`/`": "` separators, key order kept, no HTML escaping (minijinja's
/// built-in escapes `<`, which would change the prompt), optional `indent`.
fn tojson(value: &JinjaValue, kwargs: Kwargs) -> Result<JinjaValue, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // Accepted for compatibility; keys keep insertion order either way.
    let _: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let mut out = String::new();
    write_json(value, indent, 0, &mut out)?;
    Ok(JinjaValue::from_safe_string(out))
}

fn write_json(
    v: &JinjaValue,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                if f.is_finite() {
                    out.push_str(&format!("{f:?}"));
                } else if f.is_nan() {
                    out.push_str("NaN");
                } else if f > 0.0 {
                    out.push_str("Infinity");
                } else {
                    out.push_str("-Infinity");
                }
            }
        }
        ValueKind::String => {
            let s = v.as_str().unwrap_or_default();
            out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
        }
        ValueKind::Map => {
            let keys: Vec<JinjaValue> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    if indent.is_none() {
                        out.push(' ');
                    }
                }
                newline(out, depth + 1);
                let key = k
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| k.to_string());
                out.push_str(&serde_json::to_string(&key).unwrap_or_else(|_| "\"\"".into()));
                out.push_str(": ");
                write_json(&v.get_item(k)?, indent, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<JinjaValue> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    if indent.is_none() {
                        out.push(' ');
                    }
                }
                newline(out, depth + 1);
                write_json(item, indent, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        _ => {
            let s = v.to_string();
            out.push_str(&serde_json::to_string(&s).unwrap_or_else(|_| "\"\"".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A ChatML template in the style of SmolLM2/Qwen, using Python string methods.
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn render(msgs: Value, opts: RenderOptions) -> Result<String, ApiError> {
        let t = ChatTemplate::new(CHATML, Some("<s>"), Some("<|im_end|>")).unwrap();
        let msgs = normalize_messages(Some(&msgs))?;
        t.render(&msgs, &opts)
    }

    #[test]
    fn renders_roles_and_generation_prompt() {
        let out = render(
            json!([
                {"role": "system", "content": "Sys"},
                {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello"},
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
            ]),
            RenderOptions {
                add_generation_prompt: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
        );
        let no_gen = render(
            json!([{"role": "user", "content": "x"}]),
            RenderOptions::default(),
        )
        .unwrap();
        assert_eq!(
            no_gen,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nx<|im_end|>\n"
        );
    }

    /// Any of the three names of an assistant's thinking reaches a template under all three.
    #[test]
    fn reasoning_names_are_shared() {
        for name in REASONING_NAMES {
            let msgs = json!([{"role": "assistant", "content": "x", name: "hmm"}]);
            let out = normalize_messages(Some(&msgs)).unwrap();
            for k in REASONING_NAMES {
                assert_eq!(out[0][k], "hmm", "{name} -> {k}");
            }
        }
        let both =
            json!([{"role": "assistant", "content": "x", "reasoning": "a", "thinking": "b"}]);
        let out = normalize_messages(Some(&both)).unwrap();
        assert_eq!(
            (&out[0]["reasoning_content"], &out[0]["thinking"]),
            (&json!("a"), &json!("b"))
        );
    }

    #[test]
    fn continue_final_message_cuts_after_content() {
        let out = render(
            json!([{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,"}]),
            RenderOptions { continue_final_message: true, ..Default::default() },
        )
        .unwrap();
        assert!(out.ends_with("<|im_start|>assistant\n1, 2,"), "{out:?}");
        let both = render(
            json!([{"role": "user", "content": "x"}]),
            RenderOptions {
                continue_final_message: true,
                add_generation_prompt: true,
                ..Default::default()
            },
        );
        assert_eq!(both.unwrap_err().status, hyper::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn multipart_text_is_joined_and_images_rejected() {
        let out = render(
            json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]),
            RenderOptions::default(),
        )
        .unwrap();
        assert!(out.contains("user\na\nb<|im_end|>"), "{out:?}");
        let err = render(
            json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            RenderOptions::default(),
        )
        .unwrap_err();
        assert_eq!(err.status, hyper::StatusCode::BAD_REQUEST);
        assert!(err.message.contains("image_url"));
        assert_eq!(err.param.as_deref(), Some("messages"));
    }

    #[test]
    fn bad_messages_are_400() {
        for bad in [
            json!([]),
            json!("hi"),
            json!([{"content": "x"}]),
            json!([{"role": "user", "content": 5}]),
        ] {
            let e = normalize_messages(Some(&bad)).unwrap_err();
            assert_eq!(e.status, hyper::StatusCode::BAD_REQUEST, "{bad}");
        }
        assert!(normalize_messages(None).is_err());
    }

    #[test]
    fn raise_exception_reaches_the_client() {
        let t =
            ChatTemplate::new("{{ raise_exception('roles must alternate') }}", None, None).unwrap();
        let e = t
            .render(
                &[json!({"role": "user", "content": "x"})],
                &RenderOptions::default(),
            )
            .unwrap_err();
        assert_eq!(e.status, hyper::StatusCode::BAD_REQUEST);
        assert!(e.message.contains("roles must alternate"), "{}", e.message);
    }

    #[test]
    fn syntax_error_is_reported() {
        assert!(ChatTemplate::new("{% for %}", None, None).is_err());
    }

    #[test]
    fn tojson_matches_python() {
        let t = ChatTemplate::new(
            "{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}",
            None,
            None,
        )
        .unwrap();
        let out = t
            .render(
                &[json!({"role": "user", "content": "x"})],
                &RenderOptions {
                    tools: Some(json!([{"z": "<a>", "a": [1, 2.5, true, null]}])),
                    ..Default::default()
                },
            )
            .unwrap();
        // Keys keep the request's order, as Python's json.dumps does (serde_json's
        // preserve_order, which the structured-outputs dependency llguidance enables).
        assert_eq!(
            out,
            "[{\"z\": \"<a>\", \"a\": [1, 2.5, true, null]}]|{\n  \"z\": \"<a>\",\n  \"a\": [\n    1,\n    2.5,\n    true,\n    null\n  ]\n}"
        );
    }

    #[test]
    fn bos_eos_and_kwargs_reach_the_template() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{{ flavor }}{{ eos_token }}",
            Some("<s>"),
            Some("</s>"),
        )
        .unwrap();
        let mut extra = Map::new();
        extra.insert("flavor".into(), json!("mint"));
        let out = t
            .render(
                &[json!({"role": "user", "content": "x"})],
                &RenderOptions {
                    extra: Some(extra),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(out, "<s>mint</s>");
    }

    #[test]
    fn strftime_formats_dates() {
        // 2024-07-26 13:25:09 UTC
        assert_eq!(
            format_utc(1_722_000_309, "%d %b %Y %H:%M:%S %A %j"),
            "26 Jul 2024 13:25:09 Friday 208"
        );
        assert_eq!(format_utc(0, "%Y-%m-%d"), "1970-01-01");
    }
}
