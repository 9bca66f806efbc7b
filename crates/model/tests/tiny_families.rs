//! Every family (dense and mixture-of-experts) on a tiny checkpoint transformers v5 configured
//! (`tests/golden/tiny-*`, made by `scripts/golden/make_tiny_families.py`; the weights are filled
//! from the scripts' integer hash, none stored): the paged forward pass matches transformers' fp32 logits on
//! sequences shorter and longer than the sliding window, greedy decoding after a (chunked)
//! prefill gives transformers' tokens, and a sequence's logits are bit-identical alone or
//! batched with others.

mod common;

use common::hash_weights::HashWeights;
use common::repo_root;
use common::tiny::{check, golden, load_hashed as load, logits_of, max_err, Golden, FAMILIES};
use spindle_model::{Architecture, ModelConfig};

#[test]
fn qwen3_matches_transformers() {
    check("tiny-qwen3", Architecture::Qwen3);
}

#[test]
fn gemma2_matches_transformers() {
    check("tiny-gemma2", Architecture::Gemma2);
}

#[test]
fn gemma3_matches_transformers() {
    check("tiny-gemma3", Architecture::Gemma3);
}

#[test]
fn smollm3_matches_transformers() {
    check("tiny-smollm3", Architecture::SmolLM3);
}

#[test]
fn olmo2_matches_transformers() {
    check("tiny-olmo2", Architecture::Olmo2);
}

#[test]
fn granite_matches_transformers() {
    check("tiny-granite", Architecture::Granite);
}

#[test]
fn phi3_with_partial_rotary_and_longrope_matches_transformers() {
    check("tiny-phi3", Architecture::Phi3);
}

#[test]
fn llama_with_yarn_matches_transformers() {
    check("tiny-llama-yarn", Architecture::Llama);
}

#[test]
fn mistral_with_a_sliding_window_matches_transformers() {
    check("tiny-mistral-window", Architecture::Mistral);
}

#[test]
fn mixtral_matches_transformers() {
    check("tiny-mixtral", Architecture::Mixtral);
}

#[test]
fn qwen2_moe_with_a_shared_expert_matches_transformers() {
    check("tiny-qwen2-moe", Architecture::Qwen2Moe);
}

#[test]
fn qwen3_moe_matches_transformers() {
    check("tiny-qwen3-moe", Architecture::Qwen3Moe);
    // With a dense layer between sparse ones (`mlp_only_layers`).
    check("tiny-qwen3-moe-mixed", Architecture::Qwen3Moe);
}

#[test]
fn gpt_oss_matches_transformers() {
    check("tiny-gpt-oss", Architecture::GptOss);
}

#[test]
fn olmoe_matches_transformers() {
    check("tiny-olmoe", Architecture::Olmoe);
    check("tiny-olmoe-clip", Architecture::Olmoe);
}

/// The references depend on each mechanism the families add: run without it, the long
/// sequence's logits are far from transformers' (so the tests above would catch its loss).
#[test]
fn each_mechanism_changes_the_reference() {
    type Ablation = fn(&mut ModelConfig);
    let cases: [(&str, &str, Ablation); 17] = [
        ("tiny-mistral-window", "no window", |c| {
            c.family.layers.iter_mut().for_each(|l| l.sliding = false)
        }),
        ("tiny-gemma2", "no window", |c| {
            c.family.layers.iter_mut().for_each(|l| l.sliding = false)
        }),
        ("tiny-gemma2", "no attention soft-cap", |c| {
            c.family.attn_softcap = None
        }),
        ("tiny-gemma3", "no local rope", |c| c.local_rope = None),
        ("tiny-smollm3", "rope everywhere", |c| {
            c.family.layers.iter_mut().for_each(|l| l.rope = true)
        }),
        ("tiny-granite", "no residual multiplier", |c| {
            c.family.residual_scale = None
        }),
        ("tiny-llama-yarn", "no YaRN", |c| c.rope_scaling = None),
        ("tiny-phi3", "no longrope", |c| c.rope_scaling = None),
        ("tiny-phi3", "rope over the whole head", |c| {
            c.family.rotary_dim = None
        }),
        ("tiny-mixtral", "one expert per token", |c| {
            c.moe.as_mut().expect("moe").top_k = 1
        }),
        ("tiny-qwen3-moe", "no renormalized top-k", |c| {
            c.moe.as_mut().expect("moe").renormalize = false
        }),
        ("tiny-qwen2-moe", "renormalized top-k", |c| {
            c.moe.as_mut().expect("moe").renormalize = true
        }),
        ("tiny-qwen2-moe", "no shared expert", |c| {
            c.moe.as_mut().expect("moe").shared_expert_intermediate = None
        }),
        ("tiny-olmoe-clip", "no q/k/v clamp", |c| c.clip_qkv = None),
        ("tiny-gpt-oss", "no attention sinks", |c| {
            c.attention_sinks = false
        }),
        ("tiny-gpt-oss", "no window", |c| {
            c.family.layers.iter_mut().for_each(|l| l.sliding = false)
        }),
        ("tiny-gpt-oss", "plain SwiGLU", |c| {
            c.family.activation = spindle_model::config::Activation::Silu
        }),
    ];
    for (dir, what, ablate) in cases {
        let mut g = golden(dir);
        ablate(&mut g.config);
        let model = load(&g);
        let long = g.seqs.len() - 1;
        let got = logits_of(&model, &g.seqs[long]);
        let err = max_err(&got, &g.logits[long]);
        eprintln!("{dir} with {what}: max logit error {err:.2e}");
        assert!(
            err > 1e-2,
            "{dir}: {what} does not change the reference ({err})"
        );
    }
}

/// A word-level tokenizer over the tiny vocabulary (`t0` … `t127`): the directory needs one to
/// load, the test feeds token ids directly.
fn tokenizer_json(vocab: usize) -> String {
    let entries: Vec<String> = (0..vocab).map(|i| format!("\"t{i}\": {i}")).collect();
    format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {{"type": "Whitespace"}}, "post_processor": null,
        "decoder": null, "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "t0"}}}}"#,
        entries.join(", ")
    )
}

/// Writes `dir_name`'s checkpoint as a Hugging Face directory (transformers' config.json, the
/// hash weights as safetensors, a tokenizer) under the temp dir; returns it.
/// `tag` keeps tests running in parallel apart.
fn hf_dir(dir_name: &str, g: &Golden, tag: &str) -> std::path::PathBuf {
    use spindle_model::weights::WeightSource;
    let src = repo_root().join("tests/golden").join(dir_name);
    let dir = std::env::temp_dir().join(format!(
        "spindle-families-{}-{tag}-{dir_name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).expect("config");
    let mut hash = HashWeights(g.names.clone());
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = g
        .names
        .iter()
        .map(|n| (n.clone(), hash.get(n, &g.shapes[n]).expect("hash tensor")))
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).expect("save");
    std::fs::write(
        dir.join("tokenizer.json"),
        tokenizer_json(g.config.vocab_size),
    )
    .expect("tokenizer");
    dir
}

fn load_dir(
    dir: &std::path::Path,
    dtype: spindle_model::DTypeChoice,
) -> spindle_model::LoadedModel {
    spindle_model::load(&spindle_model::LoadOptions {
        model: dir.display().to_string(),
        dtype,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Each family through the real loader: a Hugging Face directory loads as its family and gives
/// transformers' logits under `--dtype float32`.
#[test]
fn hf_directories_load_and_match() {
    for dir_name in FAMILIES {
        let g = golden(dir_name);
        let dir = hf_dir(dir_name, &g, "f32");
        let loaded = load_dir(&dir, spindle_model::DTypeChoice::Float32);
        assert_eq!(
            loaded.info.architecture,
            g.config.architecture.as_str(),
            "{dir_name}"
        );
        let long = g.seqs.len() - 1;
        let got = logits_of(&loaded.model, &g.seqs[long]);
        let err = max_err(&got, &g.logits[long]);
        assert!(err < 1e-3, "{dir_name} from its HF directory: error {err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The default CPU arithmetic (`--dtype auto`: bf16 products where the CPU has them, bf16 KV
/// cache) meets vLLM's `check_logprobs_close` against transformers' fp32 continuation.
#[test]
fn default_arithmetic_passes_check_logprobs_close() {
    for dir_name in FAMILIES {
        let g = golden(dir_name);
        let dir = hf_dir(dir_name, &g, "auto");
        let loaded = load_dir(&dir, spindle_model::DTypeChoice::Auto);
        match common::logprobs_close(&loaded.model, &g.prompt, &g.greedy, &g.top5) {
            Ok(n) => eprintln!(
                "{dir_name} ({}): {n}/{} reference tokens before divergence",
                loaded.info.dtype,
                g.greedy.len()
            ),
            Err(e) => panic!("{dir_name} ({}): {e}", loaded.info.dtype),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
