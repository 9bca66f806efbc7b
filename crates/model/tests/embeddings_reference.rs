//! all-MiniLM-L6-v2 (scripts/fetch-minilm.sh) against sentence-transformers' own vectors
//! (tests/golden/all-minilm-l6-v2.json, made by scripts/golden/make_embeddings.py): same token
//! ids, unit norm and, for every sentence alone and packed with the others in mixed batches,
//! cosine similarity >= 0.99999 on the exact path (`--dtype float32`) and >= 0.9999 with bf16
//! products (`--dtype bfloat16`, and `auto` on a CPU with AVX-512 BF16: the issue-25 bar for a
//! faster encoder arithmetic).

use std::path::PathBuf;

use serde::Deserialize;
use spindle_model::{load_encoder, DTypeChoice, EncoderBatch, LoadOptions, LoadedEncoder};

#[derive(Deserialize)]
struct Reference {
    max_seq_length: usize,
    dimensions: usize,
    items: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    text: String,
    token_ids: Vec<u32>,
    truncated: bool,
    embedding: Vec<f32>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load() -> (LoadedEncoder, Reference) {
    load_as(DTypeChoice::Float32)
}

fn load_as(dtype: DTypeChoice) -> (LoadedEncoder, Reference) {
    let dir = root().join("models/all-minilm-l6-v2");
    let options = LoadOptions {
        model: dir.display().to_string(),
        dtype,
        ..LoadOptions::default()
    };
    let encoder = load_encoder(&dir, &options).expect("run scripts/fetch-minilm.sh first");
    let text = std::fs::read_to_string(root().join("tests/golden/all-minilm-l6-v2.json"))
        .expect("reference file");
    (
        encoder,
        serde_json::from_str(&text).expect("reference json"),
    )
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// The cosine every sentence must reach on the exact path and with bf16 products.
const EXACT: f64 = 0.99999;
const BF16: f64 = 0.9999;

fn check(label: &str, item: &Item, got: &[f32], bar: f64) {
    assert_eq!(got.len(), item.embedding.len(), "{label}");
    let cos = cosine(got, &item.embedding);
    assert!(cos >= bar, "{label} {:?}: cosine {cos}", item.text);
    let norm: f64 = got.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    assert!(
        (norm - 1.0).abs() < 1e-5,
        "{label} {:?}: norm {norm}",
        item.text
    );
}

#[test]
fn tokenization_and_limits_match_sentence_transformers() {
    let (enc, reference) = load();
    assert_eq!(enc.info.max_model_len, reference.max_seq_length);
    assert_eq!(enc.model.hidden_size(), reference.dimensions);
    for item in &reference.items {
        let ids = enc.tokenizer.encode(&item.text, true).expect("encode");
        if item.truncated {
            // The tokenizer.json's own truncation (128) must not apply: the input stays whole.
            assert!(ids.len() > reference.max_seq_length, "{}", ids.len());
            let n = reference.max_seq_length;
            assert_eq!(ids[..n - 1], item.token_ids[..n - 1]);
        } else {
            assert_eq!(ids, item.token_ids, "{:?}", item.text);
        }
    }
}

#[test]
fn every_sentence_matches_alone_and_in_mixed_batches() {
    let (enc, reference) = load();
    assert_eq!(enc.info.dtype, "float32");
    matches_alone_and_in_mixed_batches(&enc, &reference, EXACT);
}

#[test]
fn bf16_products_stay_within_the_bar() {
    // `auto` takes bf16 products where they are native, f32 where they would be emulated.
    let (auto, _) = load_as(DTypeChoice::Auto);
    let native = spindle_model::cpu_bf16::native();
    assert_eq!(auto.info.dtype, if native { "bfloat16" } else { "float32" });
    let (enc, reference) = load_as(DTypeChoice::BFloat16);
    if !spindle_model::cpu_bf16::supported() {
        assert_eq!(enc.info.dtype, "float32", "no bf16 kernels: the exact path");
        return;
    }
    assert_eq!(enc.info.dtype, "bfloat16");
    matches_alone_and_in_mixed_batches(&enc, &reference, BF16);
    let mut worst = f64::INFINITY;
    for item in &reference.items {
        let mut batch = EncoderBatch::default();
        batch.push(&item.token_ids);
        let out = enc.model.forward(&batch).expect("forward");
        worst = worst.min(cosine(&out[0], &item.embedding));
    }
    eprintln!("bf16 products: lowest cosine to sentence-transformers {worst:.7}");
}

fn matches_alone_and_in_mixed_batches(enc: &LoadedEncoder, reference: &Reference, bar: f64) {
    let items = &reference.items;
    let mut alone = Vec::new();
    for item in items {
        let mut batch = EncoderBatch::default();
        batch.push(&item.token_ids);
        let out = enc.model.forward(&batch).expect("forward");
        check("alone", item, &out[0], bar);
        alone.push(out[0].clone());
    }
    // All at once, then in a shuffled order with repeats.
    let mut batch = EncoderBatch::default();
    for item in items {
        batch.push(&item.token_ids);
    }
    let out = enc.model.forward(&batch).expect("forward");
    for (i, item) in items.iter().enumerate() {
        check("batch", item, &out[i], bar);
        assert!(
            cosine(&out[i], &alone[i]) >= 0.999999,
            "batch-invariant {:?}",
            item.text
        );
    }
    let order: Vec<usize> = (0..items.len()).rev().chain([3, 3, 0]).collect();
    let mut batch = EncoderBatch::default();
    for &i in &order {
        batch.push(&items[i].token_ids);
    }
    let out = enc.model.forward(&batch).expect("forward");
    for (k, &i) in order.iter().enumerate() {
        check("shuffled", &items[i], &out[k], bar);
    }
}

#[test]
fn bad_batches_are_errors() {
    let (enc, _) = load();
    let bad = |ids: Vec<u32>, lengths: Vec<usize>| {
        enc.model
            .forward(&EncoderBatch {
                token_ids: ids,
                lengths,
            })
            .is_err()
    };
    assert!(bad(vec![], vec![]));
    assert!(bad(vec![101, 102], vec![3]));
    assert!(bad(vec![101, 102], vec![2, 0]));
    assert!(bad(vec![101, 999_999], vec![2]));
    assert!(bad(vec![101; 600], vec![600]));
}
