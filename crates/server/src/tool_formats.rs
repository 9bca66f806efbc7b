//! How models write tool calls in their text (`--tool-call-parser`), for `tool_choice: "auto"`:
//! each format finds the calls of declared tools in a finished answer and the text before them
//! (the answer's `content`), and says, while the answer streams, how much of it is surely
//! content. Anything that is not a well-formed call of a declared tool stays content, whole.
//! The promise, tested for every format: the streamed content and calls equal the non-streamed
//! ones, and no call markup reaches `content`.

use rand::Rng;
use serde_json::{json, Map, Value};

use crate::tools::{ParsedAnswer, Tool, ToolCallOut};

/// How model-written tool calls are recognized (`--tool-call-parser`, vLLM's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolParser {
    /// Hermes / Qwen2.5 / Qwen3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    /// blocks after optional text. Also accepted, because small Qwen models write it that way:
    /// the whole answer being one such JSON object, bare or in a ```json fence, provided
    /// `name` is a declared tool and `arguments` an object (other JSON stays content).
    Hermes,
    /// Llama 3.x JSON: the answer (after an optional `<|python_tag|>`) is one or more
    /// `{"name": ..., "parameters": {...}}` objects separated by `;`.
    Llama3Json,
    /// Qwen3-Coder's XML style: `<tool_call><function=NAME><parameter=ARG>value</parameter>
    /// …</function></tool_call>`, values typed by the tool's schema.
    Qwen3Coder,
    /// Mistral: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}` (v3 tokenizers) or
    /// `NAME[ARGS]{...}` per call (v11+: Mistral Small 3.2, Magistral, Devstral). The marker is
    /// a special token, so these requests keep special tokens in their text; call ids are nine
    /// alphanumerics, as Mistral's templates require.
    Mistral,
    /// Llama 3.2 / 4 pythonic: the answer is a Python list of calls,
    /// `[get_weather(city="Paris"), get_time()]` (Llama 4 may wrap it in
    /// `<|python_start|>…<|python_end|>`).
    Pythonic,
    /// gpt-oss (harmony): messages to a `functions.NAME` recipient, as `--reasoning-parser
    /// gpt_oss` passes them on (see [`crate::harmony`]); needs that reasoning parser.
    OpenAi,
}

impl ToolParser {
    /// The parser named on the command line.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "hermes" => Some(Self::Hermes),
            "llama3_json" => Some(Self::Llama3Json),
            "qwen3_coder" => Some(Self::Qwen3Coder),
            "mistral" => Some(Self::Mistral),
            "pythonic" => Some(Self::Pythonic),
            "openai" => Some(Self::OpenAi),
            _ => None,
        }
    }

    /// The names `--tool-call-parser` accepts.
    pub const NAMES: &'static str = "hermes, llama3_json, qwen3_coder, mistral, pythonic, openai";

    /// Whether the calls are marked by special tokens, which the detokenizer must keep.
    pub fn needs_special_tokens(self) -> bool {
        matches!(self, Self::Mistral | Self::OpenAi)
    }

    /// Streaming: how much of `text` (from its start) is surely content. Text from where a
    /// call could begin is held back, including a partial marker at the very end.
    pub fn content_prefix_len(self, text: &str) -> usize {
        let trimmed = text.trim_start();
        if trimmed.is_empty() {
            return 0;
        }
        let whole_answer_call = match self {
            Self::Hermes => trimmed.starts_with(['{', '[']),
            Self::Llama3Json => trimmed.starts_with(['{', '[', '<']),
            Self::Pythonic => trimmed.starts_with(['[', '<']),
            Self::Qwen3Coder | Self::Mistral | Self::OpenAi => false,
        };
        if whole_answer_call {
            return 0;
        }
        let markers: &[&str] = match self {
            Self::Hermes => &["<tool_call>", "```"],
            Self::Llama3Json => &["<|python_tag|>", "```"],
            Self::Qwen3Coder => &["<tool_call>", "<function="],
            Self::Mistral => &["[TOOL_CALLS]"],
            Self::OpenAi => &[crate::harmony::CALL_OPEN],
            // Calls are the whole answer: text that did not start as a list is content.
            Self::Pythonic => &[],
        };
        let mut cut = text.len();
        for m in markers {
            if let Some(p) = text.find(m) {
                cut = cut.min(p);
            }
            // A marker that may be starting at the end.
            cut = cut.min(text.len() - crate::reasoning::partial_marker_len(text, m));
        }
        cut
    }

    /// The calls of declared tools in a finished answer, and the content before them.
    pub fn parse_answer(self, text: &str, tools: &[Tool]) -> ParsedAnswer {
        let parsed = match self {
            Self::Hermes => hermes(text, tools),
            Self::Llama3Json => llama3_json(text, tools),
            Self::Qwen3Coder => qwen3_coder(text, tools),
            Self::Mistral => mistral(text, tools),
            Self::Pythonic => pythonic(text, tools),
            Self::OpenAi => harmony_calls(text, tools),
        };
        parsed.unwrap_or_else(|| ParsedAnswer {
            content: Some(text.to_string()),
            calls: Vec::new(),
            content_end: text.len(),
        })
    }
}

/// `text[..start]` as content (trimmed, `None` when blank) before `calls`.
fn answer(text: &str, start: usize, calls: Vec<ToolCallOut>) -> Option<ParsedAnswer> {
    if calls.is_empty() {
        return None;
    }
    let before = text[..start].trim();
    Some(ParsedAnswer {
        content: (!before.is_empty()).then(|| before.to_string()),
        calls,
        content_end: start,
    })
}

pub(crate) fn call_id() -> String {
    format!("chatcmpl-tool-{:032x}", rand::rng().random::<u128>())
}

/// Mistral's templates accept only nine alphanumerics as a call id.
fn mistral_call_id() -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..9)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// A call of a declared tool `name` with `args` (a JSON object), else `None`.
fn declared(tools: &[Tool], name: &str, args: Value, id: fn() -> String) -> Option<ToolCallOut> {
    if !tools.iter().any(|t| t.name == name) || !args.is_object() {
        return None;
    }
    Some(ToolCallOut {
        id: id(),
        name: name.to_string(),
        arguments: serde_json::to_string(&args).ok()?,
    })
}

/// A call from a parsed `{"name", <args_key>: {...}}` object (arguments absent: `{}`).
fn call_of(v: &Value, tools: &[Tool], args_keys: &[&str]) -> Option<ToolCallOut> {
    let name = v.get("name")?.as_str()?;
    let args = args_keys
        .iter()
        .find_map(|k| v.get(*k))
        .cloned()
        .unwrap_or(json!({}));
    declared(tools, name, args, call_id)
}

/// The text inside a ``` fence (with or without a language tag), if the whole text is one.
fn unfence(text: &str) -> &str {
    let t = text.trim();
    let Some(rest) = t.strip_prefix("```") else {
        return t;
    };
    let Some(body) = rest.strip_suffix("```") else {
        return t;
    };
    let body = body.trim_start_matches(|c: char| c.is_ascii_alphanumeric());
    body.trim()
}

fn hermes(text: &str, tools: &[Tool]) -> Option<ParsedAnswer> {
    let json_call = |s: &str| {
        serde_json::from_str::<Value>(unfence(s))
            .ok()
            .and_then(|v| call_of(&v, tools, &["arguments", "parameters"]))
    };
    let Some(first) = text.find("<tool_call>") else {
        return answer(text, 0, vec![json_call(text)?]);
    };
    let calls = text[first..]
        .split("<tool_call>")
        .skip(1)
        .map(|block| json_call(block.split("</tool_call>").next().unwrap_or(block)))
        .collect::<Option<Vec<_>>>()?;
    answer(text, first, calls)
}

fn llama3_json(text: &str, tools: &[Tool]) -> Option<ParsedAnswer> {
    let body = text.trim().trim_start_matches("<|python_tag|>");
    let calls = unfence(body)
        .split(';')
        .filter(|p| !p.trim().is_empty())
        .map(|part| {
            serde_json::from_str::<Value>(part.trim())
                .ok()
                .and_then(|v| call_of(&v, tools, &["parameters", "arguments"]))
        })
        .collect::<Option<Vec<_>>>()?;
    answer(text, 0, calls)
}

/// A Qwen3-Coder parameter's text as the JSON value its schema asks for: strings (and
/// parameters the schema does not type) stay text; numbers, booleans, objects and arrays are
/// parsed, and kept as text when they do not parse.
fn typed_parameter(tool: &Tool, name: &str, raw: &str) -> Value {
    let ty = tool
        .parameters
        .pointer(&format!("/properties/{name}/type"))
        .and_then(Value::as_str)
        .unwrap_or("string");
    if ty == "string" {
        return Value::String(raw.to_string());
    }
    serde_json::from_str(raw.trim()).unwrap_or_else(|_| Value::String(raw.to_string()))
}

fn qwen3_coder(text: &str, tools: &[Tool]) -> Option<ParsedAnswer> {
    let start = match (text.find("<tool_call>"), text.find("<function=")) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    let mut calls = Vec::new();
    for block in text[start..].split("<function=").skip(1) {
        let (name, rest) = block.split_once('>')?;
        let body = rest.split_once("</function>")?.0;
        let tool = tools.iter().find(|t| t.name == name.trim())?;
        let mut args = Map::new();
        for param in body.split("<parameter=").skip(1) {
            let (key, rest) = param.split_once('>')?;
            let raw = rest.split_once("</parameter>")?.0;
            // The model writes each value on its own lines.
            let raw = raw.strip_prefix('\n').unwrap_or(raw);
            let raw = raw.strip_suffix('\n').unwrap_or(raw);
            args.insert(key.to_string(), typed_parameter(tool, key, raw));
        }
        calls.push(declared(tools, &tool.name, Value::Object(args), call_id)?);
    }
    answer(text, start, calls)
}

/// The first JSON value of `s` and the rest after it.
fn first_json(s: &str) -> Option<(Value, &str)> {
    let mut stream = serde_json::Deserializer::from_str(s).into_iter::<Value>();
    let v = stream.next()?.ok()?;
    Some((v, &s[stream.byte_offset()..]))
}

fn mistral(text: &str, tools: &[Tool]) -> Option<ParsedAnswer> {
    const MARK: &str = "[TOOL_CALLS]";
    let start = text.find(MARK)?;
    let body = text[start + MARK.len()..].trim_start();
    let mut calls = Vec::new();
    if body.starts_with('[') {
        // v3: one JSON list of calls.
        let (list, _) = first_json(body)?;
        for c in list.as_array()? {
            let name = c.get("name")?.as_str()?;
            let args = c.get("arguments").cloned().unwrap_or(json!({}));
            calls.push(declared(tools, name, args, mistral_call_id)?);
        }
    } else {
        // v11+: NAME[ARGS]{...} per call, each after its own marker.
        for part in body.split(MARK).map(str::trim).filter(|p| !p.is_empty()) {
            let (name, rest) = part.split_once("[ARGS]")?;
            let name = name.split("[CALL_ID]").next()?.trim();
            let (args, _) = first_json(rest)?;
            calls.push(declared(tools, name, args, mistral_call_id)?);
        }
    }
    answer(text, start, calls)
}

/// The calls `--reasoning-parser gpt_oss` passed on: `CALL_OPEN RECIPIENT … <|message|>ARGS
/// CALL_CLOSE`, the recipient `functions.NAME`.
fn harmony_calls(text: &str, tools: &[Tool]) -> Option<ParsedAnswer> {
    use crate::harmony::{CALL_CLOSE, CALL_OPEN};
    let start = text.find(CALL_OPEN)?;
    let mut calls = Vec::new();
    for block in text[start..].split(CALL_OPEN).skip(1) {
        let (header, rest) = block.split_once("<|message|>")?;
        let recipient = header.split("<|").next()?.trim();
        let name = recipient.strip_prefix("functions.")?;
        let args = rest.split_once(CALL_CLOSE)?.0;
        let args: Value = serde_json::from_str(args.trim()).ok()?;
        calls.push(declared(tools, name, args, call_id)?);
    }
    answer(text, start, calls)
}

fn pythonic(text: &str, tools: &[Tool]) -> Option<ParsedAnswer> {
    let t = text.trim();
    let t = t.strip_prefix("<|python_start|>").unwrap_or(t);
    let t = t.strip_suffix("<|python_end|>").unwrap_or(t).trim();
    let mut p = PyParser { s: t, at: 0 };
    let calls = p.calls()?;
    p.blank();
    if p.at != t.len() {
        return None;
    }
    let calls = calls
        .into_iter()
        .map(|(name, args)| declared(tools, &name, Value::Object(args), call_id))
        .collect::<Option<Vec<_>>>()?;
    answer(text, 0, calls)
}

/// A reader of the Python literals pythonic calls use: a list of `name(key=value, ...)`, with
/// strings, numbers, `True`/`False`/`None`, lists, tuples and dicts as values.
struct PyParser<'a> {
    s: &'a str,
    at: usize,
}

impl<'a> PyParser<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.at..]
    }

    fn blank(&mut self) {
        let r = self.rest();
        self.at += r.len() - r.trim_start().len();
    }

    fn eat(&mut self, c: char) -> bool {
        self.blank();
        if self.rest().starts_with(c) {
            self.at += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn name(&mut self) -> Option<String> {
        self.blank();
        let r = self.rest();
        let len = r
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.' || c == '-'))
            .unwrap_or(r.len());
        (len > 0).then(|| {
            self.at += len;
            r[..len].to_string()
        })
    }

    /// `[call, call, ...]`.
    fn calls(&mut self) -> Option<Vec<(String, Map<String, Value>)>> {
        if !self.eat('[') {
            return None;
        }
        let mut calls = Vec::new();
        if self.eat(']') {
            return None; // no call
        }
        loop {
            let name = self.name()?;
            if !self.eat('(') {
                return None;
            }
            let mut args = Map::new();
            if !self.eat(')') {
                loop {
                    let key = self.name()?;
                    if !self.eat('=') {
                        return None;
                    }
                    args.insert(key, self.value()?);
                    if self.eat(')') {
                        break;
                    }
                    if !self.eat(',') {
                        return None;
                    }
                }
            }
            calls.push((name, args));
            if self.eat(']') {
                return Some(calls);
            }
            if !self.eat(',') {
                return None;
            }
        }
    }

    fn value(&mut self) -> Option<Value> {
        self.blank();
        let r = self.rest();
        let first = r.chars().next()?;
        match first {
            '"' | '\'' => self.string(first).map(Value::String),
            '[' | '(' => {
                let close = if first == '[' { ']' } else { ')' };
                self.at += 1;
                let mut items = Vec::new();
                loop {
                    if self.eat(close) {
                        return Some(Value::Array(items));
                    }
                    items.push(self.value()?);
                    if !self.eat(',') && !self.rest().trim_start().starts_with(close) {
                        return None;
                    }
                }
            }
            '{' => {
                self.at += 1;
                let mut map = Map::new();
                loop {
                    if self.eat('}') {
                        return Some(Value::Object(map));
                    }
                    let key = match self.value()? {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    if !self.eat(':') {
                        return None;
                    }
                    map.insert(key, self.value()?);
                    if !self.eat(',') && !self.rest().trim_start().starts_with('}') {
                        return None;
                    }
                }
            }
            _ => {
                let len = r
                    .find(|c: char| !(c.is_alphanumeric() || "+-._".contains(c)))
                    .unwrap_or(r.len());
                let word = &r[..len];
                let v = match word {
                    "True" => Value::Bool(true),
                    "False" => Value::Bool(false),
                    "None" => Value::Null,
                    _ => {
                        let n: Value = serde_json::from_str(word).ok()?;
                        n.is_number().then_some(n)?
                    }
                };
                self.at += len;
                Some(v)
            }
        }
    }

    /// A quoted string with Python's common escapes.
    fn string(&mut self, quote: char) -> Option<String> {
        let mut out = String::new();
        let mut chars = self.rest().char_indices().skip(1);
        while let Some((i, c)) = chars.next() {
            match c {
                c if c == quote => {
                    self.at += i + 1;
                    return Some(out);
                }
                '\\' => {
                    let (_, e) = chars.next()?;
                    match e {
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        'u' => {
                            let hex: String = (0..4)
                                .filter_map(|_| chars.next())
                                .map(|(_, h)| h)
                                .collect();
                            out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                        }
                        other => out.push(other),
                    }
                }
                c => out.push(c),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests;
