//! BERT-family encoders in the sentence-transformers layout (all-MiniLM, bge, e5, ...): a plain
//! struct with `load` and `forward`. The forward pass takes a *packed* batch, every input's
//! tokens concatenated with their lengths (no padding), runs the projections and MLPs as single
//! matmuls over all tokens and bidirectional attention within each input, then pools and
//! normalizes each input as its sentence-transformers modules say. No KV cache is involved.
//! The linear layers multiply in f32 (exact), or with bf16 products and f32 sums
//! ([`BertModel::with_bf16_products`]: `--dtype bfloat16`, and `auto` where the CPU has AVX-512
//! BF16): the embeddings stay within cosine 0.9999 of sentence-transformers' fp32 vectors
//! (tests/embeddings_reference.rs).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use serde::Deserialize;

use crate::cpu_bf16_lanes::Bf16Lanes;
use crate::error::{ModelError, Result};
use crate::hf::{read_json, SafetensorsWeights};
use crate::weights::WeightSource;

/// The fields of a BERT `config.json` the encoder needs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}
fn default_position_type() -> String {
    "absolute".into()
}

/// How token states become one vector (sentence-transformers' `Pooling` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Average of every token's state (the attention mask is implicit: a packed input has no
    /// padding).
    Mean,
    /// The first token's state ([CLS]).
    Cls,
    /// The last token's state.
    LastToken,
    /// Element-wise maximum over the tokens.
    Max,
}

/// What sentence-transformers' modules ask of the output, read from `modules.json`,
/// `1_Pooling/config.json` (or the pooling module's folder) and `sentence_bert_config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentenceTransformersConfig {
    pub pooling: Pooling,
    /// A `Normalize` module follows the pooling: vectors have unit L2 norm.
    pub normalize: bool,
    /// `max_seq_length`: the longest input (special tokens included) the model takes.
    pub max_seq_length: usize,
}

#[derive(Deserialize)]
struct Module {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize, Default)]
struct PoolingFile {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
}

#[derive(Deserialize)]
struct SbertFile {
    max_seq_length: Option<usize>,
}

impl SentenceTransformersConfig {
    /// Read the sentence-transformers files of `dir`. Without `modules.json` the model is taken
    /// as sentence-transformers' default wrapping of a plain encoder: mean pooling, no
    /// normalization, the position-embedding limit as length limit.
    pub fn read(dir: &Path, max_position_embeddings: usize) -> Result<Self> {
        let mut config = Self {
            pooling: Pooling::Mean,
            normalize: false,
            max_seq_length: max_position_embeddings,
        };
        let sbert = dir.join("sentence_bert_config.json");
        if sbert.exists() {
            if let Some(m) = read_json::<SbertFile>(&sbert)?.max_seq_length {
                config.max_seq_length = m.min(max_position_embeddings);
            }
        }
        let modules_path = dir.join("modules.json");
        if !modules_path.exists() {
            return Ok(config);
        }
        let modules: Vec<Module> = read_json(&modules_path)?;
        for m in &modules {
            let kind = m.kind.rsplit('.').next().unwrap_or(&m.kind);
            match kind {
                "Transformer" => {}
                "Pooling" => {
                    let file = dir.join(&m.path).join("config.json");
                    let p: PoolingFile = read_json(&file)?;
                    config.pooling = match (
                        p.pooling_mode_mean_tokens,
                        p.pooling_mode_cls_token,
                        p.pooling_mode_lasttoken,
                        p.pooling_mode_max_tokens,
                    ) {
                        (true, false, false, false) => Pooling::Mean,
                        (false, true, false, false) => Pooling::Cls,
                        (false, false, true, false) => Pooling::LastToken,
                        (false, false, false, true) => Pooling::Max,
                        _ => {
                            return Err(ModelError::Unsupported(format!(
                                "{}: exactly one of mean, cls, lasttoken or max pooling is supported",
                                file.display()
                            )))
                        }
                    };
                    if p.pooling_mode_mean_sqrt_len_tokens || p.pooling_mode_weightedmean_tokens {
                        return Err(ModelError::Unsupported(format!(
                            "{}: mean_sqrt_len and weightedmean pooling are not supported",
                            file.display()
                        )));
                    }
                }
                "Normalize" => config.normalize = true,
                other => {
                    return Err(ModelError::Unsupported(format!(
                        "{}: sentence-transformers module '{other}' is not supported (supported: Transformer, Pooling, Normalize)",
                        modules_path.display()
                    )))
                }
            }
        }
        Ok(config)
    }
}

/// Inputs of one forward pass, concatenated without padding.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncoderBatch {
    /// Every input's token ids, one after the other.
    pub token_ids: Vec<u32>,
    /// Length of each input, in order; they sum to `token_ids.len()`.
    pub lengths: Vec<usize>,
}

impl EncoderBatch {
    /// Append one input.
    pub fn push(&mut self, ids: &[u32]) {
        self.token_ids.extend_from_slice(ids);
        self.lengths.push(ids.len());
    }
}

/// A linear layer: f32 weights (the exact path), or the weights rounded to bf16 and repacked
/// for the lanes kernel (the f32 copy is not kept).
enum Dense {
    F32 { weight: Tensor, bias: Tensor },
    Bf16 { weight: Bf16Lanes, bias: Vec<f32> },
}

impl Dense {
    fn load(w: &mut dyn WeightSource, prefix: &str, out: usize, inp: usize) -> Result<Self> {
        let (weight, bias) = Self::load_parts(w, prefix, out, inp)?;
        Ok(Self::F32 { weight, bias })
    }

    /// The f32 weight and bias under `prefix` (query, key and value are fused from these).
    fn load_parts(
        w: &mut dyn WeightSource,
        prefix: &str,
        out: usize,
        inp: usize,
    ) -> Result<(Tensor, Tensor)> {
        Ok((
            w.get(&format!("{prefix}.weight"), &[out, inp])?,
            w.get(&format!("{prefix}.bias"), &[out])?,
        ))
    }

    /// Switch to bf16 products where the CPU and shape allow; otherwise stay as it is.
    fn switch_to_bf16(&mut self) -> Result<()> {
        let Self::F32 { weight, bias } = self else {
            return Ok(());
        };
        let (rows, cols) = weight.dims2()?;
        let values = weight.flatten_all()?.to_vec1::<f32>()?;
        if let Some(lanes) = Bf16Lanes::from_f32(rows, cols, &values) {
            let bias = bias.to_vec1::<f32>()?;
            *self = Self::Bf16 {
                weight: lanes,
                bias,
            };
        }
        Ok(())
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, bias) = match self {
            Self::F32 { weight, bias } => {
                return crate::cpu_matmul::linear_bias(x, weight, bias);
            }
            Self::Bf16 { weight, bias } => (weight, bias),
        };
        let (m, _) = x.dims2()?;
        let input = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut y = w.matmul(&input, m);
        crate::cpu_matmul::add_bias(&mut y, bias);
        Ok(Tensor::from_vec(y, (m, w.rows()), &Device::Cpu)?)
    }
}

struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    fn load(w: &mut dyn WeightSource, prefix: &str, size: usize) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{prefix}.weight"), &[size])?,
            bias: w.get(&format!("{prefix}.bias"), &[size])?,
        })
    }

    fn forward(&self, x: &Tensor, eps: f32) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            x,
            &self.weight,
            &self.bias,
            eps,
        )?)
    }
}

struct Layer {
    /// query, key and value fused into one `[3 hidden, hidden]` projection.
    qkv: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    intermediate: Dense,
    output: Dense,
    output_norm: Norm,
}

/// `a · b` with 16 independent partial sums, so the compiler vectorizes it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Replace `scores` by `exp(score - max)` and return `1 / Σ` (vectorized with AVX2 or AVX-512).
fn softmax_unnormalized(scores: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu_isa::avx512() {
        // SAFETY: AVX-512F was detected.
        return unsafe { crate::attention::cpu::avx512::softmax_unnormalized(scores, None) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu_isa::avx2() {
        // SAFETY: AVX2 (with FMA) was detected.
        return unsafe { crate::attention::cpu::avx2::softmax_unnormalized(scores, None) };
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    1.0 / sum
}

/// A loaded BERT encoder with its sentence-transformers head.
pub struct BertModel {
    config: BertConfig,
    head: SentenceTransformersConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embed_norm: Norm,
    layers: Vec<Layer>,
}

impl BertModel {
    /// Load `config.json`, the safetensors weights and the sentence-transformers files of a
    /// model directory (f32 on the CPU).
    pub fn load(dir: &Path) -> Result<Self> {
        let config: BertConfig = read_json(&dir.join("config.json"))?;
        let c = &config;
        if c.num_attention_heads == 0 || c.hidden_size % c.num_attention_heads != 0 {
            return Err(ModelError::Config(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            )));
        }
        if c.position_embedding_type != "absolute" {
            return Err(ModelError::Unsupported(format!(
                "position_embedding_type '{}' (only absolute positions are supported)",
                c.position_embedding_type
            )));
        }
        if !matches!(
            c.hidden_act.as_str(),
            "gelu" | "gelu_new" | "gelu_pytorch_tanh"
        ) {
            return Err(ModelError::Unsupported(format!(
                "hidden_act '{}' (supported: gelu, gelu_new, gelu_pytorch_tanh)",
                c.hidden_act
            )));
        }
        let head = SentenceTransformersConfig::read(dir, c.max_position_embeddings)?;
        let mut w = SafetensorsWeights::open(dir, DType::F32, Device::Cpu)?;
        // Some exports prefix every tensor with `bert.`.
        let p = if w.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let h = c.hidden_size;
        let word = w.get(
            &format!("{p}embeddings.word_embeddings.weight"),
            &[c.vocab_size, h],
        )?;
        let position = w.get(
            &format!("{p}embeddings.position_embeddings.weight"),
            &[c.max_position_embeddings, h],
        )?;
        let token_type = w.get(
            &format!("{p}embeddings.token_type_embeddings.weight"),
            &[c.type_vocab_size, h],
        )?;
        let embed_norm = Norm::load(&mut w, &format!("{p}embeddings.LayerNorm"), h)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = format!("{p}encoder.layer.{i}");
            let (qw, qb) = Dense::load_parts(&mut w, &format!("{l}.attention.self.query"), h, h)?;
            let (kw, kb) = Dense::load_parts(&mut w, &format!("{l}.attention.self.key"), h, h)?;
            let (vw, vb) = Dense::load_parts(&mut w, &format!("{l}.attention.self.value"), h, h)?;
            layers.push(Layer {
                qkv: Dense::F32 {
                    weight: Tensor::cat(&[qw, kw, vw], 0)?,
                    bias: Tensor::cat(&[qb, kb, vb], 0)?,
                },
                attn_out: Dense::load(&mut w, &format!("{l}.attention.output.dense"), h, h)?,
                attn_norm: Norm::load(&mut w, &format!("{l}.attention.output.LayerNorm"), h)?,
                intermediate: Dense::load(
                    &mut w,
                    &format!("{l}.intermediate.dense"),
                    c.intermediate_size,
                    h,
                )?,
                output: Dense::load(&mut w, &format!("{l}.output.dense"), h, c.intermediate_size)?,
                output_norm: Norm::load(&mut w, &format!("{l}.output.LayerNorm"), h)?,
            });
        }
        Ok(Self {
            config,
            head,
            word,
            position,
            token_type,
            embed_norm,
            layers,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Multiply the linear layers with bf16 products (f32 sums) where the CPU has bf16 kernels
    /// (AVX-512 BF16, or AVX2's emulation); elsewhere nothing changes. See [`Self::uses_bf16`].
    pub fn with_bf16_products(mut self) -> Result<Self> {
        for layer in &mut self.layers {
            for dense in [
                &mut layer.qkv,
                &mut layer.attn_out,
                &mut layer.intermediate,
                &mut layer.output,
            ] {
                dense.switch_to_bf16()?;
            }
        }
        Ok(self)
    }

    /// Whether the linear layers multiply with bf16 products.
    pub fn uses_bf16(&self) -> bool {
        self.layers
            .iter()
            .any(|l| matches!(l.qkv, Dense::Bf16 { .. }))
    }

    /// Pooling, normalization and length limit.
    pub fn head(&self) -> &SentenceTransformersConfig {
        &self.head
    }

    /// Size of the output vectors.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Longest input in tokens (special tokens included).
    pub fn max_input_len(&self) -> usize {
        self.head.max_seq_length
    }

    /// Number of weights, for logs.
    pub fn num_parameters(&self) -> usize {
        let c = &self.config;
        let h = c.hidden_size;
        let per_layer = 4 * h * h + 2 * h * c.intermediate_size + 9 * h + c.intermediate_size;
        (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h
            + c.num_hidden_layers * per_layer
    }

    /// One vector per input of the batch, pooled (and normalized if the model says so).
    pub fn forward(&self, batch: &EncoderBatch) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let tokens = batch.token_ids.len();
        if tokens == 0 || batch.lengths.iter().sum::<usize>() != tokens {
            return Err(ModelError::InvalidBatch(format!(
                "{tokens} tokens with input lengths {:?}",
                batch.lengths
            )));
        }
        if let Some(&len) = batch
            .lengths
            .iter()
            .find(|&&l| l == 0 || l > c.max_position_embeddings)
        {
            return Err(ModelError::InvalidBatch(format!(
                "an input of {len} tokens (1..={} allowed)",
                c.max_position_embeddings
            )));
        }
        if let Some(bad) = batch
            .token_ids
            .iter()
            .find(|&&t| t as usize >= c.vocab_size)
        {
            return Err(ModelError::InvalidBatch(format!(
                "token id {bad} is outside the vocabulary ({})",
                c.vocab_size
            )));
        }
        let eps = c.layer_norm_eps as f32;
        let positions: Vec<u32> = batch.lengths.iter().flat_map(|&l| 0..l as u32).collect();
        let ids = Tensor::new(batch.token_ids.as_slice(), &Device::Cpu)?;
        let positions = Tensor::new(positions.as_slice(), &Device::Cpu)?;
        let x = self.word.index_select(&ids, 0)?;
        let x = (x + self.position.index_select(&positions, 0)?)?;
        // Single-segment inputs: token type 0 everywhere.
        let x = x.broadcast_add(&self.token_type.narrow(0, 0, 1)?)?;
        let mut x = self.embed_norm.forward(&x, eps)?;
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x)?;
            let attn = self.attention(&qkv, &batch.lengths)?;
            let h = layer.attn_out.forward(&attn)?;
            x = layer.attn_norm.forward(&(h + &x)?, eps)?;
            let inter = layer.intermediate.forward(&x)?;
            let inter = match c.hidden_act.as_str() {
                "gelu" => crate::cpu_ops::gelu_erf(&inter)?,
                _ => inter.gelu()?,
            };
            let h = layer.output.forward(&inter)?;
            x = layer.output_norm.forward(&(h + &x)?, eps)?;
        }
        self.pool(&x, &batch.lengths)
    }

    /// Bidirectional attention within each input, per (input, head) on rayon.
    fn attention(&self, qkv: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let c = &self.config;
        let (h, heads) = (c.hidden_size, c.num_attention_heads);
        let d = h / heads;
        let tokens = qkv.dims2()?.0;
        let data = qkv.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let scale = 1.0 / (d as f32).sqrt();
        let starts: Vec<usize> = lengths
            .iter()
            .scan(0, |acc, &l| {
                let s = *acc;
                *acc += l;
                Some(s)
            })
            .collect();
        let tasks: Vec<(usize, usize)> = (0..lengths.len())
            .flat_map(|s| (0..heads).map(move |hd| (s, hd)))
            .collect();
        let row = 3 * h;
        let results: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(s, hd)| {
                let (start, len) = (starts[s], lengths[s]);
                let q = |i: usize| &data[(start + i) * row + hd * d..][..d];
                let k = |j: usize| &data[(start + j) * row + h + hd * d..][..d];
                let v = |j: usize| &data[(start + j) * row + 2 * h + hd * d..][..d];
                let mut out = vec![0f32; len * d];
                let mut scores = vec![0f32; len];
                for i in 0..len {
                    let qi = q(i);
                    for (j, score) in scores.iter_mut().enumerate() {
                        *score = dot(qi, k(j)) * scale;
                    }
                    let inv_sum = softmax_unnormalized(&mut scores);
                    let o = &mut out[i * d..(i + 1) * d];
                    for (j, &p) in scores.iter().enumerate() {
                        let w = p * inv_sum;
                        for (o, &x) in o.iter_mut().zip(v(j)) {
                            *o += w * x;
                        }
                    }
                }
                out
            })
            .collect();
        let mut merged = vec![0f32; tokens * h];
        for (&(s, hd), res) in tasks.iter().zip(&results) {
            for i in 0..lengths[s] {
                let dst = (starts[s] + i) * h + hd * d;
                merged[dst..dst + d].copy_from_slice(&res[i * d..(i + 1) * d]);
            }
        }
        Ok(Tensor::from_vec(merged, (tokens, h), &Device::Cpu)?)
    }

    fn pool(&self, x: &Tensor, lengths: &[usize]) -> Result<Vec<Vec<f32>>> {
        let h = self.config.hidden_size;
        let data = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(lengths.len());
        let mut start = 0;
        for &len in lengths {
            let rows = &data[start * h..(start + len) * h];
            let mut v = match self.head.pooling {
                Pooling::Cls => rows[..h].to_vec(),
                Pooling::LastToken => rows[(len - 1) * h..].to_vec(),
                Pooling::Mean => {
                    let mut acc = vec![0f32; h];
                    for r in rows.chunks_exact(h) {
                        for (a, &x) in acc.iter_mut().zip(r) {
                            *a += x;
                        }
                    }
                    acc.iter_mut().for_each(|a| *a /= len as f32);
                    acc
                }
                Pooling::Max => {
                    let mut acc = vec![f32::NEG_INFINITY; h];
                    for r in rows.chunks_exact(h) {
                        for (a, &x) in acc.iter_mut().zip(r) {
                            *a = a.max(x);
                        }
                    }
                    acc
                }
            };
            if self.head.normalize {
                // sentence-transformers' Normalize: x / max(||x||, 1e-12).
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                v.iter_mut().for_each(|x| *x /= norm);
            }
            out.push(v);
            start += len;
        }
        Ok(out)
    }
}
