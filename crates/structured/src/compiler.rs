//! Compiling constraint specs into ready-to-run matchers, with bounded size and work (llguidance
//! limits) and a cache keyed by the spec, so a repeated schema costs a clone.

use std::collections::HashMap;
use std::sync::Mutex;

use llguidance::api::ParserLimits;
use llguidance::{Matcher, ParserFactory};
use spindle_model::TokenizerBundle;

use crate::constraint::Constraint;
use crate::spec::ConstraintSpec;
use crate::StructuredError;

/// Most compiled specs kept; the cache is emptied when it is full.
const CACHE_ENTRIES: usize = 256;

/// Compiles specs for one model's vocabulary. Cheap to share (`Arc`); compile on a blocking
/// thread: a cold JSON schema takes milliseconds, a hostile one is cut off by the limits.
pub struct GrammarCompiler {
    factory: ParserFactory,
    cache: Mutex<HashMap<String, Matcher>>,
}

impl GrammarCompiler {
    /// A compiler for `tokenizer`'s tokens and logits rows of `vocab_size` entries.
    pub fn new(tokenizer: &TokenizerBundle, vocab_size: usize) -> Result<Self, StructuredError> {
        let env = crate::tok_env::build(tokenizer, vocab_size)?;
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| StructuredError::Tokenizer(e.to_string()))?;
        factory.quiet();
        let limits = factory.limits_mut();
        *limits = ParserLimits {
            // A few megabytes of schema at most; lexer work per mask bounded as llguidance's
            // defaults (about 15 ms worst case per step).
            max_grammar_size: 200_000,
            ..ParserLimits::default()
        };
        Ok(Self {
            factory,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// A fresh constraint for `spec` (from the cache when the same spec was compiled before).
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, StructuredError> {
        let key = spec.cache_key();
        if let Some(m) = self.cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(Constraint::new(m));
        }
        let parser = self
            .factory
            .create_parser(spec.grammar())
            .map_err(|e| StructuredError::InvalidSpec(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(StructuredError::InvalidSpec(e));
        }
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(key, matcher.clone());
        }
        Ok(Constraint::new(matcher))
    }

    /// [`Self::compile`], applied only once the output contains `marker` (a reasoning model's
    /// end of thinking, e.g. `</think>`; empty: from the start).
    pub fn compile_after(
        &self,
        spec: &ConstraintSpec,
        marker: &str,
    ) -> Result<Constraint, StructuredError> {
        let env = self.factory.tok_env().clone();
        Ok(self.compile(spec)?.gated(marker, env))
    }

    /// Whether `spec` was compiled before (for tests and metrics).
    pub fn is_cached(&self, spec: &ConstraintSpec) -> bool {
        self.cache
            .lock()
            .is_ok_and(|c| c.contains_key(&spec.cache_key()))
    }
}
