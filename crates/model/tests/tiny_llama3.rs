//! A tiny Llama with llama3 rope scaling whose `config.json` transformers v5 wrote (rope
//! settings under `rope_parameters`), against transformers' fp32 logits
//! (`tests/golden/tiny-llama3`, made by `scripts/golden/make_tiny_llama3.py`). The weights are
//! not stored: every tensor is filled from the same integer hash the script uses. Before v5's
//! keys were read, this model ran with theta 10000 and no scaling and diverged at once.

mod common;

use candle_core::{DType, Device};
use common::hash_weights::HashWeights;
use common::{argmax, repo_root, PagedRunner};
use serde_json::Value;
use spindle_model::{LlamaModel, ModelConfig};

fn last_logits(config: &ModelConfig, names: &[String], seqs: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let model = LlamaModel::load(
        config.clone(),
        &mut HashWeights(names.to_vec()),
        256,
        DType::F32,
        &Device::Cpu,
        |_, _| {},
    )
    .expect("load the tiny model");
    let mut runner = PagedRunner::new(&model, seqs.len(), 256, 16);
    let chunks: Vec<(usize, usize, Vec<u32>)> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| (i, 0, s.clone()))
        .collect();
    runner.step(&model, &chunks).to_vec2().expect("logits")
}

#[test]
fn a_v5_llama3_config_matches_transformers() {
    let dir = repo_root().join("tests/golden/tiny-llama3");
    let config_text = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    assert!(
        config_text.contains("rope_parameters"),
        "written by transformers v5"
    );
    let config = ModelConfig::from_hf_json(&config_text).expect("parse");
    assert_eq!(config.rope_theta, 500000.0);
    assert!(config.rope_scaling.is_some());
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("logits.json")).expect("logits"))
            .expect("json");
    let names: Vec<String> = serde_json::from_value(golden["names"].clone()).expect("names");
    let cases = golden["sequences"].as_array().expect("sequences");
    let seqs: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| serde_json::from_value(c["ids"].clone()).expect("ids"))
        .collect();
    let want: Vec<Vec<f32>> = cases
        .iter()
        .map(|c| serde_json::from_value(c["last_logits"].clone()).expect("logits"))
        .collect();
    let got = last_logits(&config, &names, &seqs);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let err = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!(
            "sequence {i} ({} tokens): max logit error {err:.2e}",
            seqs[i].len()
        );
        assert!(
            err < 1e-3,
            "sequence {i} ({} tokens): max logit error {err}",
            seqs[i].len()
        );
        assert_eq!(argmax(g), argmax(w));
    }
    // The same weights read with v4-only parsing (theta 10000, no scaling) do not match: the
    // comparison would catch the old bug.
    let ignored = ModelConfig {
        rope_theta: 10_000.0,
        rope_scaling: None,
        ..config
    };
    let wrong = last_logits(&ignored, &names, &seqs);
    let long = seqs.len() - 1;
    let err = wrong[long]
        .iter()
        .zip(&want[long])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("with theta 10000 and no scaling: max logit error {err:.2e}");
    assert!(
        err > 1e-2,
        "the reference does not depend on the rope settings ({err})"
    );
}
