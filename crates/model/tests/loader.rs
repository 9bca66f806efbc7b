//! Loading from every source, and clear errors (naming file and tensor) when a source is bad.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::*;
use spindle_model::{load, LoadFormat, LoadOptions, ModelError, ModelSource, TokenizerBundle};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spindle-loader-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn opts(model: &Path) -> LoadOptions {
    LoadOptions {
        model: model.display().to_string(),
        ..Default::default()
    }
}

fn err(result: spindle_model::Result<spindle_model::LoadedModel>) -> ModelError {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

const TINY_CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 300,
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "tie_word_embeddings": true}"#;

/// A complete tiny HF directory: config, random safetensors, tokenizer files.
fn write_hf_dir(dir: &Path, break_tensor: Option<&str>) {
    std::fs::write(dir.join("config.json"), TINY_CONFIG).unwrap();
    let loaded = load(&LoadOptions {
        model: dir.join("config.json").display().to_string(),
        load_format: LoadFormat::Dummy,
        ..Default::default()
    })
    .expect("dummy load");
    let c = loaded.model.config().clone();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let t = |shape: &[usize]| Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
    let (h, q, kv) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
    );
    tensors.push(("model.embed_tokens.weight".into(), t(&[c.vocab_size, h])));
    tensors.push(("model.norm.weight".into(), t(&[h])));
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![c.intermediate_size, h]),
            ("mlp.up_proj.weight", vec![c.intermediate_size, h]),
            ("mlp.down_proj.weight", vec![h, c.intermediate_size]),
        ] {
            let name = format!("{p}.{n}");
            let shape = if break_tensor == Some(name.as_str()) {
                vec![s[0] + 1, s[1..].iter().product()]
            } else {
                s
            };
            tensors.push((name, t(&shape)));
        }
    }
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
    let tok = TokenizerBundle::byte_fallback(c.vocab_size).unwrap();
    tok.tokenizer
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "<|endoftext|>", "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": [256, 257]}"#,
    )
    .unwrap();
}

#[test]
fn hf_directory_loads_and_runs() {
    let dir = temp_dir("hf-ok");
    write_hf_dir(&dir, None);
    assert_eq!(
        ModelSource::resolve(&opts(&dir)).unwrap(),
        ModelSource::HfDirectory(dir.clone())
    );
    let loaded = load(&opts(&dir)).expect("load HF dir");
    assert_eq!(loaded.info.architecture, "llama");
    assert_eq!(loaded.tokenizer.eos_token_ids, vec![256, 257]);
    assert!(loaded.tokenizer.chat_template.is_some());
    let mut runner = PagedRunner::new(&loaded.model, 1, 32, 16);
    let logits = runner.step(&loaded.model, &[(0, 0, vec![1, 2, 3])]);
    assert_eq!(logits.dims(), &[1, 300]);
}

#[test]
fn dummy_weights_have_the_configured_shapes() {
    let dir = temp_dir("dummy");
    std::fs::write(dir.join("config.json"), TINY_CONFIG).unwrap();
    let loaded = load(&LoadOptions {
        load_format: LoadFormat::Dummy,
        ..opts(&dir)
    })
    .expect("dummy");
    assert_eq!(loaded.info.vocab_size, 300);
    let mut runner = PagedRunner::new(&loaded.model, 1, 32, 16);
    let logits = runner.step(
        &loaded.model,
        &[(0, 0, loaded.tokenizer.encode("hi", false).unwrap())],
    );
    assert_eq!(logits.dims(), &[1, 300]);
}

#[test]
fn shape_mismatch_names_file_and_tensor() {
    let dir = temp_dir("hf-shape");
    write_hf_dir(&dir, Some("model.layers.1.mlp.up_proj.weight"));
    let e = err(load(&opts(&dir))).to_string();
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("hf-shape"),
        "{e}"
    );
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let dir = temp_dir("hf-notok");
    write_hf_dir(&dir, None);
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = err(load(&opts(&dir))).to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn unknown_architecture_is_a_clear_error() {
    let dir = temp_dir("hf-arch");
    write_hf_dir(&dir, None);
    std::fs::write(
        dir.join("config.json"),
        TINY_CONFIG.replace("LlamaForCausalLM", "GPT2LMHeadModel"),
    )
    .unwrap();
    let e = err(load(&opts(&dir)));
    assert!(
        matches!(e, ModelError::UnsupportedArchitecture(ref a) if a == "GPT2LMHeadModel"),
        "{e}"
    );
    // The message lists what is supported.
    let message = e.to_string();
    for family in [
        "llama", "qwen3", "gemma2", "gemma3", "smollm3", "olmo2", "granite",
    ] {
        assert!(message.contains(family), "{message}");
    }
}

#[test]
fn missing_and_truncated_gguf_are_clear_errors() {
    let e = err(load(&opts(Path::new("/nonexistent/model.gguf"))));
    assert!(e.to_string().contains("/nonexistent/model.gguf"), "{e}");

    let dir = temp_dir("gguf");
    let full = std::fs::read(default_model_path()).expect("default model (scripts/fetch-model.sh)");
    for (name, len) in [
        ("header.gguf", 20usize),
        ("meta.gguf", 200_000),
        ("data.gguf", full.len() / 2),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, &full[..len]).unwrap();
        let e = err(load(&opts(&path))).to_string();
        assert!(
            e.contains(name),
            "error for {name} does not name the file: {e}"
        );
    }
    let path = dir.join("garbage.gguf");
    std::fs::write(&path, b"definitely not a gguf file").unwrap();
    let e = err(load(&opts(&path))).to_string();
    assert!(e.contains("garbage.gguf"), "{e}");
}

#[test]
fn hub_errors_say_what_to_do() {
    let home = temp_dir("hf-home");
    std::env::set_var("HF_HOME", &home);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let e = err(load(&opts(Path::new("SomeOrg/some-model")))).to_string();
    assert!(
        e.contains("HF_HUB_OFFLINE") && e.contains("SomeOrg/some-model"),
        "{e}"
    );
    // Online but unreachable (a closed local port stands in for "no network").
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    let e = err(load(&opts(Path::new("SomeOrg/some-model@v2")))).to_string();
    assert!(
        e.contains("SomeOrg/some-model@v2") && e.contains("local"),
        "{e}"
    );
    std::env::remove_var("HF_ENDPOINT");
}

/// A checkpoint stored in bf16 runs with bf16 products under `--dtype bfloat16` (its weights
/// used as stored) and gives logits close to the float32 path on the same weights.
#[test]
fn bf16_checkpoint_runs_with_dtype_bfloat16() {
    if !spindle_model::cpu_bf16::supported() {
        println!("skipped: this CPU has no bf16 kernels (no AVX2)");
        return;
    }
    let dir = temp_dir("hf-bf16");
    write_hf_dir(&dir, None);
    let path = dir.join("model.safetensors");
    let stored = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let map: std::collections::HashMap<String, Tensor> = stored
        .into_iter()
        .map(|(name, t)| {
            let values: Vec<f32> = (0..t.elem_count())
                .map(|i| {
                    let v = ((i * 7919 + name.len() * 31) % 1000) as f32 / 1000.0 - 0.5;
                    if name.ends_with("norm.weight") {
                        1.0 + v * 0.1
                    } else {
                        v * 0.4
                    }
                })
                .collect();
            let t = Tensor::from_vec(values, t.shape(), &Device::Cpu)
                .unwrap()
                .to_dtype(candle_core::DType::BF16)
                .unwrap();
            (name, t)
        })
        .collect();
    candle_core::safetensors::save(&map, &path).unwrap();

    let exact = load(&LoadOptions {
        dtype: spindle_model::DTypeChoice::Float32,
        ..opts(&dir)
    })
    .expect("float32");
    let bf16 = load(&LoadOptions {
        dtype: spindle_model::DTypeChoice::BFloat16,
        ..opts(&dir)
    })
    .expect("bfloat16");
    assert_eq!(exact.info.dtype, "float32");
    assert_eq!(bf16.info.dtype, "bfloat16");
    let logits = |m: &spindle_model::LoadedModel| {
        let mut runner = PagedRunner::new(&m.model, 1, 32, 16);
        let l = runner.step(&m.model, &[(0, 0, vec![1, 2, 3, 4, 5])]);
        l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (a, b) = (logits(&exact), logits(&bf16));
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(scale > 0.0);
    // Activations rounded to 8 significant bits at each of the 2 layers' matmuls.
    assert!(worst <= 0.05 * scale, "worst {worst} of {scale}");
    assert_ne!(a, b, "bf16 products should not be the f32 path");
}
