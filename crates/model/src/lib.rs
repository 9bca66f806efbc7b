//! spindle-model: everything between a `--model` argument and logits. Loads weights (GGUF, HF
//! directory, Hub repo, dummy), builds the tokenizer and chat template, and runs Llama-family
//! forward passes (dense or mixture-of-experts) over a flattened batch whose attention goes
//! through a paged KV cache.
//!
//! Depends on candle and spindle-kernels only; never on the engine or the server.

pub mod attention;
pub mod bert;
pub mod config;
pub mod cpu_bf16;
pub mod cpu_bf16_lanes;
#[cfg(target_arch = "x86_64")]
mod cpu_emu512;
pub mod cpu_isa;
pub mod cpu_matmul;
pub mod cpu_ops;
mod cpu_tiles;
pub mod error;
pub mod gguf;
pub mod hf;
pub mod info;
pub mod llama;
pub mod loader;
pub mod mlp;
pub mod moe;
pub mod options;
pub mod quant;
pub mod rope;
pub mod tokenizer;
pub mod weights;

pub use attention::kv_dtype::{KvCacheDtypeChoice, KvDtype};
pub use attention::{
    AttentionBackend, AttentionMetadata, CacheShape, LayerAttention, SequenceSlice,
};
pub use bert::{BertModel, EncoderBatch, Pooling, SentenceTransformersConfig};
pub use config::{
    Architecture, FamilyTraits, Llama3RopeScaling, ModelConfig, MoeSpec, RopeScaling,
};
pub use cpu_bf16::CpuArithmetic;
pub use error::{ModelError, Result};
pub use info::ModelInfo;
pub use llama::{ForwardBatch, LlamaModel};
pub use loader::{
    is_encoder_dir, load, load_any, load_encoder, Loaded, LoadedEncoder, LoadedModel, ModelSource,
};
pub use options::{CpuArithmeticChoice, DTypeChoice, DeviceChoice, LoadFormat, LoadOptions};
pub use tokenizer::TokenizerBundle;
