//! Llama, Mistral, Qwen2 and Qwen3 on tiny random configs: the paged forward pass over a mixed
//! batch (prefills, chunked prefills and decodes at block-boundary positions) must equal a naive
//! contiguous-attention reference written here from the same weights.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use common::*;
use spindle_model::weights::WeightSource;
use spindle_model::{LlamaModel, ModelConfig};

/// Random weights kept in a map so the reference can read them too.
struct MapWeights(HashMap<String, Tensor>);

impl WeightSource for MapWeights {
    fn get(&mut self, name: &str, shape: &[usize]) -> spindle_model::Result<Tensor> {
        let t =
            self.0
                .get(name)
                .cloned()
                .ok_or_else(|| spindle_model::ModelError::MissingTensor {
                    path: "test".into(),
                    tensor: name.into(),
                })?;
        assert_eq!(t.dims(), shape, "{name}");
        Ok(t)
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
    fn origin(&self) -> String {
        "test".into()
    }
}

fn tiny_config(arch: &str, extra: &str) -> ModelConfig {
    let json = format!(
        r#"{{"architectures": ["{arch}"], "vocab_size": 97, "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "max_position_embeddings": 256 {extra}}}"#
    );
    ModelConfig::from_hf_json(&json).expect("tiny config")
}

fn random_weights(c: &ModelConfig, seed: u64) -> HashMap<String, Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut map = HashMap::new();
    let mut add = |name: String, shape: &[usize], scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| offset + scale * rng.random_range(-1.0f32..1.0))
            .collect();
        map.insert(name, Tensor::from_vec(data, shape, &Device::Cpu).unwrap());
    };
    let (h, q, kv, i) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    add(
        "model.embed_tokens.weight".into(),
        &[c.vocab_size, h],
        1.0,
        0.0,
    );
    add("model.norm.weight".into(), &[h], 0.2, 1.0);
    if !c.tie_word_embeddings {
        add("lm_head.weight".into(), &[c.vocab_size, h], 0.2, 0.0);
    }
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), &[h], 0.2, 1.0);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            0.2,
            1.0,
        );
        add(format!("{p}.self_attn.q_proj.weight"), &[q, h], 0.2, 0.0);
        add(format!("{p}.self_attn.k_proj.weight"), &[kv, h], 0.2, 0.0);
        add(format!("{p}.self_attn.v_proj.weight"), &[kv, h], 0.2, 0.0);
        add(format!("{p}.self_attn.o_proj.weight"), &[h, q], 0.2, 0.0);
        add(format!("{p}.mlp.gate_proj.weight"), &[i, h], 0.2, 0.0);
        add(format!("{p}.mlp.up_proj.weight"), &[i, h], 0.2, 0.0);
        add(format!("{p}.mlp.down_proj.weight"), &[h, i], 0.2, 0.0);
        if c.qkv_bias {
            add(format!("{p}.self_attn.q_proj.bias"), &[q], 0.2, 0.0);
            add(format!("{p}.self_attn.k_proj.bias"), &[kv], 0.2, 0.0);
            add(format!("{p}.self_attn.v_proj.bias"), &[kv], 0.2, 0.0);
        }
        if c.qk_norm {
            add(
                format!("{p}.self_attn.q_norm.weight"),
                &[c.head_dim],
                0.2,
                1.0,
            );
            add(
                format!("{p}.self_attn.k_norm.weight"),
                &[c.head_dim],
                0.2,
                1.0,
            );
        }
    }
    map
}

fn rms(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let normed = x
        .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
        .unwrap();
    normed.broadcast_mul(w).unwrap()
}

/// HF's `rotate_half` rope on `[tokens, heads, dim]` at positions `0..tokens`.
fn rope(x: &Tensor, c: &ModelConfig) -> Tensor {
    let (t, _, d) = x.dims3().unwrap();
    let half = d / 2;
    let mut cos = vec![0f32; t * d];
    let mut sin = vec![0f32; t * d];
    for p in 0..t {
        for j in 0..d {
            let freq = 1.0 / c.rope_theta.powf(2.0 * (j % half) as f64 / d as f64);
            let angle = p as f64 * freq;
            cos[p * d + j] = angle.cos() as f32;
            sin[p * d + j] = angle.sin() as f32;
        }
    }
    let cos = Tensor::from_vec(cos, (t, 1, d), &Device::Cpu).unwrap();
    let sin = Tensor::from_vec(sin, (t, 1, d), &Device::Cpu).unwrap();
    let x1 = x.narrow(2, 0, half).unwrap();
    let x2 = x.narrow(2, half, half).unwrap();
    let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], 2).unwrap();
    (x.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap()
}

/// Naive full-sequence forward: logits of the last token.
fn reference_last_logits(c: &ModelConfig, w: &HashMap<String, Tensor>, tokens: &[u32]) -> Vec<f32> {
    let g = |n: &str| w.get(n).unwrap_or_else(|| panic!("{n}")).clone();
    let lin = |x: &Tensor, n: &str| x.matmul(&g(n).t().unwrap()).unwrap();
    let t = tokens.len();
    let ids = Tensor::new(tokens, &Device::Cpu).unwrap();
    let mut x = g("model.embed_tokens.weight")
        .index_select(&ids, 0)
        .unwrap();
    let group = c.num_heads / c.num_kv_heads;
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let h = rms(
            &x,
            &g(&format!("{p}.input_layernorm.weight")),
            c.rms_norm_eps,
        );
        let mut q = lin(&h, &format!("{p}.self_attn.q_proj.weight"));
        let mut k = lin(&h, &format!("{p}.self_attn.k_proj.weight"));
        let mut v = lin(&h, &format!("{p}.self_attn.v_proj.weight"));
        if c.qkv_bias {
            q = q
                .broadcast_add(&g(&format!("{p}.self_attn.q_proj.bias")))
                .unwrap();
            k = k
                .broadcast_add(&g(&format!("{p}.self_attn.k_proj.bias")))
                .unwrap();
            v = v
                .broadcast_add(&g(&format!("{p}.self_attn.v_proj.bias")))
                .unwrap();
        }
        let mut q = q.reshape((t, c.num_heads, c.head_dim)).unwrap();
        let mut k = k.reshape((t, c.num_kv_heads, c.head_dim)).unwrap();
        let v = v.reshape((t, c.num_kv_heads, c.head_dim)).unwrap();
        if c.qk_norm {
            q = rms(
                &q,
                &g(&format!("{p}.self_attn.q_norm.weight")),
                c.rms_norm_eps,
            );
            k = rms(
                &k,
                &g(&format!("{p}.self_attn.k_norm.weight")),
                c.rms_norm_eps,
            );
        }
        let (q, k) = (rope(&q, c), rope(&k, c));
        let mut heads = Vec::new();
        for hd in 0..c.num_heads {
            let qh = q.narrow(1, hd, 1).unwrap().squeeze(1).unwrap();
            let kh = k.narrow(1, hd / group, 1).unwrap().squeeze(1).unwrap();
            let vh = v.narrow(1, hd / group, 1).unwrap().squeeze(1).unwrap();
            let scores =
                (qh.matmul(&kh.t().unwrap()).unwrap() / (c.head_dim as f64).sqrt()).unwrap();
            let mask: Vec<f32> = (0..t * t)
                .map(|i| {
                    if i % t > i / t {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
            let probs = candle_nn::ops::softmax_last_dim(&(scores + mask).unwrap()).unwrap();
            heads.push(probs.matmul(&vh).unwrap());
        }
        let attn = Tensor::cat(&heads, 1).unwrap();
        x = (x + lin(&attn, &format!("{p}.self_attn.o_proj.weight"))).unwrap();
        let h = rms(
            &x,
            &g(&format!("{p}.post_attention_layernorm.weight")),
            c.rms_norm_eps,
        );
        let gate = lin(&h, &format!("{p}.mlp.gate_proj.weight"));
        let up = lin(&h, &format!("{p}.mlp.up_proj.weight"));
        let act = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
        x = (x + lin(&act, &format!("{p}.mlp.down_proj.weight"))).unwrap();
    }
    let last = x.narrow(0, t - 1, 1).unwrap();
    let last = rms(&last, &g("model.norm.weight"), c.rms_norm_eps);
    let head = if c.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    last.matmul(&g(head).t().unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn check_arch(config: ModelConfig) {
    check_arch_with_blocks(config, 4);
}

/// Paged forward passes (whole and chunked prefill, decode) against the contiguous reference,
/// with sequence lengths around multiples of `block`.
fn check_arch_with_blocks(config: ModelConfig, block: usize) {
    let weights = random_weights(&config, 42);
    let model = LlamaModel::load(
        config.clone(),
        &mut MapWeights(weights.clone()),
        256,
        DType::F32,
        &Device::Cpu,
        |_, _| {},
    )
    .expect("load tiny model");
    // Sequences of lengths around block boundaries.
    let lengths = [
        block - 1,
        block,
        block + 1,
        2 * block,
        3 * block + 1,
        4 * block + 1,
    ];
    let seqs: Vec<Vec<u32>> = lengths
        .iter()
        .enumerate()
        .map(|(s, &len)| {
            (0..len)
                .map(|i| ((s * 31 + i * 7) % config.vocab_size) as u32)
                .collect()
        })
        .collect();
    let mut runner = PagedRunner::new(&model, seqs.len(), 8 * block, block);
    // Step 1: sequences 0..3 prefill whole; 3..6 prefill all but their last 4 tokens in chunks.
    let mut done = vec![0usize; seqs.len()];
    let mut chunks = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        let n = if i < 3 { s.len() } else { s.len() - 4 };
        chunks.push((i, 0, s[..n].to_vec()));
        done[i] = n;
    }
    runner.step(&model, &chunks);
    // Step 2: chunked prefills continue with 3 tokens, plus decodes of the first three, which
    // also get one new token each (positions land on block boundaries for some).
    let mut extended = seqs.clone();
    let mut chunks = Vec::new();
    for (i, s) in extended.iter_mut().enumerate() {
        if i < 3 {
            s.push((i * 5 + 1) as u32 % config.vocab_size as u32);
            chunks.push((i, done[i], vec![*s.last().unwrap()]));
            done[i] += 1;
        } else {
            chunks.push((i, done[i], s[done[i]..done[i] + 3].to_vec()));
            done[i] += 3;
        }
    }
    let logits: Vec<Vec<f32>> = runner.step(&model, &chunks).to_vec2().unwrap();
    for (row, (i, _, _)) in logits.iter().zip(&chunks) {
        let want = reference_last_logits(&config, &weights, &extended[*i][..done[*i]]);
        let err = row
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = want.iter().map(|x| x.abs()).fold(0f32, f32::max);
        assert!(
            err <= 1e-4 * scale.max(1.0),
            "{:?} seq {i}: max error {err} (scale {scale})",
            config.architecture
        );
    }
    // Step 3: the last token of each chunked prefill plus more decodes.
    let mut chunks = Vec::new();
    for (i, s) in extended.iter_mut().enumerate() {
        if i >= 3 {
            chunks.push((i, done[i], vec![s[done[i]]]));
            done[i] += 1;
        } else {
            s.push(7);
            chunks.push((i, done[i], vec![7]));
            done[i] += 1;
        }
    }
    let logits: Vec<Vec<f32>> = runner.step(&model, &chunks).to_vec2().unwrap();
    for (row, (i, _, _)) in logits.iter().zip(&chunks) {
        let want = reference_last_logits(&config, &weights, &extended[*i][..done[*i]]);
        let err = row
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = want.iter().map(|x| x.abs()).fold(0f32, f32::max);
        assert!(
            err <= 1e-4 * scale.max(1.0),
            "{:?} seq {i} step 3: max error {err}",
            config.architecture
        );
    }
}

#[test]
fn llama_paged_equals_reference() {
    check_arch(tiny_config(
        "LlamaForCausalLM",
        r#", "tie_word_embeddings": true"#,
    ));
}

/// Head sizes (64, 128) with 16-token blocks take the CPU backend's vectorized kernel instead of
/// the portable one; check it against the reference too, with GQA groups of 1 to 5 query heads
/// (the kernel takes up to four heads per pass).
#[test]
fn llama_paged_equals_reference_at_kernel_head_sizes() {
    for (head_dim, heads, kv_heads) in [(64, 4, 2), (128, 3, 3), (64, 5, 1), (64, 3, 1)] {
        let mut c = tiny_config("LlamaForCausalLM", "");
        c.head_dim = head_dim;
        c.num_heads = heads;
        c.num_kv_heads = kv_heads;
        for block in [4, 16] {
            check_arch_with_blocks(c.clone(), block);
        }
    }
}

#[test]
fn mistral_paged_equals_reference() {
    check_arch(tiny_config("MistralForCausalLM", ""));
}

#[test]
fn qwen2_paged_equals_reference() {
    let c = tiny_config("Qwen2ForCausalLM", r#", "tie_word_embeddings": true"#);
    assert!(c.qkv_bias);
    check_arch(c);
}

#[test]
fn qwen3_paged_equals_reference() {
    let c = tiny_config("Qwen3ForCausalLM", r#", "attention_bias": false"#);
    assert!(c.qk_norm && !c.qkv_bias);
    check_arch(c);
}

#[test]
fn llama3_rope_scaling_is_parsed() {
    let c = tiny_config(
        "LlamaForCausalLM",
        r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
    );
    let Some(spindle_model::RopeScaling::Llama3(s)) = c.rope_scaling else {
        panic!("llama3 scaling: {:?}", c.rope_scaling)
    };
    assert_eq!(s.factor, 8.0);
    assert_eq!(s.original_max_position_embeddings, 8192);
}

/// transformers v5 writes rope settings as `rope_parameters`: read as the v4 keys would be
/// (a Llama with llama3 scaling saved that way ran with theta 10000 and no scaling before).
#[test]
fn v5_rope_parameters_match_the_v4_keys() {
    let cfg = |extra: &str| {
        ModelConfig::from_hf_json(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], "vocab_size": 97, "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, {extra}}}"#
        ))
        .expect("config")
    };
    let v4 = cfg(
        r#""rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
    );
    let v5 = cfg(
        r#""rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
    );
    assert_eq!(v4.rope_theta, 500000.0);
    assert!(v4.rope_scaling.is_some());
    assert_eq!(v4, v5);
    // Both forms at once, agreeing, are fine too.
    let both = cfg(
        r#""rope_theta": 500000.0, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
    );
    assert_eq!(both, v4);
    let plain = cfg(r#""rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}"#);
    assert_eq!((plain.rope_theta, plain.rope_scaling), (1_000_000.0, None));
}

/// MoE settings that cannot run are refused with the reason.
#[test]
fn moe_settings_out_of_range_are_refused() {
    let base = r#"{"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 97, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256"#;
    let parse = |extra: &str| ModelConfig::from_hf_json(&format!("{base}, {extra}}}"));
    let ok = parse(r#""num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "mlp_only_layers": [0]"#)
        .expect("valid MoE config");
    let moe = ok.moe.as_ref().expect("experts");
    assert_eq!(
        (moe.num_experts, moe.top_k, moe.expert_intermediate),
        (8, 2, 32)
    );
    assert_eq!(moe.sparse_layers, vec![false, true]);
    assert!(ok.active_parameters() < ok.num_parameters());
    for (extra, says) in [
        (
            r#""num_experts": 8, "num_experts_per_tok": 9"#,
            "num_experts_per_tok",
        ),
        (
            r#""num_experts": 8, "num_experts_per_tok": 0"#,
            "num_experts_per_tok",
        ),
        (r#""num_experts_per_tok": 2"#, "num_experts"),
        (r#""num_experts": 8"#, "num_experts_per_tok"),
        (
            r#""num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 0"#,
            "decoder_sparse_step",
        ),
        (
            r#""num_experts": 8, "num_experts_per_tok": 2, "mlp_only_layers": "all""#,
            "mlp_only_layers",
        ),
        (
            r#""num_experts": -1, "num_experts_per_tok": 2"#,
            "num_experts",
        ),
    ] {
        let err = parse(extra).expect_err(extra).to_string();
        assert!(err.contains(says), "{extra}: {err}");
    }
}

/// A rope or config setting that is present but not understood is an error, never a default.
#[test]
fn settings_not_understood_are_refused() {
    let base = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 97, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256"#;
    for extra in [
        r#""rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "extra": 1}"#,
        r#""rope_scaling": {"type": "linear"}"#,
        r#""rope_scaling": {"type": "longrope", "factor": 2.0}"#,
        r#""rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}"#,
        r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#,
        r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "beta_fast": 32}"#,
        r#""rope_local_base_freq": 10000.0"#,
        r#""query_pre_attn_scalar": 256"#,
        r#""logits_scaling": 8.0"#,
        r#""layer_types": ["full_attention"]"#,
        r#""sliding_window": 0"#,
        r#""rope_parameters": {"rope_theta": 10000.0, "factor": 8.0}"#,
        r#""rope_theta": 10000.0, "rope_parameters": {"rope_theta": 500000.0}"#,
        r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, "rope_parameters": {"rope_type": "default"}"#,
        r#""rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}"#,
        r#""hidden_act": "gelu_pytorch_tanh""#,
        r#""mlp_bias": true"#,
        r#""partial_rotary_factor": 0.5"#,
        r#""attn_logit_softcapping": 50.0"#,
        r#""no_rope_layer_interval": 4"#,
        r#""num_local_experts": 4, "num_experts_per_tok": 2"#,
        r#""moe_intermediate_size": 32"#,
        r#""clip_qkv": 2.0"#,
    ] {
        let json = format!("{base}, {extra}}}");
        assert!(
            ModelConfig::from_hf_json(&json).is_err(),
            "accepted: {extra}"
        );
    }
    for extra in [
        r#""hidden_act": "silu""#,
        r#""mlp_bias": false"#,
        r#""attn_logit_softcapping": null"#,
        r#""rope_scaling": null"#,
        r#""partial_rotary_factor": 1.0"#,
        r#""rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}"#,
        r#""rope_scaling": {"type": "linear", "factor": 2.0}"#,
    ] {
        let json = format!("{base}, {extra}}}");
        assert!(ModelConfig::from_hf_json(&json).is_ok(), "refused: {extra}");
    }
}

/// Mistral's window is run for real (every layer slides; the context is not capped); a Qwen
/// window in force is not run, so it caps the context (exact attention there, as vLLM's
/// --disable-sliding-window); a window Qwen does not use leaves it alone.
#[test]
fn sliding_windows_slide_or_cap_the_context() {
    let c = tiny_config("MistralForCausalLM", r#", "sliding_window": 128"#);
    assert_eq!(c.max_position_embeddings, 256);
    assert_eq!(c.family.sliding_window, Some(128));
    assert!(c.family.all_sliding(c.num_layers));
    let c = tiny_config("Qwen2ForCausalLM", r#", "sliding_window": 128"#);
    assert_eq!(c.max_position_embeddings, 128);
    let c = tiny_config(
        "Qwen2ForCausalLM",
        r#", "sliding_window": 128, "use_sliding_window": false"#,
    );
    assert_eq!(c.max_position_embeddings, 256);
    let c = tiny_config("MistralForCausalLM", r#", "sliding_window": null"#);
    assert_eq!(c.max_position_embeddings, 256);
    assert_eq!(c.family.sliding_window, None);
}

/// llama.cpp's `rope_freqs.weight` for a Llama 3.x model holds, per frequency, the divisor that
/// turns the plain inverse frequency into the llama3-scaled one (as its converter computes it):
/// applying those factors gives the llama3 table.
#[test]
fn gguf_rope_freq_factors_reproduce_llama3_scaling() {
    use spindle_model::rope::inverse_frequencies;
    let scaling = spindle_model::RopeScaling::Llama3(spindle_model::Llama3RopeScaling {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    });
    let (head_dim, theta) = (64, 500000.0);
    let plain = inverse_frequencies(head_dim, theta, None, None);
    let scaled = inverse_frequencies(head_dim, theta, Some(&scaling), None);
    // The converter's factors: how much each frequency was divided by, stored as f32.
    let factors: Vec<f64> = plain
        .iter()
        .zip(&scaled)
        .map(|(p, s)| f64::from((p / s) as f32))
        .collect();
    assert!(factors.iter().any(|&f| f > 1.0) && factors[0] == 1.0);
    let from_gguf = inverse_frequencies(head_dim, theta, None, Some(&factors));
    for (a, b) in from_gguf.iter().zip(&scaled) {
        assert!((a - b).abs() <= 1e-6 * b, "{a} vs {b}");
    }
}
