//! gpt-oss's harmony output, read from the text with its special tokens kept: a sequence of
//! messages, each a header (`<|channel|>analysis`, maybe `to=functions.NAME` and
//! `<|constrain|>json`) then `<|message|>`, a body, and `<|end|>` (or `<|call|>` / `<|return|>`,
//! the stop tokens, which the text does not show). The analysis channel is reasoning, the final
//! channel and commentary without a recipient (preambles) are the answer, and a message to a
//! recipient is a tool call: it is passed on in the answer as one canonical line,
//! `<|start|>assistant to=RECIPIENT<|channel|>commentary json<|message|>ARGS<|call|>`, which
//! `--tool-call-parser openai` turns into `tool_calls` (without it, the call stays visible).

use crate::reasoning::{partial_marker_len, Split};

const MESSAGE: &str = "<|message|>";
const TERMINATORS: [&str; 4] = ["<|end|>", "<|call|>", "<|return|>", "<|start|>"];
/// What opens a call in the answer (the tool parser holds text back from here).
pub const CALL_OPEN: &str = "<|start|>assistant to=";
/// What closes a call's arguments in the answer.
pub const CALL_CLOSE: &str = "<|call|>";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Reasoning,
    Answer,
    /// A message to `recipient` (e.g. `functions.get_weather`).
    Call,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Header,
    Body(Route),
}

/// Splits one choice's harmony text as it arrives.
#[derive(Debug, Clone)]
pub struct HarmonySplitter {
    phase: Phase,
    held: String,
}

impl HarmonySplitter {
    /// `answering`: the prompt already opened the final channel.
    pub fn new(answering: bool) -> Self {
        let phase = match answering {
            true => Phase::Body(Route::Answer),
            false => Phase::Header,
        };
        Self {
            phase,
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> Split {
        self.held.push_str(text);
        let mut out = Split::default();
        loop {
            match &self.phase {
                Phase::Header => {
                    let Some(p) = self.held.find(MESSAGE) else {
                        return out;
                    };
                    let (route, recipient) = route_of(&self.held[..p]);
                    if route == Route::Call {
                        out.content.push_str(&format!(
                            "{CALL_OPEN}{recipient}<|channel|>commentary json{MESSAGE}"
                        ));
                    }
                    self.held.drain(..p + MESSAGE.len());
                    self.phase = Phase::Body(route);
                }
                Phase::Body(route) => {
                    let route = route.clone();
                    let end = TERMINATORS
                        .iter()
                        .filter_map(|t| self.held.find(t).map(|p| (p, *t)))
                        .min();
                    if let Some((p, t)) = end {
                        emit(&mut out, &route, &self.held[..p]);
                        if route == Route::Call {
                            out.content.push_str(CALL_CLOSE);
                        }
                        // `<|start|>` opens the next header: keep it there.
                        let consumed = if t == "<|start|>" { p } else { p + t.len() };
                        self.held.drain(..consumed);
                        self.phase = Phase::Header;
                        continue;
                    }
                    let keep = TERMINATORS
                        .iter()
                        .map(|t| partial_marker_len(&self.held, t))
                        .max()
                        .unwrap_or(0);
                    let cut = self.held.len() - keep;
                    emit(&mut out, &route, &self.held[..cut]);
                    self.held.drain(..cut);
                    return out;
                }
            }
        }
    }

    /// The output ended: a message cut short keeps its route; a header cut short is dropped,
    /// unless the model wrote no harmony at all (then its text is the answer).
    pub fn finish(&mut self) -> Split {
        let held = std::mem::take(&mut self.held);
        let mut out = Split::default();
        match &self.phase {
            Phase::Body(route) => {
                emit(&mut out, route, &held);
                if *route == Route::Call {
                    out.content.push_str(CALL_CLOSE);
                }
            }
            Phase::Header if !held.contains("<|") => out.content = held,
            Phase::Header => {}
        }
        out
    }
}

fn emit(out: &mut Split, route: &Route, text: &str) {
    match route {
        Route::Reasoning => out.reasoning.push_str(text),
        Route::Answer | Route::Call => out.content.push_str(text),
    }
}

/// A header's route and recipient: a recipient (`to=...`, before or after the channel) makes a
/// call; else the analysis channel is reasoning and anything else the answer.
fn route_of(header: &str) -> (Route, String) {
    let word_after = |key: &str| -> Option<String> {
        let rest = &header[header.find(key)? + key.len()..];
        let end = rest
            .find(|c: char| c.is_whitespace() || c == '<')
            .unwrap_or(rest.len());
        Some(rest[..end].to_string())
    };
    if let Some(recipient) = word_after("to=").filter(|r| !r.is_empty()) {
        return (Route::Call, recipient);
    }
    match word_after("<|channel|>").as_deref() {
        Some("analysis") => (Route::Reasoning, String::new()),
        _ => (Route::Answer, String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(text: &str) -> Split {
        let mut s = HarmonySplitter::new(false);
        let mut out = s.push(text);
        let rest = s.finish();
        out.reasoning.push_str(&rest.reasoning);
        out.content.push_str(&rest.content);
        out
    }

    fn char_by_char(text: &str) -> Split {
        let mut s = HarmonySplitter::new(false);
        let mut out = Split::default();
        for c in text.chars() {
            let p = s.push(&c.to_string());
            out.reasoning.push_str(&p.reasoning);
            out.content.push_str(&p.content);
        }
        let p = s.finish();
        out.reasoning.push_str(&p.reasoning);
        out.content.push_str(&p.content);
        out
    }

    /// Recorded shapes of gpt-oss answers (the stop tokens `<|return|>`/`<|call|>` end the text
    /// unseen).
    #[test]
    fn channels_split_into_reasoning_answer_and_calls() {
        let answer = "<|channel|>analysis<|message|>User asks capital. Simple.<|end|><|start|>assistant<|channel|>final<|message|>Paris.";
        let s = whole(answer);
        assert_eq!(s.reasoning, "User asks capital. Simple.");
        assert_eq!(s.content, "Paris.");
        assert_eq!(char_by_char(answer), s);

        // A call, recipient after the channel (the usual form) or before it.
        for call in [
            "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Tokyo\"}",
            "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{\"city\":\"Tokyo\"}",
        ] {
            let s = whole(call);
            assert_eq!(s.reasoning, "Need weather.");
            assert_eq!(
                s.content,
                "<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{\"city\":\"Tokyo\"}<|call|>"
            );
            assert_eq!(char_by_char(call), s);
        }

        // A preamble on the commentary channel is answer text; thinking cut by max_tokens is
        // all reasoning; plain text without harmony is the answer.
        let preamble = "<|channel|>commentary<|message|>Checking now.<|end|>";
        assert_eq!(whole(preamble).content, "Checking now.");
        let cut = whole("<|channel|>analysis<|message|>Let me th");
        assert_eq!(
            (cut.reasoning.as_str(), cut.content.as_str()),
            ("Let me th", "")
        );
        assert_eq!(whole("Just text").content, "Just text");
        assert_eq!(whole("<|channel|>fin").content, "");
        let mut s = HarmonySplitter::new(true);
        assert_eq!(s.push("Paris").content, "Paris");
    }
}
