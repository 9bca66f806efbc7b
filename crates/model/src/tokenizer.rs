//! The tokenizer plus what a server needs beside it: chat template and special tokens.

use tokenizers::Tokenizer;

/// Errors from encoding or decoding text.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// A model's tokenizer with its chat template and special tokens, as one unit.
#[derive(Clone)]
pub struct TokenizerBundle {
    pub tokenizer: Tokenizer,
    /// Jinja chat template from the model (GGUF `tokenizer.chat_template` or tokenizer_config).
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation (tokenizer EOS plus generation_config's `eos_token_id`s).
    pub eos_token_ids: Vec<u32>,
    /// Whether `encode(.., add_special_tokens = true)` should prepend BOS.
    pub add_bos_token: bool,
    /// `encode(.., true)` adds special tokens through the tokenizer's own post-processor
    /// (encoders: `[CLS] ... [SEP]`) instead of prepending BOS.
    pub post_process_special_tokens: bool,
}

impl TokenizerBundle {
    /// Encode text; with `add_special_tokens` a BOS is prepended when the model wants one.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        if self.post_process_special_tokens {
            let encoding = self
                .tokenizer
                .encode_fast(text, add_special_tokens)
                .map_err(|e| TokenizerError::Tokenizer(e.to_string()))?;
            return Ok(encoding.get_ids().to_vec());
        }
        let encoding = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if add_special_tokens && self.add_bos_token {
            if let Some(bos) = self.bos_token_id {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Encode `text` into at most `max_tokens` ids: the text is cut at its end and the special
    /// tokens are kept (what sentence-transformers does with inputs over its limit).
    pub fn encode_truncated(
        &self,
        text: &str,
        add_special_tokens: bool,
        max_tokens: usize,
    ) -> Result<Vec<u32>, TokenizerError> {
        let err = |e: tokenizers::Error| TokenizerError::Tokenizer(e.to_string());
        if !(self.post_process_special_tokens && add_special_tokens) {
            let mut ids = self.encode(text, add_special_tokens)?;
            ids.truncate(max_tokens);
            return Ok(ids);
        }
        use tokenizers::PostProcessor;
        let added = self
            .tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        let mut encoding = self.tokenizer.encode_fast(text, false).map_err(err)?;
        encoding.truncate(
            max_tokens.saturating_sub(added),
            0,
            tokenizers::TruncationDirection::Right,
        );
        let encoding = self
            .tokenizer
            .post_process(encoding, None, true)
            .map_err(err)?;
        let mut ids = encoding.get_ids().to_vec();
        ids.truncate(max_tokens);
        Ok(ids)
    }

    /// Write the tokenizer as a Hugging Face tokenizer directory (`tokenizer.json` and
    /// `tokenizer_config.json` with the chat template and special tokens), so tools that
    /// tokenize on their own (vllm-router's `VLLM_ROUTER_TOKENIZER`, llm-d's precise prefix
    /// scorer) get exactly spindle's token ids, also for GGUF models. A BOS the bundle prepends
    /// itself becomes the tokenizer's post-processor.
    pub fn save_hf(&self, dir: &std::path::Path) -> Result<(), TokenizerError> {
        let err = |e: String| TokenizerError::Tokenizer(e);
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        let mut tokenizer = self.tokenizer.clone();
        if self.add_bos_token && !self.post_process_special_tokens {
            if let (Some(bos), Some(id)) = (&self.bos_token, self.bos_token_id) {
                let template = tokenizers::processors::template::TemplateProcessing::builder()
                    .try_single(format!("{bos} $A"))
                    .and_then(|b| b.try_pair(format!("{bos} $A {bos} $B")))
                    .map_err(|e| err(e.to_string()))?
                    .special_tokens(vec![(bos.clone(), id)])
                    .build()
                    .map_err(|e| err(e.to_string()))?;
                tokenizer.with_post_processor(Some(template));
            }
        }
        tokenizer
            .save(dir.join("tokenizer.json"), false)
            .map_err(|e| err(e.to_string()))?;
        let config = serde_json::json!({
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos_token,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string())
            .map_err(|e| err(e.to_string()))
    }

    /// Decode ids to text. Ids outside the vocabulary are an error, not a panic.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        let vocab = self.vocab_size() as u32;
        if let Some(bad) = ids.iter().find(|&&id| id >= vocab) {
            return Err(TokenizerError::Tokenizer(format!(
                "token id {bad} is out of range for a vocabulary of {vocab}"
            )));
        }
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Tokenizer(e.to_string()))
    }

    /// A byte-level tokenizer with no merges, padded to `vocab_size` with placeholder tokens:
    /// lets a dummy-weight model (`--load-format dummy`) serve text when its config comes
    /// without tokenizer files. Output text is as meaningless as the weights.
    pub fn byte_fallback(vocab_size: usize) -> crate::error::Result<Self> {
        use tokenizers::models::bpe::{Vocab, BPE};
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        let alphabet: Vec<String> = {
            let mut a: Vec<char> = ByteLevel::alphabet().into_iter().collect();
            a.sort_unstable();
            a.into_iter().map(String::from).collect()
        };
        if vocab_size < alphabet.len() + 1 {
            return Err(tok_err(format!(
                "vocab_size {vocab_size} is too small for a byte tokenizer"
            )));
        }
        let mut vocab = Vocab::new();
        let mut names = alphabet;
        names.push("<|endoftext|>".to_string());
        while names.len() < vocab_size {
            names.push(format!("<|dummy_{}|>", names.len()));
        }
        for (id, name) in names.iter().enumerate() {
            vocab.insert(name.clone(), id as u32);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, Vec::new())
            .build()
            .map_err(tok_err)?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        let eos = 256u32;
        tokenizer
            .add_special_tokens([tokenizers::AddedToken::from("<|endoftext|>", true)])
            .map_err(tok_err)?;
        Ok(Self {
            tokenizer,
            chat_template: None,
            bos_token: None,
            eos_token: Some("<|endoftext|>".to_string()),
            bos_token_id: None,
            eos_token_ids: vec![eos],
            add_bos_token: false,
            post_process_special_tokens: false,
        })
    }

    /// Number of ids the tokenizer knows, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The text of one token id (for logprobs' `token` fields); `None` if out of range.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }
}

/// The tokenizer-related GGUF metadata, decoupled from the file reader so it can be tested.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer name llama.cpp uses (`smollm`, `qwen2`, ...).
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// End-of-turn / end-of-message ids that also end generation (Llama 3 style).
    pub extra_eos_ids: Vec<u32>,
    pub unknown_token_id: Option<u32>,
    pub add_bos_token: Option<bool>,
    pub add_space_prefix: Option<bool>,
    pub chat_template: Option<String>,
}

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
const TOKEN_TYPE_BYTE: i32 = 6;

/// GPT-2's pre-tokenization pattern (contractions, letters, digits, other, spaces).
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's pattern: case-insensitive contractions, digits in groups of up to three.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pattern: like Llama 3's but single digits.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// o200k's pattern (gpt-oss, Llama 4; llama.cpp's `gpt-4o`): words split at lower-to-upper
/// case changes, contractions kept on their word, digits in groups of up to three.
const GPT4O_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn tok_err(e: impl std::fmt::Display) -> crate::error::ModelError {
    crate::error::ModelError::Tokenizer(e.to_string())
}

impl GgufVocab {
    /// Build a `tokenizers` tokenizer equivalent to the one llama.cpp uses for this vocabulary.
    pub fn build(&self) -> crate::error::Result<TokenizerBundle> {
        use tokenizers::models::bpe::{Vocab, BPE};
        if self.tokens.is_empty() {
            return Err(tok_err("GGUF has no tokenizer.ggml.tokens"));
        }
        let mut vocab = Vocab::new();
        for (id, token) in self.tokens.iter().enumerate() {
            vocab.insert(token.clone(), id as u32);
        }
        let mut tokenizer = match self.model.as_str() {
            "gpt2" => {
                let merges = self
                    .merges
                    .iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| tok_err(format!("malformed merge '{m}'")))
                    })
                    .collect::<crate::error::Result<Vec<_>>>()?;
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .build()
                    .map_err(tok_err)?;
                let mut tk = Tokenizer::new(bpe);
                tk.with_pre_tokenizer(Some(self.byte_level_pre_tokenizer()?));
                tk.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
                tk
            }
            "llama" => {
                let merges = self.merges_from_scores();
                let unk = self
                    .unknown_token_id
                    .and_then(|id| self.tokens.get(id as usize))
                    .cloned()
                    .unwrap_or_else(|| "<unk>".to_string());
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .unk_token(unk)
                    .fuse_unk(true)
                    .byte_fallback(true)
                    .build()
                    .map_err(tok_err)?;
                let mut tk = Tokenizer::new(bpe);
                use tokenizers::normalizers::{Prepend, Replace, Sequence as NormSeq};
                let mut norms = Vec::new();
                if self.add_space_prefix.unwrap_or(true) {
                    norms.push(Prepend::new("▁".to_string()).into());
                }
                norms.push(Replace::new(" ", "▁").map_err(tok_err)?.into());
                tk.with_normalizer(Some(NormSeq::new(norms)))
                    .map_err(tok_err)?;
                use tokenizers::decoders::{
                    byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as DecSeq,
                    strip::Strip,
                };
                let mut decoders = vec![
                    Replace::new("▁", " ").map_err(tok_err)?.into(),
                    ByteFallback::new().into(),
                    Fuse::new().into(),
                ];
                if self.add_space_prefix.unwrap_or(true) {
                    decoders.push(Strip::new(' ', 1, 0).into());
                }
                tk.with_decoder(Some(DecSeq::new(decoders)));
                tk
            }
            other => {
                return Err(tok_err(format!(
                    "tokenizer model '{other}' is not supported (expected gpt2 or llama)"
                )))
            }
        };
        let added: Vec<tokenizers::AddedToken> = self
            .token_types
            .iter()
            .enumerate()
            .filter_map(|(id, &kind)| {
                let content = self.tokens.get(id)?.clone();
                match kind {
                    TOKEN_TYPE_CONTROL => Some(tokenizers::AddedToken::from(content, true)),
                    TOKEN_TYPE_USER_DEFINED => {
                        Some(tokenizers::AddedToken::from(content, false).normalized(false))
                    }
                    _ => None,
                }
            })
            .collect();
        tokenizer.add_special_tokens(added).map_err(tok_err)?;

        let name = |id: Option<u32>| id.and_then(|i| self.tokens.get(i as usize)).cloned();
        let mut eos_token_ids: Vec<u32> = self.eos_token_id.into_iter().collect();
        for id in &self.extra_eos_ids {
            if !eos_token_ids.contains(id) {
                eos_token_ids.push(*id);
            }
        }
        Ok(TokenizerBundle {
            tokenizer,
            chat_template: self.chat_template.clone(),
            bos_token: name(self.bos_token_id),
            eos_token: name(self.eos_token_id),
            bos_token_id: self.bos_token_id,
            eos_token_ids,
            add_bos_token: self.add_bos_token.unwrap_or(self.model == "llama"),
            post_process_special_tokens: false,
        })
    }

    /// The pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre` for byte-level BPE.
    fn byte_level_pre_tokenizer(&self) -> crate::error::Result<tokenizers::PreTokenizerWrapper> {
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::pre_tokenizers::digits::Digits;
        use tokenizers::pre_tokenizers::sequence::Sequence;
        use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
        use tokenizers::SplitDelimiterBehavior;
        let split = |pattern: &str| -> crate::error::Result<tokenizers::PreTokenizerWrapper> {
            let split = Split::new(
                SplitPattern::Regex(pattern.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(tok_err)?;
            Ok(Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, false, false).into(),
            ])
            .into())
        };
        match self.pre.as_deref().unwrap_or("default") {
            // SmolLM / StarCoder: every digit on its own, then GPT-2's byte-level split.
            "smollm" | "starcoder" | "refact" => Ok(Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into()),
            "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" => split(LLAMA3_PATTERN),
            "qwen2" | "deepseek-r1-qwen" => split(QWEN2_PATTERN),
            "gpt-4o" | "llama4" => split(GPT4O_PATTERN),
            // OLMo / OLMoE: GPT-2's pattern.
            "default" | "gpt2" | "gpt-2" | "olmo" => split(GPT2_PATTERN),
            other => Err(tok_err(format!(
                "GGUF pre-tokenizer '{other}' is not supported (supported: smollm, starcoder, llama-bpe, qwen2, gpt-4o, olmo, gpt2)"
            ))),
        }
    }

    /// SentencePiece vocabularies in GGUF carry scores instead of merges: derive BPE merges the
    /// way SentencePiece would apply them (a piece made of two vocabulary pieces is a merge,
    /// ranked by the piece's score).
    fn merges_from_scores(&self) -> Vec<(String, String)> {
        let lookup: std::collections::HashMap<&str, usize> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let mut ranked: Vec<(f32, usize, usize, String, String)> = Vec::new();
        for (id, piece) in self.tokens.iter().enumerate() {
            if self
                .token_types
                .get(id)
                .is_some_and(|&t| t == TOKEN_TYPE_BYTE || t == TOKEN_TYPE_CONTROL)
            {
                continue;
            }
            let score = self.scores.get(id).copied().unwrap_or(0.0);
            for (split, _) in piece.char_indices().skip(1) {
                let (left, right) = piece.split_at(split);
                if let (Some(&l), Some(&r)) = (lookup.get(left), lookup.get(right)) {
                    ranked.push((score, l, r, left.to_string(), right.to_string()));
                }
            }
        }
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        ranked.into_iter().map(|(_, _, _, l, r)| (l, r)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    fn vocab(pre: &str) -> GgufVocab {
        GgufVocab {
            model: "gpt2".into(),
            pre: Some(pre.into()),
            tokens: Vec::new(),
            scores: Vec::new(),
            token_types: Vec::new(),
            merges: Vec::new(),
            bos_token_id: None,
            eos_token_id: None,
            extra_eos_ids: Vec::new(),
            unknown_token_id: None,
            add_bos_token: None,
            add_space_prefix: None,
            chat_template: None,
        }
    }

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let pre = vocab(pre)
            .byte_level_pre_tokenizer()
            .expect("known pre-tokenizer");
        let mut s = PreTokenizedString::from(text);
        pre.pre_tokenize(&mut s).expect("pre-tokenize");
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(_, (a, b), _)| text[a..b].to_string())
            .collect()
    }

    /// gpt-oss's `gpt-4o` splits at case changes and groups digits by three; OLMo's `olmo` is
    /// GPT-2's, which does neither.
    #[test]
    fn gpt4o_and_olmo_pre_tokenizers_split_as_their_patterns() {
        let text = "HelloWorld it's 12345";
        assert_eq!(
            pieces("gpt-4o", text),
            ["Hello", "World", " it's", " ", "123", "45"]
        );
        assert_eq!(pieces("olmo", text), ["HelloWorld", " it", "'s", " 12345"]);
        assert!(vocab("nonesuch").byte_level_pre_tokenizer().is_err());
    }
}
