//! `--speculative-config`, as vLLM spells it: `{"method": "ngram", "num_speculative_tokens": k,
//! "prompt_lookup_max": n, "prompt_lookup_min": m}` or `{"model": PATH,
//! "num_speculative_tokens": k}` (a draft model). Checked at start-up, so a bad value stops
//! `spindle serve` with the reason instead of surfacing in the first request.

use std::path::PathBuf;

use serde::Deserialize;

/// Most draft tokens per step spindle verifies (and the positions its acceptance metric has).
pub const MAX_SPECULATIVE_TOKENS: usize = 16;

/// vLLM's default for the n-gram window when neither bound is given.
const DEFAULT_LOOKUP: usize = 5;

/// Default of `disable_by_batch_size`: past this many running sequences a step is compute
/// bound on a CPU and verifying drafts costs more than it saves (benches/RESULTS.md, issue 23).
pub const DEFAULT_DISABLE_BY_BATCH_SIZE: usize = 8;

/// Where draft tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecMethod {
    /// Prompt lookup over the sequence's own tokens.
    Ngram { min_n: usize, max_n: usize },
    /// A smaller model sharing the target's vocabulary drafts greedily.
    DraftModel { model: PathBuf },
}

/// A checked speculative-decoding configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeculativeConfig {
    pub method: SpecMethod,
    /// Draft tokens per sequence and step (`num_speculative_tokens`).
    pub num_speculative_tokens: usize,
    /// No drafting in steps with more running sequences than this (`disable_by_batch_size`).
    pub disable_by_batch_size: usize,
}

/// Why a `--speculative-config` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecConfigError {
    #[error("--speculative-config is not valid JSON: {0}")]
    Json(String),
    #[error("--speculative-config needs `num_speculative_tokens` (1 to {MAX_SPECULATIVE_TOKENS})")]
    MissingTokens,
    #[error("num_speculative_tokens must be between 1 and {MAX_SPECULATIVE_TOKENS}, got {0}")]
    TokensOutOfRange(usize),
    #[error("--speculative-config needs a `method` (\"ngram\") or a draft `model`")]
    NoMethod,
    #[error("speculative method `{0}` is not supported; use \"ngram\" or a draft `model`")]
    UnsupportedMethod(String),
    #[error("method \"ngram\" takes no `model` (got `{0}`)")]
    NgramWithModel(String),
    #[error(
        "a draft model needs `model`: the path of a checkpoint sharing the target's tokenizer"
    )]
    MissingModel,
    #[error("prompt_lookup_min must be at least 1 and at most prompt_lookup_max (got min {min}, max {max})")]
    LookupBounds { min: usize, max: usize },
    #[error("disable_by_batch_size must be at least 1")]
    ZeroBatchSize,
}

/// The JSON as written; unknown keys are refused (a misspelt key must not be ignored).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    method: Option<String>,
    model: Option<String>,
    num_speculative_tokens: Option<usize>,
    prompt_lookup_max: Option<usize>,
    prompt_lookup_min: Option<usize>,
    disable_by_batch_size: Option<usize>,
}

impl SpeculativeConfig {
    /// Parse and check `--speculative-config`.
    pub fn from_json(text: &str) -> Result<Self, SpecConfigError> {
        let raw: Raw =
            serde_json::from_str(text).map_err(|e| SpecConfigError::Json(e.to_string()))?;
        let k = raw
            .num_speculative_tokens
            .ok_or(SpecConfigError::MissingTokens)?;
        if !(1..=MAX_SPECULATIVE_TOKENS).contains(&k) {
            return Err(SpecConfigError::TokensOutOfRange(k));
        }
        let method = match (raw.method.as_deref(), raw.model) {
            (Some("ngram"), Some(model)) => return Err(SpecConfigError::NgramWithModel(model)),
            (Some("ngram"), None) => {
                let (min_n, max_n) = match (raw.prompt_lookup_min, raw.prompt_lookup_max) {
                    (None, None) => (DEFAULT_LOOKUP, DEFAULT_LOOKUP),
                    (Some(m), None) => (m, m),
                    (None, Some(m)) => (1, m),
                    (Some(lo), Some(hi)) => (lo, hi),
                };
                if min_n == 0 || min_n > max_n {
                    return Err(SpecConfigError::LookupBounds {
                        min: min_n,
                        max: max_n,
                    });
                }
                SpecMethod::Ngram { min_n, max_n }
            }
            (Some("draft_model") | None, Some(model)) if !model.is_empty() => {
                SpecMethod::DraftModel {
                    model: PathBuf::from(model),
                }
            }
            (Some("draft_model"), _) => return Err(SpecConfigError::MissingModel),
            (None, _) => return Err(SpecConfigError::NoMethod),
            (Some(other), _) => return Err(SpecConfigError::UnsupportedMethod(other.into())),
        };
        let disable_by_batch_size = raw
            .disable_by_batch_size
            .unwrap_or(DEFAULT_DISABLE_BY_BATCH_SIZE);
        if disable_by_batch_size == 0 {
            return Err(SpecConfigError::ZeroBatchSize);
        }
        Ok(Self {
            method,
            num_speculative_tokens: k,
            disable_by_batch_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_ngram_and_draft_model_configs_parse() {
        let c = SpeculativeConfig::from_json(
            r#"{"method":"ngram","num_speculative_tokens":4,"prompt_lookup_max":4,"prompt_lookup_min":2}"#,
        )
        .unwrap();
        assert_eq!(c.method, SpecMethod::Ngram { min_n: 2, max_n: 4 });
        assert_eq!(c.num_speculative_tokens, 4);
        assert_eq!(c.disable_by_batch_size, DEFAULT_DISABLE_BY_BATCH_SIZE);
        let c = SpeculativeConfig::from_json(r#"{"method":"ngram","num_speculative_tokens":3}"#)
            .unwrap();
        assert_eq!(c.method, SpecMethod::Ngram { min_n: 5, max_n: 5 });
        let c = SpeculativeConfig::from_json(
            r#"{"method":"ngram","num_speculative_tokens":3,"prompt_lookup_max":3}"#,
        )
        .unwrap();
        assert_eq!(c.method, SpecMethod::Ngram { min_n: 1, max_n: 3 });
        let c = SpeculativeConfig::from_json(
            r#"{"model":"/m/draft.gguf","num_speculative_tokens":5,"disable_by_batch_size":4}"#,
        )
        .unwrap();
        assert_eq!(
            c.method,
            SpecMethod::DraftModel {
                model: "/m/draft.gguf".into()
            }
        );
        assert_eq!(c.disable_by_batch_size, 4);
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let err = |s: &str| SpeculativeConfig::from_json(s).unwrap_err();
        assert!(matches!(err("{"), SpecConfigError::Json(_)));
        assert!(matches!(
            err(r#"{"method":"ngram"}"#),
            SpecConfigError::MissingTokens
        ));
        assert_eq!(
            err(r#"{"method":"ngram","num_speculative_tokens":0}"#),
            SpecConfigError::TokensOutOfRange(0)
        );
        assert_eq!(
            err(r#"{"method":"ngram","num_speculative_tokens":99}"#),
            SpecConfigError::TokensOutOfRange(99)
        );
        assert_eq!(
            err(r#"{"num_speculative_tokens":2}"#),
            SpecConfigError::NoMethod
        );
        assert_eq!(
            err(r#"{"method":"eagle","num_speculative_tokens":2}"#),
            SpecConfigError::UnsupportedMethod("eagle".into())
        );
        assert_eq!(
            err(
                r#"{"method":"ngram","num_speculative_tokens":2,"prompt_lookup_min":4,"prompt_lookup_max":2}"#
            ),
            SpecConfigError::LookupBounds { min: 4, max: 2 }
        );
        assert_eq!(
            err(r#"{"method":"ngram","num_speculative_tokens":2,"prompt_lookup_min":0}"#),
            SpecConfigError::LookupBounds { min: 0, max: 0 }
        );
        assert_eq!(
            err(r#"{"method":"draft_model","num_speculative_tokens":2}"#),
            SpecConfigError::MissingModel
        );
        assert!(matches!(
            err(r#"{"method":"ngram","num_speculative_tokens":2,"lookahead":3}"#),
            SpecConfigError::Json(m) if m.contains("lookahead")
        ));
        assert_eq!(
            err(r#"{"method":"ngram","num_speculative_tokens":2,"disable_by_batch_size":0}"#),
            SpecConfigError::ZeroBatchSize
        );
    }
}
