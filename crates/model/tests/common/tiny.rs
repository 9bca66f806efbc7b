//! The tiny family checkpoints of `tests/golden/tiny-*` (made by
//! `scripts/golden/make_tiny_families.py`): their config, tensor names and shapes (the weights
//! come from the hash fill, see `hash_weights`) and transformers' fp32 outputs, read once per
//! test, plus the helpers the family tests share.

use std::collections::HashMap;

use serde_json::Value;
use spindle_model::{LlamaModel, ModelConfig};

use super::{argmax, repo_root, PagedRunner};

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

/// The checkpoint with its hash weights, f32 on the CPU.
pub fn load_hashed(g: &Golden) -> LlamaModel {
    LlamaModel::load(
        g.config.clone(),
        &mut super::hash_weights::HashWeights(g.names.clone()),
        256,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        |_, _| {},
    )
    .expect("load the tiny model")
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

/// Greedy tokens after `prompt` fed in `chunks` (prefill sizes), then one token per step.
pub fn greedy(model: &LlamaModel, prompt: &[u32], chunks: &[usize], n: usize) -> Vec<u32> {
    let mut runner = PagedRunner::new(model, 1, 256, 16);
    let mut at = 0;
    let mut logits = None;
    for &len in chunks {
        logits = Some(runner.step(model, &[(0, at, prompt[at..at + len].to_vec())]));
        at += len;
    }
    assert_eq!(at, prompt.len());
    let mut out = Vec::new();
    let mut next = argmax(&logits.expect("a chunk").to_vec2::<f32>().expect("logits")[0]);
    for _ in 0..n {
        out.push(next);
        let l = runner.step(model, &[(0, at, vec![next])]);
        at += 1;
        next = argmax(&l.to_vec2::<f32>().expect("logits")[0]);
    }
    out
}

/// `dir` against transformers: logits of each golden sequence (within 1e-3, same argmax), bit-exact
/// batch invariance, and greedy tokens after a whole and a chunked prefill.
pub fn check(dir: &str, arch: spindle_model::Architecture) {
    let g = golden(dir);
    assert_eq!(g.config.architecture, arch, "{dir}");
    let model = load_hashed(&g);
    let mut alone = Vec::new();
    for (i, (seq, want)) in g.seqs.iter().zip(&g.logits).enumerate() {
        let got = logits_of(&model, seq);
        let err = max_err(&got, want);
        eprintln!(
            "{dir}: sequence {i} ({} tokens): max logit error {err:.2e}",
            seq.len()
        );
        assert!(
            err < 1e-3,
            "{dir}: sequence {i} ({} tokens): error {err}",
            seq.len()
        );
        assert_eq!(argmax(&got), argmax(want), "{dir}: sequence {i}");
        alone.push(got);
    }
    // Batch invariance: the three sequences in one step give each one's logits bit for bit.
    let mut runner = PagedRunner::new(&model, g.seqs.len(), 256, 16);
    let chunks: Vec<_> = g
        .seqs
        .iter()
        .enumerate()
        .map(|(i, s)| (i, 0, s.clone()))
        .collect();
    let batched: Vec<Vec<f32>> = runner.step(&model, &chunks).to_vec2().expect("logits");
    assert_eq!(
        batched, alone,
        "{dir}: batched logits differ from single-sequence ones"
    );
    // Greedy decoding after a whole prefill and after a chunked one (the second chunk starts
    // inside the first's window and crosses block boundaries).
    let n = g.greedy.len();
    assert_eq!(
        greedy(&model, &g.prompt, &[g.prompt.len()], n),
        g.greedy,
        "{dir}: greedy"
    );
    let split = [33, g.prompt.len() - 33];
    assert_eq!(
        greedy(&model, &g.prompt, &split, n),
        g.greedy,
        "{dir}: chunked greedy"
    );
}
