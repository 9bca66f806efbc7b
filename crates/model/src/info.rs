//! A summary of what was loaded, shared with the engine and the server (logs, `/v1/models`).

/// What was loaded, for start-up logs, `/v1/models` and metrics labels.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Architecture name as the config says it (`llama`, `qwen2`, ...).
    pub architecture: String,
    /// Longest sequence (prompt + output) the model accepts.
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub num_parameters: usize,
    /// Parameters one token reads (a mixture of experts reads only its chosen experts): what
    /// bounds decode speed on memory bandwidth. Equal to `num_parameters` for dense models.
    pub active_parameters: usize,
    /// `float32`, `float16` or `bfloat16`.
    pub dtype: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
}
