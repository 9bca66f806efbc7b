//! A model whose every layer slides (Mistral-style `sliding_window`, dummy weights): the engine
//! releases blocks that leave the window, so a cache far smaller than the sequence serves it
//! without preemption, and the tokens equal those of a cache that keeps every block.

use std::sync::atomic::Ordering;

use spindle_engine::{Engine, EngineConfig, EngineEvent, GenerateRequest, SamplingParams};
use spindle_model::{LoadFormat, LoadOptions};

const CONFIG: &str = r#"{"architectures": ["MistralForCausalLM"], "vocab_size": 320,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 1024, "sliding_window": 24, "tie_word_embeddings": true}"#;

fn generate(num_blocks: usize) -> (Vec<u32>, u64) {
    let dir = std::env::temp_dir().join(format!("spindle-swa-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("config.json");
    std::fs::write(&path, CONFIG).expect("config");
    let engine = Engine::spawn(EngineConfig {
        model: LoadOptions {
            model: path.display().to_string(),
            load_format: LoadFormat::Dummy,
            max_model_len: Some(512),
            ..LoadOptions::default()
        },
        num_blocks_override: Some(num_blocks),
        max_num_seqs: 4,
        max_num_batched_tokens: 64,
        ..EngineConfig::default()
    })
    .expect("engine starts");
    let mut params = SamplingParams::greedy(200);
    params.ignore_eos = true;
    let prompt: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 256).collect();
    let request = GenerateRequest::new("swa", prompt, params, engine.limits()).expect("valid");
    let mut stream = engine.generate(request).expect("submit");
    let mut tokens = Vec::new();
    loop {
        match stream.blocking_recv() {
            Some(EngineEvent::Delta(d)) => tokens.extend(d.token_ids),
            Some(EngineEvent::Finished { .. }) | None => break,
            Some(EngineEvent::Error(e)) => panic!("engine error: {e:?}"),
            Some(_) => {}
        }
    }
    let preemptions = engine.stats().preemptions_total.load(Ordering::Relaxed);
    (tokens, preemptions)
}

#[test]
fn a_small_cache_serves_a_long_sliding_window_sequence() {
    // 240 tokens need 15 blocks of 16; the small cache has 8 (128 tokens), enough for the
    // window (24) plus a step's chunk (64) plus two blocks, not for the sequence.
    let (kept, _) = generate(64);
    let (windowed, preemptions) = generate(8);
    assert_eq!(kept.len(), 200);
    assert_eq!(preemptions, 0, "the small cache had to preempt");
    assert_eq!(windowed, kept, "freeing blocks changed the tokens");
}
