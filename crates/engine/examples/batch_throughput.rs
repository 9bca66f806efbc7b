//! Batching gain on this machine: the same N greedy requests run one at a time, then all at
//! once, through the engine API (no HTTP). Prints output tokens/s for both and the ratio.
//!
//! `cargo run --release -p spindle-engine --example batch_throughput -- [N] [MAX_TOKENS] [batched]`
//! (`batched`: skip the one-at-a-time run, e.g. to profile the batched one alone; environment:
//! `SPINDLE_MODEL` a GGUF, `SPINDLE_ARITHMETIC` float32, bfloat16 or int8)

use std::time::Instant;

use spindle_engine::{
    Engine, EngineConfig, EngineEvent, GenerateRequest, RequestStream, SamplingParams,
};
use spindle_model::LoadOptions;

fn drain(mut s: RequestStream) -> usize {
    loop {
        match s.blocking_recv() {
            Some(EngineEvent::Finished { usage, .. }) => return usage.completion_tokens,
            Some(EngineEvent::Error(e)) => panic!("{e}"),
            None => panic!("stream closed"),
            _ => {}
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(32);
    let max_tokens: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(64);
    let model = std::env::var("SPINDLE_MODEL")
        .unwrap_or_else(|_| "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let engine = Engine::spawn(EngineConfig {
        model: LoadOptions {
            model,
            max_model_len: Some(2048),
            // SPINDLE_ARITHMETIC=bfloat16|int8|float32 picks the CPU kernels.
            cpu_arithmetic: std::env::var("SPINDLE_ARITHMETIC")
                .ok()
                .and_then(|d| d.parse().ok())
                .unwrap_or_default(),
            ..LoadOptions::default()
        },
        kv_cache_memory_bytes: Some(1 << 30),
        ..EngineConfig::default()
    })
    .expect("engine");
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|i| {
            let text =
                format!("Request {i}: write a short story about a robot who learns to paint.");
            engine.tokenizer().encode(&text, true).expect("encode")
        })
        .collect();
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(max_tokens)
    };
    let submit = |ids: &Vec<u32>| {
        engine
            .generate(
                GenerateRequest::new("bench", ids.clone(), params.clone(), engine.limits())
                    .expect("valid request"),
            )
            .expect("submit")
    };
    // Warm up.
    drain(submit(&prompts[0]));

    let batched_only = args.get(3).is_some_and(|a| a == "batched");
    let t = Instant::now();
    let mut tokens = 0;
    if !batched_only {
        for p in &prompts {
            tokens += drain(submit(p));
        }
    }
    let sequential = tokens as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    let streams: Vec<RequestStream> = prompts.iter().map(submit).collect();
    let tokens: usize = streams.into_iter().map(drain).sum();
    let batched = tokens as f64 / t.elapsed().as_secs_f64();
    println!("{n} requests x {max_tokens} tokens: one at a time {sequential:.1} tok/s, all at once {batched:.1} tok/s, gain {:.2}x", batched / sequential);
}
