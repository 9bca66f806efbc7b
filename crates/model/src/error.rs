//! One error type for everything that can go wrong between `--model` and logits. Messages name
//! the file and tensor involved, because the person reading them has to fix a file or a flag.

use std::path::PathBuf;

/// Errors from loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file not found: {0}")]
    NotFound(PathBuf),
    #[error("{path}: {message}")]
    InvalidFile { path: PathBuf, message: String },
    #[error("{path}: missing tensor '{tensor}'")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor '{tensor}' has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{path}: tensor '{tensor}' uses quantization type {dtype}, which spindle cannot load")]
    UnsupportedQuant {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error(
        "unsupported architecture '{0}' (supported: {list})",
        list = crate::config::Architecture::supported_list()
    )]
    UnsupportedArchitecture(String),
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("Hugging Face Hub: {0}")]
    Hub(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Shorthand used across the crate.
pub type Result<T> = std::result::Result<T, ModelError>;
