//! Incremental detokenization (spindle_engine::detokenizer) of a 256-token-ish output with the
//! real GGUF tokenizers of the default model (SmolLM2, 49k vocabulary) and, when fetched, Qwen2.5
//! (152k). Models that are not on disk are skipped with a message (scripts/fetch-model.sh).

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use spindle_engine::detokenizer::IncrementalDetokenizer;
use spindle_model::gguf::GgufFile;

const TEXT: &str = "The quick brown fox jumps over the lazy dog while the café owner, a naïve but \
kind person, counts coins: 1, 2, 3… 1024! Meanwhile in 東京 the trains run on time 🚆 and \
programmers write `fn main() { println!(\"hello\"); }` before lunch. Ünïcödé text, emoji 🎉🚀, \
and ordinary English prose alternate so that byte-level tokens split multi-byte characters. \
Long sentences with common words keep the token count realistic for a chat reply of a few \
hundred tokens, which is what a serving benchmark streams back to its clients every step.";

fn models() -> Vec<(&'static str, PathBuf)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models");
    vec![
        (
            "smollm2",
            root.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        (
            "qwen2.5",
            root.join("qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
        ),
    ]
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("detokenizer");
    for (name, path) in models() {
        if !path.exists() {
            eprintln!(
                "detokenizer bench: {} not found, skipping {name}",
                path.display()
            );
            continue;
        }
        let bundle = match GgufFile::open(&path)
            .and_then(|f| f.vocab())
            .and_then(|v| v.build())
        {
            Ok(b) => b,
            Err(e) => {
                eprintln!("detokenizer bench: cannot build the {name} tokenizer: {e}");
                continue;
            }
        };
        let prompt = bundle
            .encode("Write a short story about a fox.", true)
            .expect("encode prompt");
        let text = format!("{TEXT} {TEXT}");
        let ids = bundle.encode(&text, false).expect("encode output");
        let tok = &bundle.tokenizer;
        g.throughput(Throughput::Elements(ids.len() as u64));
        g.bench_with_input(
            BenchmarkId::new(name, format!("{}tokens", ids.len())),
            &ids,
            |b, ids| {
                b.iter(|| {
                    let mut d = IncrementalDetokenizer::new(&prompt, true);
                    let mut out = String::new();
                    for &id in ids {
                        out.push_str(&d.push(tok, id).expect("push"));
                    }
                    out.push_str(&d.finish(tok).expect("finish"));
                    out
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
