//! Structured outputs for spindle: constraints (JSON schema, any JSON object, regex, choice, Lark
//! grammar) compiled by llguidance into per-sequence token masks.
//!
//! Depends on spindle-model (tokenizer) only; the server compiles, the engine applies.

pub mod compiler;
pub mod constraint;
pub mod spec;
pub mod tok_env;

pub use compiler::GrammarCompiler;
pub use constraint::Constraint;
pub use spec::{ConstraintSpec, Whitespace};

/// Why a constraint cannot be built or followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StructuredError {
    /// The spec is invalid or unsupported (bad schema, regex or grammar): a client error.
    #[error("{0}")]
    InvalidSpec(String),
    /// The tokenizer could not be turned into a token trie.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The matcher failed while masking or following tokens.
    #[error("constraint failed: {0}")]
    Matcher(String),
}
