//! Reasoning models (`--reasoning-parser`): a choice's text is split into its thinking
//! (`reasoning_content`, also sent as `reasoning`, both names being in use by clients) and its
//! answer (`content`), streamed or not, with the same result either way: the streamed pieces
//! concatenate to the non-streamed fields. Markers split across tokens are held back until they
//! are whole. Thinking that never ends (cut by `max_tokens`) is all reasoning, and the answer
//! is then null.
//!
//! `deepseek_r1` and `qwen3` write `<think> … </think>` (the opening tag may be in the prompt,
//! as DeepSeek-R1's and Qwen3-Thinking's templates put it there). DeepSeek-R1 always thinks, so
//! its output is reasoning until `</think>`; Qwen3 thinks only when the prompt or the output
//! opens `<think>` (with `enable_thinking: false` its template closes the thinking in the
//! prompt, and the whole output is the answer). `gpt_oss` reads harmony's channels
//! ([`crate::harmony`]).

/// How thinking is marked (`--reasoning-parser`, vLLM's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningParser {
    /// DeepSeek-R1 and its distills: reasoning first, `</think>` ends it.
    DeepSeekR1,
    /// Qwen3 (hybrid and thinking models): `<think> … </think>` when it thinks.
    Qwen3,
    /// gpt-oss: the analysis channel is reasoning, the final channel the answer.
    GptOss,
}

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";
/// Where gpt-oss's answer begins.
const FINAL: &str = "<|channel|>final<|message|>";

impl ReasoningParser {
    /// The parser named on the command line.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "deepseek_r1" => Some(Self::DeepSeekR1),
            "qwen3" => Some(Self::Qwen3),
            "gpt_oss" => Some(Self::GptOss),
            _ => None,
        }
    }

    /// The names `--reasoning-parser` accepts.
    pub const NAMES: &'static str = "deepseek_r1, qwen3, gpt_oss";

    /// The text that ends the thinking (structured outputs and forced tool calls apply after
    /// it).
    pub fn end_marker(self) -> &'static str {
        match self {
            Self::GptOss => FINAL,
            _ => CLOSE,
        }
    }

    /// Whether the output's markers are special tokens the detokenizer must keep.
    pub fn needs_special_tokens(self) -> bool {
        self == Self::GptOss
    }

    /// Where a prompt leaves the model, judged from the prompt's last characters.
    pub fn prompt_state(self, prompt_tail: &str) -> PromptState {
        if self == Self::GptOss {
            return match prompt_tail.trim_end().ends_with(FINAL) {
                true => PromptState::ReasoningDone,
                false => PromptState::Reasoning,
            };
        }
        let opened = prompt_tail.rfind(OPEN);
        let closed = prompt_tail.rfind(CLOSE);
        match (opened, closed) {
            (_, Some(c)) if opened.is_none_or(|o| o < c) => PromptState::ReasoningDone,
            (Some(_), _) => PromptState::Reasoning,
            _ if self == Self::DeepSeekR1 => PromptState::Reasoning,
            _ => PromptState::MayReason,
        }
    }
}

/// What the model is about to write, given its prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptState {
    /// Thinking is open (the prompt opened it, or the model always thinks first).
    Reasoning,
    /// The output thinks only if it opens `<think>` itself.
    MayReason,
    /// The prompt closed the thinking already: the output is all answer.
    ReasoningDone,
}

impl PromptState {
    /// Whether constraints must wait for the end of the thinking.
    pub fn gates_constraints(self) -> bool {
        self != PromptState::ReasoningDone
    }
}

/// Text routed to each part.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting to see whether the output opens `<think>`.
    Start,
    Reasoning,
    /// After `</think>`: whitespace before the answer is dropped.
    AnswerStart,
    Answer,
}

/// Splits one choice's text as it arrives.
#[derive(Debug, Clone)]
pub enum ReasoningSplitter {
    ThinkTags(ThinkTagSplitter),
    Harmony(crate::harmony::HarmonySplitter),
}

impl ReasoningSplitter {
    pub fn new(parser: ReasoningParser, state: PromptState) -> Self {
        match parser {
            ReasoningParser::GptOss => Self::Harmony(crate::harmony::HarmonySplitter::new(
                state == PromptState::ReasoningDone,
            )),
            _ => Self::ThinkTags(ThinkTagSplitter::new(state)),
        }
    }

    /// Route `text`, holding back what may be the start of a marker.
    pub fn push(&mut self, text: &str) -> Split {
        match self {
            Self::ThinkTags(s) => s.push(text),
            Self::Harmony(s) => s.push(text),
        }
    }

    /// The output ended: release what was held back.
    pub fn finish(&mut self) -> Split {
        match self {
            Self::ThinkTags(s) => s.finish(),
            Self::Harmony(s) => s.finish(),
        }
    }

    /// The whole of a finished text at once.
    pub fn split_all(mut self, text: &str) -> Split {
        let mut out = self.push(text);
        let rest = self.finish();
        out.reasoning.push_str(&rest.reasoning);
        out.content.push_str(&rest.content);
        out
    }
}

/// `<think> … </think>` splitting.
#[derive(Debug, Clone)]
pub struct ThinkTagSplitter {
    /// Whether text before any `<think>` is reasoning.
    implicit: bool,
    phase: Phase,
    /// Text that may be part of a marker.
    held: String,
}

impl ThinkTagSplitter {
    pub fn new(state: PromptState) -> Self {
        let (implicit, phase) = match state {
            PromptState::Reasoning => (true, Phase::Start),
            PromptState::MayReason => (false, Phase::Start),
            PromptState::ReasoningDone => (false, Phase::Answer),
        };
        Self {
            implicit,
            phase,
            held: String::new(),
        }
    }

    /// Route `text`, holding back what may be the start of a marker.
    pub fn push(&mut self, text: &str) -> Split {
        self.held.push_str(text);
        let mut out = Split::default();
        loop {
            match self.phase {
                Phase::Start => {
                    let t = self.held.trim_start();
                    if let Some(rest) = t.strip_prefix(OPEN) {
                        self.held = rest.to_string();
                        self.phase = Phase::Reasoning;
                    } else if OPEN.starts_with(t) {
                        return out; // empty, blank or a partial `<think>`
                    } else {
                        self.phase = match self.implicit {
                            true => Phase::Reasoning,
                            false => Phase::Answer,
                        };
                    }
                }
                Phase::Reasoning => {
                    if let Some(p) = self.held.find(CLOSE) {
                        out.reasoning.push_str(&self.held[..p]);
                        self.held.drain(..p + CLOSE.len());
                        self.phase = Phase::AnswerStart;
                        continue;
                    }
                    let keep = partial_marker_len(&self.held, CLOSE);
                    let cut = self.held.len() - keep;
                    out.reasoning.push_str(&self.held[..cut]);
                    self.held.drain(..cut);
                    return out;
                }
                Phase::AnswerStart => {
                    let t = self.held.trim_start();
                    if t.is_empty() {
                        self.held.clear();
                        return out;
                    }
                    self.held = t.to_string();
                    self.phase = Phase::Answer;
                }
                Phase::Answer => {
                    out.content.push_str(&self.held);
                    self.held.clear();
                    return out;
                }
            }
        }
    }

    /// The output ended: release what was held back.
    pub fn finish(&mut self) -> Split {
        let held = std::mem::take(&mut self.held);
        let mut out = Split::default();
        match self.phase {
            Phase::Start if self.implicit => out.reasoning = held,
            Phase::Start => out.content = held,
            Phase::Reasoning => out.reasoning = held,
            Phase::AnswerStart | Phase::Answer => out.content = held,
        }
        out
    }
}

/// Bytes at the end of `text` that are a proper prefix of `marker` (0 when none), on a char
/// boundary: what a stream holds back because a marker may be starting there.
pub(crate) fn partial_marker_len(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&k| text.is_char_boundary(text.len() - k) && text.ends_with(&marker[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(state: PromptState, text: &str) -> (String, String) {
        let s = ReasoningSplitter::new(ReasoningParser::Qwen3, state).split_all(text);
        (s.reasoning, s.content)
    }

    /// Every way of cutting `text` into two streamed pieces gives the whole-text split.
    fn streamed_equals_whole(state: PromptState, text: &str) {
        let whole = ReasoningSplitter::new(ReasoningParser::Qwen3, state).split_all(text);
        for cut in (0..=text.len()).filter(|&c| text.is_char_boundary(c)) {
            let mut s = ReasoningSplitter::new(ReasoningParser::Qwen3, state);
            let mut got = Split::default();
            for piece in [&text[..cut], &text[cut..]] {
                let p = s.push(piece);
                got.reasoning.push_str(&p.reasoning);
                got.content.push_str(&p.content);
            }
            let p = s.finish();
            got.reasoning.push_str(&p.reasoning);
            got.content.push_str(&p.content);
            assert_eq!(got, whole, "cut at {cut} of {text:?}");
        }
        // Token-sized pieces too: one char at a time.
        let mut s = ReasoningSplitter::new(ReasoningParser::Qwen3, state);
        let mut got = Split::default();
        for c in text.chars() {
            let p = s.push(&c.to_string());
            got.reasoning.push_str(&p.reasoning);
            got.content.push_str(&p.content);
        }
        let p = s.finish();
        got.reasoning.push_str(&p.reasoning);
        got.content.push_str(&p.content);
        assert_eq!(got, whole, "char by char: {text:?}");
    }

    #[test]
    fn think_tags_split_reasoning_from_the_answer() {
        use PromptState::*;
        let r = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            split(MayReason, "<think>\nhmm</think>\n\nParis"),
            r("\nhmm", "Paris")
        );
        assert_eq!(
            split(Reasoning, "hmm, France.</think>Paris"),
            r("hmm, France.", "Paris")
        );
        // An opening tag the model repeats after the prompt's is dropped.
        assert_eq!(split(Reasoning, "<think>a</think>b"), r("a", "b"));
        // Never closed (cut by max_tokens): all reasoning.
        assert_eq!(split(Reasoning, "still thinking"), r("still thinking", ""));
        assert_eq!(split(MayReason, "<think>still"), r("still", ""));
        // Qwen3 without thinking: all answer, tags later in the text included.
        assert_eq!(split(MayReason, "Paris <think>"), r("", "Paris <think>"));
        assert_eq!(
            split(ReasoningDone, "<think>x</think>y"),
            r("", "<think>x</think>y")
        );
        for text in [
            "<think>\nhmm</think>\n\nParis",
            "ab</think>c",
            "<thi",
            "x</thi",
            "é</think>ü",
        ] {
            for state in [Reasoning, MayReason, ReasoningDone] {
                streamed_equals_whole(state, text);
            }
        }
    }

    #[test]
    fn prompt_tails_say_where_the_model_starts() {
        use PromptState::*;
        let p = ReasoningParser::Qwen3;
        assert_eq!(p.prompt_state("<|im_start|>assistant\n"), MayReason);
        assert_eq!(p.prompt_state("assistant\n<think>\n"), Reasoning);
        assert_eq!(p.prompt_state("<think>\n\n</think>\n\n"), ReasoningDone);
        let r1 = ReasoningParser::DeepSeekR1;
        assert_eq!(r1.prompt_state("<｜Assistant｜>"), Reasoning);
        assert_eq!(r1.prompt_state("<think>\n\n</think>"), ReasoningDone);
        assert!(!ReasoningDone.gates_constraints());
        let oss = ReasoningParser::GptOss;
        assert_eq!(oss.prompt_state("<|start|>assistant"), Reasoning);
        assert_eq!(
            oss.prompt_state("<|channel|>final<|message|>"),
            ReasoningDone
        );
        assert!(oss.needs_special_tokens());
    }
}
