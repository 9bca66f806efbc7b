//! Encoder speed without the server: `cargo run --release -p spindle-model --example
//! encoder_speed -- [DIR] [SENTENCES] [DTYPE]`: packs SENTENCES synthetic sentences (~30 tokens
//! each) into steps of about 512 tokens and prints tokens/s and sentences/s of
//! `BertModel::forward` (DTYPE as `--dtype`: auto, the default, or float32).

use std::time::Instant;

use spindle_model::{load_encoder, EncoderBatch, LoadOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "models/all-minilm-l6-v2".into());
    let n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let options = LoadOptions {
        model: dir.clone(),
        dtype: args
            .get(3)
            .map(|d| d.parse().expect("a --dtype value"))
            .unwrap_or_default(),
        ..LoadOptions::default()
    };
    let enc = load_encoder(std::path::Path::new(&dir), &options).expect("load");
    let texts: Vec<String> = (0..n)
        .map(|i| format!("Item {i}: the model server returns a vector for each sentence and search finds similar documents in a large collection of text about energy"))
        .collect();
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| enc.tokenizer.encode(t, true).expect("encode"))
        .collect();
    let total: usize = ids.iter().map(Vec::len).sum();
    let mut batches = vec![EncoderBatch::default()];
    for x in &ids {
        if batches
            .last()
            .is_some_and(|b| b.token_ids.len() + x.len() > 512)
        {
            batches.push(EncoderBatch::default());
        }
        if let Some(b) = batches.last_mut() {
            b.push(x);
        }
    }
    enc.model.forward(&batches[0]).expect("warm-up");
    let t = Instant::now();
    for b in &batches {
        enc.model.forward(b).expect("forward");
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "{}: {n} sentences, {total} tokens in {} steps: {:.0} tokens/s, {:.1} sentences/s ({:.1} ms per step)",
        enc.info.dtype,
        batches.len(),
        total as f64 / s,
        n as f64 / s,
        s * 1e3 / batches.len() as f64
    );
}
