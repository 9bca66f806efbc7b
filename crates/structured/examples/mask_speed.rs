//! Structured-output costs on a real vocabulary: grammar compile time (cold, cached) and mask
//! time per engine step for 1, 8 and 32 constrained sequences (masks computed in parallel, as
//! the engine does). `cargo run --release -p spindle-structured --example mask_speed -- [GGUF]`

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde_json::json;
use spindle_model::gguf::GgufFile;
use spindle_structured::{Constraint, ConstraintSpec, GrammarCompiler, Whitespace};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p / 100.0).round() as usize]
}

fn schema(i: usize) -> serde_json::Value {
    json!({"type": "object", "additionalProperties": false, "required": [format!("name{i}"), "age", "tags", "address"],
        "properties": {format!("name{i}"): {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]}}})
}

fn main() {
    use rayon::prelude::*;
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let mut file = GgufFile::open(std::path::Path::new(&path)).expect("gguf");
    let vocab = file.config().expect("config").vocab_size;
    let tok = file.vocab().expect("vocab").build().expect("tokenizer");
    let t = Instant::now();
    let compiler = GrammarCompiler::new(&tok, vocab).expect("compiler");
    println!(
        "vocabulary {vocab}: token trie built in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    let spec = |i| ConstraintSpec::JsonSchema {
        schema: schema(i),
        whitespace: Whitespace::Compact,
    };
    let (mut cold, mut cached) = (Vec::new(), Vec::new());
    for i in 0..50 {
        let t = Instant::now();
        compiler.compile(&spec(i)).expect("compile");
        cold.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        compiler.compile(&spec(i)).expect("compile");
        cached.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "compile ms: cold p50 {:.2} p99 {:.2}; cached p50 {:.3} p99 {:.3}",
        pct(&mut cold.clone(), 50.0),
        pct(&mut cold, 99.0),
        pct(&mut cached.clone(), 50.0),
        pct(&mut cached, 99.0)
    );

    for batch in [1usize, 8, 32] {
        let mut seqs: Vec<(Constraint, rand::rngs::StdRng)> = (0..batch)
            .map(|i| {
                (
                    compiler.compile(&spec(0)).expect("compile"),
                    rand::rngs::StdRng::seed_from_u64(i as u64),
                )
            })
            .collect();
        let row = vec![0f32; vocab];
        let mut steps = Vec::new();
        for _ in 0..60 {
            let t = Instant::now();
            let rows: Vec<Vec<f32>> = seqs
                .par_iter_mut()
                .map(|(c, _)| {
                    let mut r = row.clone();
                    if !c.is_finished() {
                        c.mask_logits(&mut r).expect("mask");
                    }
                    r
                })
                .collect();
            steps.push(t.elapsed().as_secs_f64() * 1e3);
            for ((c, rng), r) in seqs.iter_mut().zip(&rows) {
                if c.is_finished() {
                    continue;
                }
                let allowed: Vec<u32> = (0..vocab as u32)
                    .filter(|&i| r[i as usize] > f32::NEG_INFINITY)
                    .collect();
                let pick = allowed[rng.random_range(0..allowed.len())];
                if tok.eos_token_ids.contains(&pick) {
                    continue;
                }
                c.accept(pick).expect("accept");
            }
        }
        println!(
            "batch {batch:>2}: mask time per step p50 {:.3} ms, p99 {:.3} ms",
            pct(&mut steps.clone(), 50.0),
            pct(&mut steps, 99.0)
        );
    }
}
