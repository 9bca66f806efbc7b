//! gpt-oss with its experts in MXFP4, as its checkpoints store them (`tests/golden/
//! tiny-gpt-oss-mxfp4`, made by `scripts/golden/make_tiny_gpt_oss_mxfp4.py`; bytes from the
//! scripts' hash): spindle's expansion equals transformers' `convert_moe_packed_tensors` bit for
//! bit, and the model, its experts kept in MXFP4, gives transformers' fp32 logits and greedy
//! tokens, from the hash weights and from a Hugging Face directory through the real loader.

mod common;

use candle_core::Device;
use common::hash_weights::HashWeights;
use common::repo_root;
use common::tiny::{get, golden, golden_json, logits_of, max_err};
use spindle_model::quant::mxfp4::Mxfp4Matrix;
use spindle_model::weights::WeightSource;
use spindle_model::Architecture;

const DIR: &str = "tiny-gpt-oss-mxfp4";

#[test]
fn expansion_is_bit_identical_to_transformers() {
    let g = golden(DIR);
    let v = golden_json(DIR, "outputs.json");
    let check = &v["mxfp4_expansion"];
    let (blocks_name, scales_name): (String, String) =
        (get(&check["blocks"]), get(&check["scales"]));
    let want: Vec<i32> = get(&check["bits"]);
    let mut hash = HashWeights(g.names.clone());
    let bshape = &g.shapes[&blocks_name];
    let sshape = &g.shapes[&scales_name];
    let (rows, cols) = (bshape[1], bshape[2] * 32);
    let blocks = hash.get_bytes(&blocks_name, bshape).expect("blocks");
    let scales = hash.get_bytes(&scales_name, sshape).expect("scales");
    // The first expert.
    let m = Mxfp4Matrix::new(
        rows,
        cols,
        blocks[..rows * cols / 2].to_vec(),
        scales[..rows * cols / 32].to_vec(),
    )
    .expect("matrix");
    let got: Vec<i32> = m.dequantize()[..want.len()]
        .iter()
        .map(|x| x.to_bits() as i32)
        .collect();
    assert_eq!(got, want);
}

/// Logits, batch invariance and greedy tokens (whole and chunked prefill) against transformers.
#[test]
fn mxfp4_experts_match_transformers() {
    common::tiny::check(DIR, Architecture::GptOss);
}

/// The checkpoint as a Hugging Face directory (u8 blocks and scales in safetensors) through the
/// real loader, default arithmetic and `--dtype float32`.
#[test]
fn a_directory_with_mxfp4_experts_loads_and_matches() {
    let g = golden(DIR);
    let dir = std::env::temp_dir().join(format!("spindle-mxfp4-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::copy(
        repo_root()
            .join("tests/golden")
            .join(DIR)
            .join("config.json"),
        dir.join("config.json"),
    )
    .expect("config");
    let mut hash = HashWeights(g.names.clone());
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = g
        .names
        .iter()
        .map(|n| {
            let shape = &g.shapes[n];
            let t = if n.ends_with("_blocks") || n.ends_with("_scales") {
                let bytes = hash.get_bytes(n, shape).expect("bytes");
                candle_core::Tensor::from_vec(bytes, shape.as_slice(), &Device::Cpu)
                    .expect("u8 tensor")
            } else {
                hash.get(n, shape).expect("tensor")
            };
            (n.clone(), t)
        })
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).expect("save");
    let vocab: Vec<String> = (0..g.config.vocab_size)
        .map(|i| format!("\"t{i}\": {i}"))
        .collect();
    std::fs::write(
        dir.join("tokenizer.json"),
        format!(
            r#"{{"version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": {{"type": "Whitespace"}},
            "post_processor": null, "decoder": null, "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "t0"}}}}"#,
            vocab.join(", ")
        ),
    )
    .expect("tokenizer");
    for dtype in [
        spindle_model::DTypeChoice::Float32,
        spindle_model::DTypeChoice::Auto,
    ] {
        let loaded = spindle_model::load(&spindle_model::LoadOptions {
            model: dir.display().to_string(),
            dtype,
            ..Default::default()
        })
        .expect("load");
        assert_eq!(loaded.info.architecture, "gpt-oss");
        let long = g.seqs.len() - 1;
        let got = logits_of(&loaded.model, &g.seqs[long]);
        let err = max_err(&got, &g.logits[long]);
        eprintln!(
            "{DIR} from a directory ({}): max logit error {err:.2e}",
            loaded.info.dtype
        );
        if dtype == spindle_model::DTypeChoice::Float32 {
            assert!(err < 1e-3, "error {err}");
        } else {
            common::logprobs_close(&loaded.model, &g.prompt, &g.greedy, &g.top5)
                .unwrap_or_else(|e| panic!("default arithmetic: {e}"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
