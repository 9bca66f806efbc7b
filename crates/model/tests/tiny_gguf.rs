//! Every family from a GGUF as llama.cpp's own converter writes it (MoE experts stacked in one
//! 3-D tensor per projection, `ffn_*_exps`). The GGUFs are not
//! stored: `scripts/golden/make_tiny_gguf_manifests.py` ran llama.cpp's `convert_hf_to_gguf`
//! classes on each tiny checkpoint and recorded its metadata and, per tensor, the HF source and
//! the converter's transform (`tests/golden/tiny-*/gguf.json`). This test rebuilds that GGUF from
//! the hash weights and checks that spindle's GGUF reader (names, un-permutation, metadata,
//! llama.cpp's per-family rules) gives transformers' fp32 logits.

mod common;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::argmax;
use common::gguf_write::{self, TensorData};
use common::hash_weights::HashWeights;
use common::tiny::{get, golden, golden_json, logits_of, max_err, Golden, FAMILIES};
use serde_json::Value as Json;
use spindle_model::gguf::{GgufFile, GgufWeights};
use spindle_model::weights::WeightSource;
use spindle_model::LlamaModel;

/// A manifest value as the GGUF type the converter wrote (integers u32, reals f32).
fn gguf_value(v: &Json) -> Value {
    match v {
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) if n.is_u64() => Value::U32(n.as_u64().expect("u64") as u32),
        Json::Number(n) => Value::F32(n.as_f64().expect("f64") as f32),
        Json::String(s) => Value::String(s.clone()),
        Json::Array(a) => Value::Array(a.iter().map(gguf_value).collect()),
        other => panic!("unexpected metadata value {other}"),
    }
}

/// llama.cpp's `permute(w, n_head)`.
fn permute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().expect("2-D");
    w.reshape((heads, 2, rows / heads / 2, cols))
        .and_then(|t| t.transpose(1, 2))
        .and_then(|t| t.contiguous())
        .and_then(|t| t.reshape((rows, cols)))
        .expect("permute")
}

/// Writes the converter's f32 GGUF for `dir` to a temporary file; returns its path.
fn rebuild(dir: &str) -> std::path::PathBuf {
    rebuild_as(dir, GgmlDType::F32)
}

/// [`rebuild`] with the matrices (2-D tensors) stored as `matrices` (e.g. Q8_0, as
/// `llama-quantize` would).
fn rebuild_as(dir: &str, matrices: GgmlDType) -> std::path::PathBuf {
    let g = golden(dir);
    let manifest = golden_json(dir, "gguf.json");
    let mut hash = HashWeights(g.names.clone());
    let vocab = g.config.vocab_size;
    let mut metadata: Vec<(String, Value)> = vec![
        (
            "general.architecture".into(),
            Value::String(get(&manifest["architecture"])),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array((0..vocab).map(|i| Value::String(format!("t{i}"))).collect()),
        ),
    ];
    for (k, v) in manifest["metadata"].as_object().expect("metadata") {
        metadata.push((k.clone(), gguf_value(v)));
    }
    let mut tensors: Vec<(String, TensorData)> = Vec::new();
    for t in manifest["tensors"].as_array().expect("tensors") {
        let shape: Vec<usize> = get(&t["shape"]);
        if let Some(values) = t.get("values") {
            // Made by the converter itself (Phi-3's rope factors).
            let values: Vec<f32> = get(values);
            let w = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).expect("values");
            let q = QTensor::quantize(&w, GgmlDType::F32).expect("f32 tensor");
            tensors.push((get(&t["name"]), TensorData::Candle(q)));
            continue;
        }
        if t["transform"] == "mxfp4" {
            // gpt-oss's experts, repacked by the converter, kept MXFP4 by llama-quantize.
            let [blocks, scales]: [String; 2] = get(&t["hf"]);
            let rows: String = get(&t["rows"]);
            let bytes = ggml_mxfp4(&mut hash, &g, &blocks, &scales, &rows);
            let raw = TensorData::Raw {
                ggml_type: 39,
                shape,
                bytes,
            };
            tensors.push((get(&t["name"]), raw));
            continue;
        }
        if t["transform"] == "stack" {
            // A MoE layer's experts in one 3-D tensor, quantized as a whole by llama-quantize.
            let parts: Vec<String> = get(&t["hf"]);
            let experts: Vec<Tensor> = parts
                .iter()
                .map(|hf| hash.get(hf, &g.shapes[hf]).expect("hash tensor"))
                .collect();
            let w = Tensor::stack(&experts, 0).expect("stack");
            assert_eq!(w.dims(), shape.as_slice(), "{parts:?}");
            let q = QTensor::quantize(&w, matrices).expect("quantize");
            tensors.push((get(&t["name"]), TensorData::Candle(q)));
            continue;
        }
        let hf: String = get(&t["hf"]);
        let mut w = hash.get(&hf, &g.shapes[&hf]).expect("hash tensor");
        w = match t["transform"].as_str().expect("transform") {
            "identity" => w,
            "plus_one" => (w + 1.0).expect("+1"),
            "permute" if hf.contains("q_proj") => permute(&w, g.config.num_heads),
            "permute" => permute(&w, g.config.num_kv_heads),
            "even_cols" | "odd_cols" => {
                // gpt-oss's gate (even) and up (odd) biases, interleaved in `gate_up_proj_bias`.
                let first = usize::from(t["transform"] == "odd_cols");
                let cols = w.dims()[w.rank() - 1];
                let pick: Vec<u32> = (first..cols).step_by(2).map(|c| c as u32).collect();
                let pick = Tensor::new(pick.as_slice(), &Device::Cpu).expect("index");
                w.index_select(&pick, w.rank() - 1).expect("columns")
            }
            other => panic!("unknown transform {other}"),
        };
        assert_eq!(w.dims(), shape.as_slice(), "{hf}");
        let name: String = get(&t["name"]);
        // llama-quantize leaves routers (`ffn_gate_inp`, `ffn_gate_inp_shexp`) in f32.
        let kind = if shape.len() == 2 && !name.contains("ffn_gate_inp") {
            matrices
        } else {
            GgmlDType::F32
        };
        let q = QTensor::quantize(&w, kind).expect("quantize");
        tensors.push((get(&t["name"]), TensorData::Candle(q)));
    }
    let path = std::env::temp_dir().join(format!(
        "spindle-tiny-{}-{dir}-{matrices:?}.gguf",
        std::process::id()
    ));
    gguf_write::write(&path, &metadata, &tensors);
    path
}

/// ggml's `block_mxfp4` bytes (`[experts, rows, cols / 32 * 17]`) of the checkpoint's MXFP4
/// `blocks`/`scales` (hash bytes), rows `all`, `even` (gate) or `odd` (up): the scale byte,
/// then value j in the low and value j + 16 in the high nibble of byte j, where the checkpoint
/// holds value 2j low and 2j + 1 high in its byte j.
fn ggml_mxfp4(
    hash: &mut HashWeights,
    g: &Golden,
    blocks: &str,
    scales: &str,
    rows: &str,
) -> Vec<u8> {
    let b_shape = &g.shapes[blocks];
    let (experts, all_rows, per_row) = (b_shape[0], b_shape[1], b_shape[2]);
    let b = hash.get_bytes(blocks, b_shape).expect("blocks");
    let s = hash.get_bytes(scales, &g.shapes[scales]).expect("scales");
    let picked: Vec<usize> = match rows {
        "all" => (0..all_rows).collect(),
        "even" => (0..all_rows).step_by(2).collect(),
        "odd" => (1..all_rows).step_by(2).collect(),
        other => panic!("unknown rows {other}"),
    };
    let mut out = Vec::new();
    for e in 0..experts {
        for &r in &picked {
            for k in 0..per_row {
                let block = (e * all_rows + r) * per_row + k;
                let nibbles = &b[block * 16..block * 16 + 16];
                let v = |i: usize| (nibbles[i / 2] >> (4 * (i % 2))) & 0x0F;
                out.push(s[block]);
                out.extend((0..16).map(|j| v(j) | (v(j + 16) << 4)));
            }
        }
    }
    out
}

/// Loads the rebuilt GGUF of `dir` through spindle's GGUF reader (f32 serving, quantized
/// blocks kept), then deletes the file.
fn load_and_remove(path: &std::path::Path, dir: &str) -> LlamaModel {
    let mut file = GgufFile::open(path).expect("open");
    let config = file.config().unwrap_or_else(|e| panic!("{dir}: {e}"));
    let model = {
        let mut weights = GgufWeights::new(&mut file, &config, DType::F32, Device::Cpu);
        LlamaModel::load(
            config.clone(),
            &mut weights,
            256,
            DType::F32,
            &Device::Cpu,
            |_, _| {},
        )
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
    };
    let _ = std::fs::remove_file(path);
    model
}

/// `longest`: llama.cpp's converter drops Mistral's `sliding_window` (llama.cpp runs it with full
/// attention), so that GGUF is compared only on sequences inside the window.
fn check_up_to(dir: &str, longest: usize) {
    let model = load_and_remove(&rebuild(dir), dir);
    let g = golden(dir);
    for (i, (ids, want)) in g.seqs.iter().zip(&g.logits).enumerate() {
        if ids.len() > longest {
            continue;
        }
        let got = logits_of(&model, ids);
        let err = max_err(&got, want);
        eprintln!(
            "{dir} from GGUF: sequence {i} ({} tokens): max logit error {err:.2e}",
            ids.len()
        );
        assert!(err < 1e-3, "{dir} from GGUF: sequence {i}: error {err}");
        assert_eq!(argmax(&got), argmax(want));
    }
}

fn check(dir: &str) {
    check_up_to(dir, usize::MAX)
}

#[test]
fn qwen3_gguf_matches_transformers() {
    check("tiny-qwen3");
}

#[test]
fn phi3_gguf_matches_transformers() {
    check("tiny-phi3");
}

#[test]
fn gemma2_gguf_matches_transformers() {
    check("tiny-gemma2");
}

#[test]
fn gemma3_gguf_matches_transformers() {
    check("tiny-gemma3");
}

#[test]
fn smollm3_gguf_matches_transformers() {
    check("tiny-smollm3");
}

#[test]
fn olmo2_gguf_matches_transformers() {
    check("tiny-olmo2");
}

#[test]
fn granite_gguf_matches_transformers() {
    check("tiny-granite");
}

#[test]
fn llama_yarn_gguf_matches_transformers() {
    check("tiny-llama-yarn");
}

/// The config spindle reads from `dir`'s rebuilt GGUF.
fn rebuilt_config(dir: &str) -> spindle_model::ModelConfig {
    let path = rebuild(dir);
    let config = GgufFile::open(&path)
        .expect("open")
        .config()
        .expect("config");
    let _ = std::fs::remove_file(&path);
    config
}

#[test]
fn mixtral_gguf_matches_transformers() {
    let config = rebuilt_config("tiny-mixtral");
    assert_eq!(
        config.architecture,
        spindle_model::Architecture::Mixtral,
        "a llama GGUF with experts"
    );
    check("tiny-mixtral");
}

#[test]
fn qwen2_moe_gguf_matches_transformers() {
    check("tiny-qwen2-moe");
}

#[test]
fn qwen3_moe_gguf_matches_transformers() {
    check("tiny-qwen3-moe");
}

#[test]
fn olmoe_gguf_matches_transformers() {
    check("tiny-olmoe");
}

/// gpt-oss as its GGUFs come: MXFP4 experts (ggml type 39, repacked by the converter from the
/// checkpoint's blocks), split gate/up experts and biases, sinks, `post_attention_norm`, and
/// the YaRN rope without truncation that its config asks for.
#[test]
fn gpt_oss_mxfp4_gguf_matches_transformers() {
    let config = rebuilt_config("tiny-gpt-oss-mxfp4");
    assert!(config.attention_sinks);
    assert!(matches!(
        config.rope_scaling,
        Some(spindle_model::RopeScaling::Yarn(ref y)) if !y.truncate
    ));
    check("tiny-gpt-oss-mxfp4");
}

/// Whether llama.cpp's converter could write `dir` (not a Qwen3-MoE with dense layers, nor an
/// OLMoE with clip_qkv, which it drops).
fn has_gguf(dir: &str) -> bool {
    common::repo_root()
        .join("tests/golden")
        .join(dir)
        .join("gguf.json")
        .exists()
}

#[test]
fn mistral_window_gguf_matches_transformers() {
    let config = rebuilt_config("tiny-mistral-window");
    assert_eq!(
        config.family.sliding_window, None,
        "the converter keeps no window"
    );
    check_up_to("tiny-mistral-window", 32);
}

/// A Q8_0 GGUF of every family (matrices quantized as `llama-quantize` would; exact f32
/// arithmetic over the kept-quantized blocks) meets vLLM's `check_logprobs_close` against
/// transformers' fp32 greedy continuation.
#[test]
fn q8_0_ggufs_pass_check_logprobs_close() {
    // Not Mistral's: llama.cpp's converter drops its window (see `check_up_to`).
    // gpt-oss's experts stay MXFP4, as in its published GGUFs.
    for dir in FAMILIES
        .into_iter()
        .chain(["tiny-gpt-oss-mxfp4"])
        .filter(|d| *d != "tiny-mistral-window" && has_gguf(d))
    {
        let model = load_and_remove(&rebuild_as(dir, GgmlDType::Q8_0), dir);
        let Golden {
            prompt,
            greedy,
            top5,
            ..
        } = golden(dir);
        match common::logprobs_close(&model, &prompt, &greedy, &top5) {
            Ok(n) => eprintln!(
                "{dir} Q8_0: {n}/{} reference tokens before divergence",
                greedy.len()
            ),
            Err(e) => panic!("{dir} Q8_0: {e}"),
        }
    }
}
