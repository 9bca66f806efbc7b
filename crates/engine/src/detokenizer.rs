//! Incremental, UTF-8-safe detokenization of a sequence's output tokens.
//!
//! Decoding token by token in isolation is wrong twice over: byte-level tokens can end in the
//! middle of a multi-byte character, and some decoders (SentencePiece's `▁`) render a token
//! differently at the start of a text. So, like vLLM, each step decodes a small window: a
//! *prefix* of tokens already emitted (context) followed by the *pending* tokens, and emits the
//! difference between the two decodes. While the pending text ends in an incomplete character
//! (U+FFFD) nothing is emitted and the window keeps growing; once it decodes cleanly the pending
//! tokens become the next prefix. Per-token cost is O(window), independent of sequence length.
//!
//! The first prefix is the last few prompt tokens, so the first output token gets the leading
//! space its context implies. For byte-level BPE tokenizers, the concatenation of every `push`
//! plus `finish` equals `tokenizer.decode(output_ids, skip_special_tokens)`.

use tokenizers::Tokenizer;

/// Prompt tokens used as the first prefix window (vLLM uses the same number).
const INITIAL_PREFIX_TOKENS: usize = 5;

/// Why an output token could not be detokenized; the engine aborts the sequence with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetokenizeError {
    /// The model produced an id the tokenizer does not know (vocab padding rows, etc.).
    #[error("token id {id} is out of range for a vocabulary of {vocab_size}")]
    OutOfRange {
        /// The offending id.
        id: u32,
        /// The tokenizer's vocabulary size, special tokens included.
        vocab_size: usize,
    },
    /// The tokenizer's decoder failed.
    #[error("decoding failed: {0}")]
    Tokenizer(String),
}

/// Streaming detokenizer for one sequence, so text can be sent to clients token by token without
/// split characters or lost spaces.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    skip_special_tokens: bool,
    /// Token ids from the start of the prefix window on; older ids are dropped.
    window: Vec<u32>,
    /// `window[..read]` is the prefix (already emitted or prompt context), the rest is pending.
    read: usize,
    /// `decode(window[..read])`, computed on first use.
    prefix_text: Option<String>,
    /// Whether the prompt context was checked against the tokenizer's vocabulary.
    context_checked: bool,
}

impl IncrementalDetokenizer {
    /// A detokenizer whose first prefix window is the tail of `prompt_ids`, so the first output
    /// token decodes with the leading space its context implies.
    pub fn new(prompt_ids: &[u32], skip_special_tokens: bool) -> Self {
        let start = prompt_ids.len().saturating_sub(INITIAL_PREFIX_TOKENS);
        let window = prompt_ids[start..].to_vec();
        Self {
            skip_special_tokens,
            read: window.len(),
            window,
            prefix_text: None,
            context_checked: false,
        }
    }

    fn decode(&self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, DetokenizeError> {
        tokenizer
            .decode(ids, self.skip_special_tokens)
            .map_err(|e| DetokenizeError::Tokenizer(e.to_string()))
    }

    /// Drop prompt context the tokenizer cannot decode (bad ids must not poison every step), and
    /// compute the prefix text.
    fn prefix(&mut self, tokenizer: &Tokenizer) -> Result<String, DetokenizeError> {
        if !self.context_checked {
            self.context_checked = true;
            let vocab = tokenizer.get_vocab_size(true);
            if self.window[..self.read]
                .iter()
                .any(|&id| id as usize >= vocab)
            {
                self.window.drain(..self.read);
                self.read = 0;
                self.prefix_text = Some(String::new());
            }
        }
        if let Some(p) = &self.prefix_text {
            return Ok(p.clone());
        }
        let text = match self.decode(tokenizer, &self.window[..self.read]) {
            Ok(t) => t,
            Err(_) if self.read > 0 && self.read == self.window.len() => {
                // The prompt context itself does not decode: go on without it.
                self.window.clear();
                self.read = 0;
                String::new()
            }
            Err(e) => return Err(e),
        };
        self.prefix_text = Some(text.clone());
        Ok(text)
    }

    /// Feed one new output token; returns the text that became final (empty while the token ends
    /// in the middle of a multi-byte character or decodes to nothing, e.g. a skipped special
    /// token). An out-of-range id is an error and leaves the state unchanged.
    pub fn push(
        &mut self,
        tokenizer: &Tokenizer,
        token_id: u32,
    ) -> Result<String, DetokenizeError> {
        let vocab_size = tokenizer.get_vocab_size(true);
        if token_id as usize >= vocab_size {
            return Err(DetokenizeError::OutOfRange {
                id: token_id,
                vocab_size,
            });
        }
        let prefix = self.prefix(tokenizer)?;
        self.window.push(token_id);
        let text = match self.decode(tokenizer, &self.window) {
            Ok(t) => t,
            Err(e) => {
                self.window.pop();
                return Err(e);
            }
        };
        let new = suffix_after(&text, &prefix);
        if new.is_empty() || new.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = new.to_owned();
        // The pending tokens become the next prefix.
        self.window.drain(..self.read);
        self.read = self.window.len();
        self.prefix_text = Some(self.decode(tokenizer, &self.window)?);
        Ok(new)
    }

    /// Flush pending text at the end of the sequence (including a trailing U+FFFD if the output
    /// really ends with an incomplete character, as a full decode would show it).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, DetokenizeError> {
        if self.read >= self.window.len() {
            return Ok(String::new());
        }
        let prefix = self.prefix(tokenizer)?;
        let text = self.decode(tokenizer, &self.window)?;
        let new = suffix_after(&text, &prefix).to_owned();
        self.window.drain(..self.read);
        self.read = self.window.len();
        self.prefix_text = None;
        Ok(new)
    }
}

/// The part of `text` after `prefix`. Decoders normally render the prefix identically; when they
/// do not (context-dependent decoders), skip as many chars as the prefix has, as vLLM does.
fn suffix_after<'a>(text: &'a str, prefix: &str) -> &'a str {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest;
    }
    let skip = prefix.chars().count();
    match text.char_indices().nth(skip) {
        Some((i, _)) => &text[i..],
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::AddedToken;

    /// GPT-2's byte-to-char table: printable bytes map to themselves, the rest to U+0100 on.
    fn byte_char(b: u8) -> char {
        let printable = |b: u8| {
            (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
        };
        if printable(b) {
            return b as char;
        }
        let shifted = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + shifted).unwrap()
    }

    fn bytes_token(bytes: &[u8]) -> String {
        bytes.iter().map(|&b| byte_char(b)).collect()
    }

    /// A byte-level BPE with merges that deliberately cut multi-byte characters in pieces.
    fn tokenizer() -> Tokenizer {
        let alphabet = ByteLevel::alphabet();
        let mut vocab: Vec<(String, u32)> = (0..=255u8)
            .map(|b| (byte_char(b).to_string(), b as u32))
            .collect();
        assert!(vocab
            .iter()
            .all(|(s, _)| s.chars().all(|c| alphabet.contains(&c))));
        // Pairs of byte strings to merge, in priority order.
        let merge_bytes: Vec<(&[u8], &[u8])> = vec![
            (b"h", b"e"),
            (b"he", b"l"),
            (b"hel", b"l"),
            (b"hell", b"o"),
            (b" ", b"w"),
            (b" w", b"o"),
            (b"\n", b"\n"),
            // 你 = E4 BD A0, 好 = E5 A5 BD: tokens E4BD | A0E5 | A5BD straddle the chars.
            (&[0xE4], &[0xBD]),
            (&[0xA0], &[0xE5]),
            (&[0xA5], &[0xBD]),
            // 👋 = F0 9F 91 8B, 🏽 = F0 9F 8F BD, 🚀 = F0 9F 9A 80.
            (&[0xF0], &[0x9F]),
            (&[0x8B], &[0xF0]),
            (&[0x8B, 0xF0], &[0x9F]),
            (&[0x8F], &[0xBD]),
        ];
        let mut merges = Vec::new();
        for (a, b) in &merge_bytes {
            let (a, b) = (bytes_token(a), bytes_token(b));
            let merged = format!("{a}{b}");
            if !vocab.iter().any(|(s, _)| *s == merged) {
                let id = vocab.len() as u32;
                vocab.push((merged, id));
            }
            merges.push((a, b));
        }
        let vocab: Vocab = vocab.into_iter().collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .unwrap();
        let mut tok = Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevel::new(false, true, true)));
        tok.add_special_tokens([
            AddedToken::from("<|end|>", true),
            AddedToken::from("<|im_start|>", true),
        ])
        .unwrap();
        tok
    }

    fn encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, false).unwrap().get_ids().to_vec()
    }

    /// Stream `output` through a detokenizer; check the invariant and return the chunks.
    fn stream(tok: &Tokenizer, prompt: &[u32], output: &[u32], skip: bool) -> Vec<String> {
        let mut d = IncrementalDetokenizer::new(prompt, skip);
        let mut chunks: Vec<String> = output.iter().map(|&id| d.push(tok, id).unwrap()).collect();
        chunks.push(d.finish(tok).unwrap());
        let joined: String = chunks.concat();
        assert_eq!(
            joined,
            tok.decode(output, skip).unwrap(),
            "chunks: {chunks:?}"
        );
        chunks
    }

    #[test]
    fn emoji_and_cjk_split_across_tokens() {
        let tok = tokenizer();
        for text in ["👋🏽🚀", "你好，世界", "hello 你好 👋🏽🚀 world"] {
            let ids = encode(&tok, text);
            assert_eq!(tok.decode(&ids, true).unwrap(), text);
            for prompt in [vec![], encode(&tok, "hello"), encode(&tok, "你好")] {
                let chunks = stream(&tok, &prompt, &ids, true);
                assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
                // Some tokens end mid-character and emit nothing.
                assert!(chunks[..ids.len()].iter().any(|c| c.is_empty()));
            }
        }
    }

    #[test]
    fn spaces_and_newlines() {
        let tok = tokenizer();
        let prompt = encode(&tok, "Say hello:");
        let text = " hello world\n\n  indented\tand tabs \n";
        let ids = encode(&tok, text);
        let chunks = stream(&tok, &prompt, &ids, true);
        assert_eq!(chunks.concat(), text);
        assert!(chunks[0].starts_with(' '), "leading space kept: {chunks:?}");
    }

    #[test]
    fn special_tokens() {
        let tok = tokenizer();
        let end = tok.token_to_id("<|end|>").unwrap();
        let start = tok.token_to_id("<|im_start|>").unwrap();
        let mut ids = vec![start];
        ids.extend(encode(&tok, "hello 你好"));
        ids.push(end);
        ids.extend(encode(&tok, " world"));
        ids.push(end);
        let kept = stream(&tok, &[start], &ids, false);
        assert_eq!(kept.concat(), "<|im_start|>hello 你好<|end|> world<|end|>");
        let skipped = stream(&tok, &[start], &ids, true);
        assert_eq!(skipped.concat(), "hello 你好 world");
    }

    #[test]
    fn incomplete_character_at_the_end_is_flushed() {
        let tok = tokenizer();
        // 你 cut after its first two bytes: the final flush shows what decode shows.
        let ids: Vec<u32> = [0xE4u8, 0xBD]
            .iter()
            .map(|&b| tok.token_to_id(&byte_char(b).to_string()).unwrap())
            .collect();
        let mut d = IncrementalDetokenizer::new(&[], true);
        assert_eq!(d.push(&tok, ids[0]).unwrap(), "");
        assert_eq!(d.push(&tok, ids[1]).unwrap(), "");
        assert_eq!(d.finish(&tok).unwrap(), tok.decode(&ids, true).unwrap());
        assert_eq!(d.finish(&tok).unwrap(), "");
    }

    #[test]
    fn window_stays_small() {
        let tok = tokenizer();
        let text = "hello world 你好 👋🏽🚀\n".repeat(50);
        let ids = encode(&tok, &text);
        let mut d = IncrementalDetokenizer::new(&encode(&tok, "hello"), true);
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&d.push(&tok, id).unwrap());
            assert!(d.window.len() <= 8, "window {}", d.window.len());
        }
        out.push_str(&d.finish(&tok).unwrap());
        assert_eq!(out, text);
    }

    /// The real tokenizers of the repository's models (skipped when the GGUF files are absent):
    /// SmolLM2 and Qwen2.5 are byte-level BPEs whose merges split CJK and emoji unevenly.
    #[test]
    fn real_model_tokenizers() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let files = [
            "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
            "qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ];
        let text = "Hello, world! Ünïcödé test: 你好，世界。こんにちは 👋🏽🚀 emoji, \n\tindent and   spaces.\n```rust\nfn main() {}\n```";
        for file in files {
            let path = root.join(file);
            if !path.exists() {
                eprintln!("skipping {file}: not downloaded");
                continue;
            }
            let bundle = spindle_model::gguf::GgufFile::open(&path)
                .and_then(|g| g.vocab())
                .and_then(|v| v.build())
                .unwrap();
            let tok = &bundle.tokenizer;
            let prompt = bundle.encode("Write something:", true).unwrap();
            let ids = bundle.encode(text, false).unwrap();
            for skip in [true, false] {
                let chunks = stream(tok, &prompt, &ids, skip);
                assert!(
                    chunks.iter().all(|c| !c.contains('\u{FFFD}')),
                    "{file}: {chunks:?}"
                );
                assert_eq!(chunks.concat(), text, "{file}");
            }
            // Special tokens inside the output.
            if let Some(&eos) = bundle.eos_token_ids.first() {
                let mut with_special = ids.clone();
                with_special.insert(3, eos);
                with_special.push(eos);
                let kept = stream(tok, &prompt, &with_special, false).concat();
                assert!(
                    kept.contains(bundle.eos_token.as_deref().unwrap_or("")),
                    "{file}: {kept}"
                );
                assert_eq!(
                    stream(tok, &prompt, &with_special, true).concat(),
                    text,
                    "{file}"
                );
            }
        }
    }

    #[test]
    fn bad_ids_are_errors_not_panics() {
        let tok = tokenizer();
        let vocab = tok.get_vocab_size(true) as u32;
        let mut d = IncrementalDetokenizer::new(&[vocab + 10, 1, 2], true);
        assert!(matches!(
            d.push(&tok, vocab + 5),
            Err(DetokenizeError::OutOfRange { .. })
        ));
        // The bad prompt context is dropped; decoding goes on.
        let ids = encode(&tok, "hello");
        let out: String = ids.iter().map(|&id| d.push(&tok, id).unwrap()).collect();
        assert_eq!(out + &d.finish(&tok).unwrap(), "hello");
    }
}
