//! The tiny family checkpoints of `tests/golden/tiny-*` (made by
//! `scripts/golden/make_tiny_families.py`): their config, tensor names and shapes (the weights
//! come from the hash fill, see `hash_weights`) and transformers' fp32 outputs, read once per
//! test, plus the helpers the family tests share.

use std::collections::HashMap;

use serde_json::Value;
use spindle_model::{LlamaModel, ModelConfig};

use super::{repo_root, PagedRunner};

/// Every tiny family checkpoint.
pub const FAMILIES: [&str; 16] = [
    "tiny-phi3",
    "tiny-qwen3",
    "tiny-gemma2",
    "tiny-gemma3",
    "tiny-smollm3",
    "tiny-olmo2",
    "tiny-granite",
    "tiny-llama-yarn",
    "tiny-mistral-window",
    "tiny-mixtral",
    "tiny-qwen2-moe",
    "tiny-qwen3-moe",
    "tiny-qwen3-moe-mixed",
    "tiny-olmoe",
    "tiny-gpt-oss",
    "tiny-olmoe-clip",
];

/// One checkpoint's golden files.
pub struct Golden {
    pub config: ModelConfig,
    pub names: Vec<String>,
    pub shapes: HashMap<String, Vec<usize>>,
    pub seqs: Vec<Vec<u32>>,
    /// transformers' last-position logits after each of `seqs`.
    pub logits: Vec<Vec<f32>>,
    pub prompt: Vec<u32>,
    /// transformers' greedy tokens after `prompt`, and each step's top 5.
    pub greedy: Vec<u32>,
    pub top5: Vec<Vec<u32>>,
}

/// `file` of the golden directory `dir`, parsed.
pub fn golden_json(dir: &str, file: &str) -> Value {
    let path = repo_root().join("tests/golden").join(dir).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("golden json")
}

/// A golden field as `T`.
pub fn get<T: serde::de::DeserializeOwned>(v: &Value) -> T {
    serde_json::from_value(v.clone()).expect("golden field")
}

pub fn golden(dir: &str) -> Golden {
    let path = repo_root()
        .join("tests/golden")
        .join(dir)
        .join("config.json");
    let text = std::fs::read_to_string(path).expect("config.json");
    let config = ModelConfig::from_hf_json(&text).expect("parse config.json");
    let v = golden_json(dir, "outputs.json");
    let cases = v["sequences"].as_array().expect("sequences");
    Golden {
        config,
        names: get(&v["names"]),
        shapes: get(&v["shapes"]),
        seqs: cases.iter().map(|c| get(&c["ids"])).collect(),
        logits: cases.iter().map(|c| get(&c["last_logits"])).collect(),
        prompt: get(&v["greedy"]["prompt"]),
        greedy: get(&v["greedy"]["tokens"]),
        top5: get(&v["greedy"]["top5"]),
    }
}

/// Logits after `seq` alone, prefilled in one step.
pub fn logits_of(model: &LlamaModel, seq: &[u32]) -> Vec<f32> {
    let mut runner = PagedRunner::new(model, 1, 256, 16);
    let rows: Vec<Vec<f32>> = runner
        .step(model, &[(0, 0, seq.to_vec())])
        .to_vec2()
        .expect("logits");
    rows.into_iter().next().expect("one row")
}

pub fn max_err(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
