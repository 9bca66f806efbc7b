//! llguidance's view of our tokenizer: a token trie built from the bytes of every token, and
//! tokenization through our own `tokenizers` build (no second copy of the library).

use std::sync::Arc;

use spindle_model::TokenizerBundle;
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::StructuredError;

struct SpindleTokEnv {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for SpindleTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let text = String::from_utf8_lossy(s);
        match self.tokenizer.encode_fast(text.as_ref(), false) {
            Ok(e) => e.get_ids().to_vec(),
            Err(e) => {
                tracing::warn!("structured outputs: tokenizing a grammar literal failed: {e}");
                Vec::new()
            }
        }
    }
}

/// The token environment for a model whose logits rows have `vocab_size` entries (it may be
/// larger than the tokenizer's vocabulary: padding rows get no bytes and are never allowed).
pub fn build(tokenizer: &TokenizerBundle, vocab_size: usize) -> Result<TokEnv, StructuredError> {
    let err = |m: String| StructuredError::Tokenizer(m);
    let json = tokenizer
        .tokenizer
        .to_string(false)
        .map_err(|e| err(format!("cannot serialize the tokenizer: {e}")))?;
    let json: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| err(format!("tokenizer JSON: {e}")))?;
    let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
        .map_err(|e| err(format!("token bytes: {e}")))?;
    if words.len() > vocab_size {
        return Err(err(format!(
            "the tokenizer has {} tokens, more than the model's {vocab_size} logits",
            words.len()
        )));
    }
    words.resize(vocab_size, Vec::new());
    let eos = *tokenizer
        .eos_token_ids
        .first()
        .ok_or_else(|| err("the model has no end-of-sequence token".into()))?;
    let mut info = TokRxInfo::new(vocab_size as u32, eos);
    info.tok_bos = tokenizer.bos_token_id;
    info.tok_end_of_turn = tokenizer.eos_token_ids.get(1).copied();
    let trie = TokTrie::from(&info, &words);
    Ok(Arc::new(SpindleTokEnv {
        trie,
        tokenizer: tokenizer.tokenizer.clone(),
    }))
}
