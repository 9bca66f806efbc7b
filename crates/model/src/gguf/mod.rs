//! GGUF files: model config, tokenizer and chat template from the metadata, weights dequantized
//! to the serving dtype at load (quantized matmuls are not trusted until they match the golden
//! outputs). llama.cpp stores Llama-style Q/K projections permuted for its interleaved rope;
//! we undo that so one model implementation (HF layout) serves every source. The family's
//! traits come from `<arch>.*` metadata and llama.cpp's per-family rules (`family.rs`). A MoE
//! layer's experts are stacked in one 3-D tensor per projection (`ffn_*_exps`), sliced per
//! expert here and kept quantized.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

mod family;
mod header;

use crate::config::{Architecture, BlockNorms, LongRopeScaling, ModelConfig, RopeScaling};
use crate::cpu_bf16::CpuArithmetic;
use crate::error::{ModelError, Result};
use crate::quant::mxfp4::{Mxfp4Matrix, BLOCK};
use crate::quant::{is_block_quantized, QuantMatrix};
use crate::tokenizer::GgufVocab;
use crate::weights::{check_shape, LinearWeight, WeightSource};

/// An opened GGUF file: parsed header and metadata, tensor data read on demand.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    /// Tensors of types candle cannot hold (MXFP4 experts; anything else is refused when read).
    others: HashMap<String, header::OtherTensor>,
    reader: BufReader<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ModelError::NotFound(path.to_path_buf()),
            _ => ModelError::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        let mut reader = BufReader::new(file);
        // candle's metadata reader panics on some malformed headers (found by fuzzing): a
        // corrupt file must be an error, not a crash.
        let read =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| header::read(&mut reader)));
        let message = match read {
            Ok(Ok(header)) => {
                return Ok(Self {
                    path: path.to_path_buf(),
                    content: header.content,
                    others: header.others,
                    reader,
                })
            }
            Ok(Err(e)) => format!("not a readable GGUF file: {e}"),
            Err(_) => "not a readable GGUF file: malformed header".into(),
        };
        Err(ModelError::InvalidFile {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn invalid(&self, message: String) -> ModelError {
        ModelError::InvalidFile {
            path: self.path.clone(),
            message,
        }
    }

    fn value(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.value(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(x) => *x as i128,
            Value::I8(x) => *x as i128,
            Value::U16(x) => *x as i128,
            Value::I16(x) => *x as i128,
            Value::U32(x) => *x as i128,
            Value::I32(x) => *x as i128,
            Value::U64(x) => *x as i128,
            Value::I64(x) => *x as i128,
            _ => return Err(self.invalid(format!("metadata '{key}' is not an integer"))),
        };
        usize::try_from(n)
            .map(Some)
            .map_err(|_| self.invalid(format!("metadata '{key}' = {n} is out of range")))
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| self.invalid(format!("missing metadata '{key}'")))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(_) => Err(self.invalid(format!("metadata '{key}' is not a float"))),
        }
    }

    fn string_opt(&self, key: &str) -> Result<Option<String>> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.invalid(format!("metadata '{key}' is not a string"))),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.invalid(format!("metadata '{key}' is not a bool"))),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&Vec<Value>>> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(self.invalid(format!("metadata '{key}' is not an array"))),
        }
    }

    /// `general.architecture`, the prefix of the model's metadata keys.
    pub fn architecture_name(&self) -> Result<String> {
        self.string_opt("general.architecture")?
            .ok_or_else(|| self.invalid("missing metadata 'general.architecture'".into()))
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name) || self.others.contains_key(name)
    }

    /// The bytes of an MXFP4 tensor (`[experts, rows, cols]`) and its shape, bounds-checked.
    fn read_mxfp4(&mut self, name: &str) -> Result<(Vec<usize>, Vec<u8>)> {
        let Some(t) = self.others.get(name) else {
            return Err(ModelError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            });
        };
        let elems: usize = t.shape.iter().product();
        let start = self.content.tensor_data_offset.saturating_add(t.offset);
        let shape = t.shape.clone();
        let cols = shape.last().copied().unwrap_or(0);
        if !cols.is_multiple_of(crate::quant::mxfp4::BLOCK) {
            return Err(self.invalid(format!(
                "MXFP4 tensor '{name}' has {cols} columns, not whole blocks"
            )));
        }
        let len = elems / crate::quant::mxfp4::BLOCK * header::MXFP4_BLOCK_BYTES;
        let path = self.path.clone();
        let io = |e: std::io::Error| ModelError::InvalidFile {
            path: path.clone(),
            message: format!("cannot read tensor '{name}': {e}"),
        };
        let file_size = self.reader.seek(SeekFrom::End(0)).map_err(io)?;
        if start.saturating_add(len as u64) > file_size {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{len} bytes at offset {start} run past the file's end"),
            )));
        }
        let mut bytes = vec![0u8; len];
        self.reader.seek(SeekFrom::Start(start)).map_err(io)?;
        self.reader.read_exact(&mut bytes).map_err(io)?;
        Ok((shape, bytes))
    }

    /// A tensor of `len` positive per-frequency factors (`rope_freqs.weight`,
    /// `rope_factors_long.weight`, ...), read once at load; `None` when absent.
    fn rope_factor_tensor(&mut self, name: &str, len: usize) -> Result<Option<Vec<f64>>> {
        if !self.has_tensor(name) {
            return Ok(None);
        }
        let path = self.path.clone();
        let bad = |message: String| ModelError::InvalidFile {
            path: path.clone(),
            message,
        };
        let q = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| bad(format!("cannot read tensor '{name}': {e}")))?;
        let factors: Vec<f32> = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        if factors.len() != len || factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
            return Err(bad(format!(
                "'{name}' must hold {len} positive factors, got {}",
                factors.len()
            )));
        }
        Ok(Some(factors.into_iter().map(f64::from).collect()))
    }

    /// llama.cpp's `rope_freqs.weight` (`head_dim / 2` divisors of the inverse frequencies).
    fn rope_freq_factors(&mut self, head_dim: usize) -> Result<Option<Vec<f64>>> {
        self.rope_factor_tensor("rope_freqs.weight", head_dim / 2)
    }

    /// Phi-3's LongRoPE, stored by llama.cpp as `rope_factors_{short,long}.weight` with the
    /// original context and the attention factor in metadata.
    fn longrope(
        &mut self,
        key: &dyn Fn(&str) -> String,
        rotary_dim: usize,
        context: usize,
    ) -> Result<Option<RopeScaling>> {
        let half = rotary_dim / 2;
        let short = self.rope_factor_tensor("rope_factors_short.weight", half)?;
        let long = self.rope_factor_tensor("rope_factors_long.weight", half)?;
        let (Some(short_factor), Some(long_factor)) = (short, long) else {
            return Ok(None);
        };
        let original = self
            .usize_opt(&key("rope.scaling.original_context_length"))?
            .ok_or_else(|| {
                self.invalid("longrope factors without an original context length".into())
            })?;
        let factor = context as f64 / original as f64;
        let attention_factor = match self.f64_opt(&key("rope.scaling.attn_factor"))? {
            Some(a) => a,
            None => LongRopeScaling::default_attention_factor(factor, original),
        };
        Ok(Some(RopeScaling::LongRope(LongRopeScaling {
            short_factor,
            long_factor,
            original_max_position_embeddings: original,
            attention_factor,
        })))
    }

    pub fn config(&mut self) -> Result<ModelConfig> {
        let arch_name = self.architecture_name()?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let architecture = match Architecture::parse(&arch_name)? {
            // llama.cpp writes Mixtral as a Llama with experts.
            Architecture::Llama if self.usize_opt(&key("expert_count"))?.unwrap_or(0) > 0 => {
                Architecture::Mixtral
            }
            a => a,
        };
        let hidden_size = self.usize_req(&key("embedding_length"))?;
        let num_heads = self.usize_req(&key("attention.head_count"))?;
        let head_dim = match self.usize_opt(&key("attention.key_length"))? {
            Some(d) => d,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let vocab_size = match self.usize_opt(&key("vocab_size"))? {
            Some(v) => v,
            None => self
                .array("tokenizer.ggml.tokens")?
                .map(|a| a.len())
                .unwrap_or(0),
        };
        let num_layers = self.usize_req(&key("block_count"))?;
        let context = self.usize_opt(&key("context_length"))?.unwrap_or(4096);
        let family = self.family(
            architecture,
            &key,
            &family::Shapes {
                num_layers,
                hidden_size,
                num_heads,
                head_dim,
                context,
            },
        )?;
        let intermediate_size = match self.usize_opt(&key("feed_forward_length"))? {
            Some(n) => n,
            // MoE files without dense layers may only give the experts' size.
            None => self.usize_req(&key("expert_feed_forward_length"))?,
        };
        let moe = self.moe(architecture, &key, num_layers, intermediate_size)?;
        let mut config = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads: self
                .usize_opt(&key("attention.head_count_kv"))?
                .unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: self
                .f64_opt(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: self.f64_opt(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            // Llama 3.x GGUFs bake their scaling into a `rope_freqs` tensor instead.
            rope_scaling: family.rope_scaling,
            local_rope: family.local_rope,
            rope_freq_factors: self.rope_freq_factors(head_dim)?,
            max_position_embeddings: context,
            tie_word_embeddings: !self.has_tensor("output.weight"),
            qkv_bias: self.has_tensor("blk.0.attn_q.bias"),
            qk_norm: self.has_tensor("blk.0.attn_q_norm.weight"),
            clip_qkv: self
                .f64_opt(&key("attention.clamp_kqv"))?
                .filter(|c| *c > 0.0),
            attention_sinks: self.has_tensor("blk.0.attn_sinks.weight"),
            family: family.traits,
            moe,
        };
        if config.rope_scaling.is_none() && architecture == Architecture::Phi3 {
            // Phi-3 stores its longrope factors as tensors over the rotated part of the head.
            config.rope_scaling = self.longrope(&key, config.rotary_dim(), context)?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Tokenizer, chat template and special ids from `tokenizer.*` metadata.
    pub fn vocab(&self) -> Result<GgufVocab> {
        let strings = |key: &str| -> Result<Vec<String>> {
            let Some(arr) = self.array(key)? else {
                return Ok(Vec::new());
            };
            arr.iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(self.invalid(format!("'{key}' holds a non-string"))),
                })
                .collect()
        };
        let scores = match self.array("tokenizer.ggml.scores")? {
            None => Vec::new(),
            Some(arr) => arr.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
        };
        let token_types = match self.array("tokenizer.ggml.token_type")? {
            None => Vec::new(),
            Some(arr) => arr.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        };
        let id = |key: &str| -> Result<Option<u32>> {
            Ok(self.usize_opt(key)?.and_then(|v| u32::try_from(v).ok()))
        };
        let mut extra_eos_ids = Vec::new();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(v) = id(key)? {
                extra_eos_ids.push(v);
            }
        }
        let model = self.string_opt("tokenizer.ggml.model")?.ok_or_else(|| {
            self.invalid(
                "missing metadata 'tokenizer.ggml.model' (no tokenizer in this GGUF)".into(),
            )
        })?;
        Ok(GgufVocab {
            model,
            pre: self.string_opt("tokenizer.ggml.pre")?,
            tokens: strings("tokenizer.ggml.tokens")?,
            scores,
            token_types,
            merges: strings("tokenizer.ggml.merges")?,
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: id("tokenizer.ggml.eos_token_id")?,
            extra_eos_ids,
            unknown_token_id: id("tokenizer.ggml.unknown_token_id")?,
            add_bos_token: self.bool_opt("tokenizer.ggml.add_bos_token")?,
            add_space_prefix: self.bool_opt("tokenizer.ggml.add_space_prefix")?,
            chat_template: self.string_opt("tokenizer.chat_template")?,
        })
    }
}

/// An expert's HF name (`model.layers.L.mlp.experts.E.gate_proj.weight`, Mixtral's
/// `block_sparse_moe.experts.E.w1.weight`) as llama.cpp's stacked tensor and the expert's index.
fn expert_name(hf: &str) -> Option<(String, usize)> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let rest = rest
        .strip_prefix("mlp.experts.")
        .or_else(|| rest.strip_prefix("block_sparse_moe.experts."))?;
    let (expert, part) = rest.split_once('.')?;
    let stacked = match part {
        "gate_proj.weight" | "w1.weight" => "ffn_gate_exps.weight",
        "up_proj.weight" | "w3.weight" => "ffn_up_exps.weight",
        "down_proj.weight" | "w2.weight" => "ffn_down_exps.weight",
        _ => return None,
    };
    Some((format!("blk.{layer}.{stacked}"), expert.parse().ok()?))
}

/// Map a Hugging Face tensor name to llama.cpp's GGUF name (`post_attention`: what llama.cpp
/// calls HF's `post_attention_layernorm`, see [`post_attention_norm_name`]). gpt-oss's experts
/// are asked for as llama.cpp splits them: per expert (`experts.E.gate_proj.weight`, see
/// [`expert_name`]) and with the gate and up biases apart (`experts.gate_proj_bias`).
fn gguf_name(hf: &str, post_attention: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let mapped = match suffix {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => post_attention,
        "pre_feedforward_layernorm.weight" => "ffn_norm.weight",
        "post_feedforward_layernorm.weight" => "post_ffw_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.o_proj.bias" => "attn_output.bias",
        "self_attn.sinks" => "attn_sinks.weight",
        "self_attn.qkv_proj.weight" => "attn_qkv.weight",
        "mlp.gate_up_proj.weight" => "ffn_up.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "mlp.gate.weight" | "block_sparse_moe.gate.weight" => "ffn_gate_inp.weight",
        "mlp.shared_expert.gate_proj.weight" => "ffn_gate_shexp.weight",
        "mlp.shared_expert.up_proj.weight" => "ffn_up_shexp.weight",
        "mlp.shared_expert.down_proj.weight" => "ffn_down_shexp.weight",
        "mlp.shared_expert_gate.weight" => "ffn_gate_inp_shexp.weight",
        "mlp.router.weight" => "ffn_gate_inp.weight",
        "mlp.router.bias" => "ffn_gate_inp.bias",
        "mlp.experts.gate_proj_bias" => "ffn_gate_exps.bias",
        "mlp.experts.up_proj_bias" => "ffn_up_exps.bias",
        "mlp.experts.down_proj_bias" => "ffn_down_exps.bias",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}"))
}

/// llama.cpp's name for HF's `post_attention_layernorm`: the norm before the MLP is `ffn_norm`
/// in pre-norm families, but gpt-oss's converter writes it as `post_attention_norm`, the name
/// sandwich- and post-norm families use for their norm after attention.
fn post_attention_norm_name(config: &ModelConfig) -> &'static str {
    match config.family.norms {
        BlockNorms::Pre if config.architecture != Architecture::GptOss => "ffn_norm.weight",
        _ => "post_attention_norm.weight",
    }
}

/// Quantization types we dequantize at load (the float types, every block type the quantized
/// matmul keeps, and Q8_K); others are rejected with the tensor's name.
fn supported(dtype: GgmlDType) -> bool {
    is_block_quantized(dtype)
        || matches!(
            dtype,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 | GgmlDType::Q8K
        )
}

/// GGUF tensors served under HF names, dequantized to the serving dtype.
pub struct GgufWeights<'a> {
    file: &'a mut GgufFile,
    dtype: DType,
    device: Device,
    /// Heads for undoing llama.cpp's Q/K permutation (`None`: the arch is stored unpermuted).
    unpermute: Option<(usize, usize)>,
    /// llama.cpp's name for HF's `post_attention_layernorm`.
    post_attention: &'static str,
    /// Keep block-quantized linear weights quantized (CPU, f32 serving): the CPU matmul
    /// dequantizes them on the fly with identical results.
    keep_quantized: bool,
    /// How the kept-quantized matrices multiply.
    arithmetic: CpuArithmetic,
    /// The current layer's stacked expert tensors (experts are asked for one by one, each
    /// projection in turn: each stacked tensor is read from the file once).
    stacked: Vec<Stacked>,
}

/// A `[experts, rows, cols]` tensor (`blk.N.ffn_*_exps`), raw and, once needed, dequantized.
struct Stacked {
    name: String,
    dims: Vec<usize>,
    data: StackedData,
    /// The raw bytes, copied out once (`QTensor::data` copies on every call).
    bytes: Option<Vec<u8>>,
    dense: Option<Tensor>,
}

/// A stacked tensor as stored.
enum StackedData {
    Ggml(candle_core::quantized::QTensor),
    /// ggml's `block_mxfp4` bytes (gpt-oss's experts).
    Mxfp4(Vec<u8>),
}

impl<'a> GgufWeights<'a> {
    pub fn new(file: &'a mut GgufFile, config: &ModelConfig, dtype: DType, device: Device) -> Self {
        // llama.cpp's converter permutes Q/K only for archs it runs with "normal" (interleaved)
        // rope: Llama and its converter's subclasses (Mistral, SmolLM3, Granite). Qwen, Gemma
        // and OLMo 2 use NeoX rope and are stored as in HF.
        let unpermute = matches!(
            config.architecture,
            Architecture::Llama
                | Architecture::Mistral
                | Architecture::Mixtral
                | Architecture::SmolLM3
                | Architecture::Granite
        )
        .then_some((config.num_heads, config.num_kv_heads));
        let keep_quantized = dtype == DType::F32 && device.is_cpu();
        Self {
            file,
            dtype,
            device,
            unpermute,
            post_attention: post_attention_norm_name(config),
            keep_quantized,
            arithmetic: CpuArithmetic::F32,
            stacked: Vec::new(),
        }
    }

    /// GGUF tensor `name` as stored, if its type is one spindle reads.
    fn read_raw(&mut self, name: &str) -> Result<candle_core::quantized::QTensor> {
        let path = self.file.path.clone();
        if let Some(other) = self.file.others.get(name) {
            return Err(ModelError::UnsupportedQuant {
                path,
                tensor: name.to_string(),
                dtype: header::type_name(other.ggml_type),
            });
        }
        let dtype = self
            .file
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: path.clone(),
                tensor: name.to_string(),
            })?
            .ggml_dtype;
        if !supported(dtype) {
            return Err(ModelError::UnsupportedQuant {
                path,
                tensor: name.to_string(),
                dtype: format!("{dtype:?}"),
            });
        }
        self.file
            .content
            .tensor(&mut self.file.reader, name, &Device::Cpu)
            .map_err(|e| ModelError::InvalidFile {
                path,
                message: format!("cannot read tensor '{name}': {e}"),
            })
    }

    /// The stacked expert tensor `name`, read once. Tensors of other layers are dropped.
    fn stacked(&mut self, name: &str) -> Result<&mut Stacked> {
        let layer = |n: &str| n.split('.').take(2).collect::<Vec<_>>().join(".");
        if !self.stacked.iter().any(|s| s.name == name) {
            let is_mxfp4 = self
                .file
                .others
                .get(name)
                .is_some_and(|t| t.ggml_type == header::GGML_MXFP4);
            let (dims, data) = if is_mxfp4 {
                let (dims, bytes) = self.file.read_mxfp4(name)?;
                (dims, StackedData::Mxfp4(bytes))
            } else {
                let raw = self.read_raw(name)?;
                (raw.shape().dims().to_vec(), StackedData::Ggml(raw))
            };
            if dims.len() != 3 {
                return Err(ModelError::InvalidFile {
                    path: self.file.path.clone(),
                    message: format!("expert tensor '{name}' is not 3-D: {dims:?}"),
                });
            }
            let this_layer = layer(name);
            self.stacked.retain(|s| layer(&s.name) == this_layer);
            self.stacked.push(Stacked {
                name: name.to_string(),
                dims,
                data,
                bytes: None,
                dense: None,
            });
        }
        self.stacked
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| ModelError::Config("stacked tensor cache".into()))
    }

    /// Expert `hf`'s `[rows, cols]` slice of its stacked tensor, checked against `shape`:
    /// quantized bytes when `quantized`, else dequantized to the serving dtype. MXFP4 experts
    /// stay MXFP4 on the CPU whatever the serving dtype (their kernel expands them to f32).
    fn expert(&mut self, hf: &str, shape: &[usize], quantized: bool) -> Result<LinearWeight> {
        let (name, e) = expert_name(hf).ok_or_else(|| ModelError::MissingTensor {
            path: self.file.path.clone(),
            tensor: hf.to_string(),
        })?;
        let path = self.file.path.clone();
        let (dtype, device, arithmetic) = (self.dtype, self.device.clone(), self.arithmetic);
        let st = self.stacked(&name)?;
        let dims = st.dims.clone();
        if dims.len() != 3 || e >= dims[0] || dims[1..] != *shape {
            return Err(ModelError::ShapeMismatch {
                path,
                tensor: format!("{name}[{e}]"),
                expected: shape.to_vec(),
                actual: dims,
            });
        }
        let (rows, cols) = (dims[1], dims[2]);
        let short = || ModelError::InvalidFile {
            path: path.clone(),
            message: format!("expert tensor '{name}' is shorter than its shape"),
        };
        let raw = match &st.data {
            StackedData::Mxfp4(all) => {
                let per_expert = rows * cols / BLOCK * header::MXFP4_BLOCK_BYTES;
                let bytes = all
                    .get(e * per_expert..(e + 1) * per_expert)
                    .ok_or_else(short)?;
                let m = Mxfp4Matrix::from_ggml(rows, cols, bytes)?;
                if device.is_cpu() {
                    return Ok(LinearWeight::Mxfp4(std::sync::Arc::new(m)));
                }
                let t = Tensor::from_vec(m.dequantize(), (rows, cols), &Device::Cpu)?;
                return Ok(LinearWeight::Dense(t.to_dtype(dtype)?.to_device(&device)?));
            }
            StackedData::Ggml(raw) => raw,
        };
        let ggml = raw.dtype();
        if quantized && is_block_quantized(ggml) {
            let row_bytes = cols / ggml.block_size() * ggml.type_size();
            let per_expert = rows * row_bytes;
            if st.bytes.is_none() {
                st.bytes = Some(raw.data()?.into_owned());
            }
            let bytes = st
                .bytes
                .as_deref()
                .and_then(|b| b.get(e * per_expert..(e + 1) * per_expert))
                .ok_or_else(short)?
                .to_vec();
            let m = QuantMatrix::new(ggml, rows, cols, bytes)?.with_arithmetic(arithmetic);
            return Ok(LinearWeight::Quantized(std::sync::Arc::new(m)));
        }
        if st.dense.is_none() {
            st.dense = Some(raw.dequantize(&Device::Cpu)?);
        }
        let all = st
            .dense
            .as_ref()
            .ok_or_else(|| ModelError::Config("stacked tensor cache".into()))?;
        let t = all.get(e)?.to_dtype(dtype)?.to_device(&device)?;
        Ok(LinearWeight::Dense(t))
    }

    /// Multiply the quantized linear weights with `arithmetic` (bf16 products or exact f32).
    pub fn with_arithmetic(mut self, arithmetic: CpuArithmetic) -> Self {
        self.arithmetic = arithmetic;
        self
    }

    /// The GGUF name of `hf` and its tensor info, or a clear error.
    fn info(&self, hf: &str) -> Result<(String, candle_core::quantized::GgmlDType, Vec<usize>)> {
        let path = self.file.path.clone();
        let name = gguf_name(hf, self.post_attention).ok_or_else(|| ModelError::MissingTensor {
            path: path.clone(),
            tensor: hf.to_string(),
        })?;
        let info =
            self.file
                .content
                .tensor_infos
                .get(&name)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: path.clone(),
                    tensor: name.clone(),
                })?;
        Ok((name, info.ggml_dtype, info.shape.dims().to_vec()))
    }

    /// Head count to undo llama.cpp's Q/K permutation with, for tensors that need it.
    fn unpermute_heads(&self, hf: &str) -> Option<usize> {
        let (heads, kv_heads) = self.unpermute?;
        if hf.ends_with("q_proj.weight") {
            Some(heads)
        } else if hf.ends_with("k_proj.weight") {
            Some(kv_heads)
        } else {
            None
        }
    }

    fn read(&mut self, hf: &str) -> Result<Tensor> {
        let (name, _, _) = self.info(hf)?;
        let q = self.read_raw(&name)?;
        let mut t = q.dequantize(&Device::Cpu)?;
        if let Some(heads) = self.unpermute_heads(hf) {
            t = unpermute_rows(&t, heads)?;
        }
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }
}

/// Inverse of llama.cpp's `permute(w, n_head)`: rows are stored per head as (pair, half) and HF
/// wants (half, pair).
fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        return Err(ModelError::Config(format!(
            "cannot split {rows} rows into {heads} heads"
        )));
    }
    let half = rows / heads / 2;
    Ok(w.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

impl WeightSource for GgufWeights<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if expert_name(name).is_some() {
            return self
                .expert(name, shape, false)?
                .to_dense(self.dtype, &self.device);
        }
        let mut t = self.read(name)?;
        // llama.cpp stores a `[1, n]` matrix (Qwen2-MoE's shared-expert gate) as a vector.
        if shape.len() == 2 && shape[0] == 1 && t.dims() == [shape[1]] {
            t = t.reshape(shape)?;
        }
        check_shape(
            &self.origin(),
            &gguf_name(name, self.post_attention).unwrap_or_else(|| name.to_string()),
            &t,
            shape,
        )?;
        Ok(t)
    }

    fn contains(&self, name: &str) -> bool {
        if let Some((stacked, _)) = expert_name(name) {
            return self.file.has_tensor(&stacked);
        }
        gguf_name(name, self.post_attention).is_some_and(|n| self.file.has_tensor(&n))
    }

    fn origin(&self) -> String {
        self.file.path.display().to_string()
    }

    fn get_linear(&mut self, name: &str, shape: &[usize]) -> Result<LinearWeight> {
        if expert_name(name).is_some() {
            let quantized = self.keep_quantized;
            return self
                .expert(name, shape, quantized)?
                .with_arithmetic(self.arithmetic);
        }
        let (gguf, dtype, dims) = self.info(name)?;
        if !self.keep_quantized || !is_block_quantized(dtype) || dims.len() != 2 {
            return LinearWeight::Dense(self.get(name, shape)?).with_arithmetic(self.arithmetic);
        }
        let path = self.file.path.clone();
        if dims != shape {
            return Err(ModelError::ShapeMismatch {
                path,
                tensor: gguf,
                expected: shape.to_vec(),
                actual: dims,
            });
        }
        let bytes = self.read_raw(&gguf)?.data()?.into_owned();
        let (rows, cols) = (dims[0], dims[1]);
        let mut matrix =
            QuantMatrix::new(dtype, rows, cols, bytes)?.with_arithmetic(self.arithmetic);
        if let Some(heads) = self.unpermute_heads(name) {
            if heads == 0 || rows % (2 * heads) != 0 {
                return Err(ModelError::Config(format!(
                    "cannot split {rows} rows into {heads} heads"
                )));
            }
            let half = rows / heads / 2;
            let order: Vec<usize> = (0..rows)
                .map(|o| {
                    let (h, rest) = (o / (2 * half), o % (2 * half));
                    let (a, b) = (rest / half, rest % half);
                    h * 2 * half + b * 2 + a
                })
                .collect();
            matrix = matrix.permute_rows(&order)?;
        }
        Ok(LinearWeight::Quantized(std::sync::Arc::new(matrix)))
    }

    fn keeps_quantized(&self) -> bool {
        self.keep_quantized
    }

    fn arithmetic(&self) -> CpuArithmetic {
        self.arithmetic
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file: no tensors, one u32 metadata entry.
    fn header_with_u32(key: &str, value: u32) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&(key.len() as u64).to_le_bytes());
        b.extend_from_slice(key.as_bytes());
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&value.to_le_bytes());
        b
    }

    #[test]
    fn zero_alignment_is_an_error_not_a_panic() {
        let path =
            std::env::temp_dir().join(format!("spindle-gguf-align0-{}.gguf", std::process::id()));
        std::fs::write(&path, header_with_u32("general.alignment", 0)).unwrap();
        let zero = GgufFile::open(&path);
        std::fs::write(&path, header_with_u32("general.alignment", 32)).unwrap();
        let ok = GgufFile::open(&path);
        let _ = std::fs::remove_file(&path);
        assert!(matches!(zero, Err(ModelError::InvalidFile { .. })));
        assert!(ok.is_ok());
    }

    /// A GGUF v3 file with one `[2, 32]` tensor of ggml type `ggml_type` and `data` bytes.
    fn one_tensor_gguf(name: &str, ggml_type: u32, data: &[u8]) -> PathBuf {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes()); // one tensor
        b.extend_from_slice(&0u64.to_le_bytes()); // no metadata
        b.extend_from_slice(&(name.len() as u64).to_le_bytes());
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&32u64.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&ggml_type.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.resize(b.len().next_multiple_of(32), 0);
        b.extend_from_slice(data);
        let path = std::env::temp_dir().join(format!(
            "spindle-gguf-type{ggml_type}-{}-{}.gguf",
            std::process::id(),
            data.len()
        ));
        std::fs::write(&path, b).unwrap();
        path
    }

    /// Tensor types candle lacks no longer make the file unreadable: MXFP4 bytes are read
    /// (bounds-checked), other types are refused by name when asked for.
    #[test]
    fn tensors_of_types_candle_lacks_are_kept_aside() {
        let name = "blk.0.ffn_up_exps.weight";
        let data: Vec<u8> = (0..34u8).collect();
        let path = one_tensor_gguf(name, header::GGML_MXFP4, &data);
        let mut file = GgufFile::open(&path).expect("opens");
        assert!(file.has_tensor(name));
        let (shape, bytes) = file.read_mxfp4(name).expect("bytes");
        assert_eq!((shape, bytes), (vec![2, 32], data.clone()));
        let _ = std::fs::remove_file(&path);
        let cut = one_tensor_gguf(name, header::GGML_MXFP4, &data[..20]);
        let short = GgufFile::open(&cut).expect("opens").read_mxfp4(name);
        let _ = std::fs::remove_file(&cut);
        assert!(
            matches!(short, Err(ModelError::InvalidFile { .. })),
            "{short:?}"
        );

        let iq = one_tensor_gguf("token_embd.weight", 16, &data);
        let mut file = GgufFile::open(&iq).expect("opens");
        let config = ModelConfig::from_hf_json(
            r#"{"model_type": "llama", "vocab_size": 32, "hidden_size": 32,
                "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}"#,
        )
        .expect("config");
        let mut weights = GgufWeights::new(&mut file, &config, DType::F32, Device::Cpu);
        let Err(err) = weights.read_raw("token_embd.weight") else {
            panic!("an IQ2_XXS tensor was read");
        };
        let _ = std::fs::remove_file(&iq);
        assert!(err.to_string().contains("IQ2_XXS"), "{err}");
    }

    /// A minimal Llama GGUF's metadata plus `rope_freqs.weight` (as llama.cpp writes Llama 3.x
    /// files): the config carries the factors, and a wrong-sized tensor is an error.
    fn write_llama_gguf(path: &Path, factors: &[f32]) {
        use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
        let meta: Vec<(&str, gguf_file::Value)> = vec![
            (
                "general.architecture",
                gguf_file::Value::String("llama".into()),
            ),
            ("llama.embedding_length", gguf_file::Value::U32(64)),
            ("llama.attention.head_count", gguf_file::Value::U32(4)),
            ("llama.attention.head_count_kv", gguf_file::Value::U32(2)),
            ("llama.feed_forward_length", gguf_file::Value::U32(96)),
            ("llama.block_count", gguf_file::Value::U32(2)),
            ("llama.vocab_size", gguf_file::Value::U32(97)),
            ("llama.rope.freq_base", gguf_file::Value::F32(500000.0)),
        ];
        let t = Tensor::from_vec(factors.to_vec(), factors.len(), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        let meta_refs: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &meta_refs, &[("rope_freqs.weight", &q)]).unwrap();
    }

    #[test]
    fn rope_freqs_are_read_into_the_config() {
        let path =
            std::env::temp_dir().join(format!("spindle-ropefreqs-{}.gguf", std::process::id()));
        let factors: Vec<f32> = (0..8).map(|i| 1.0 + i as f32).collect();
        write_llama_gguf(&path, &factors);
        let config = GgufFile::open(&path).unwrap().config().unwrap();
        assert_eq!(config.head_dim, 16);
        assert_eq!(config.rope_theta, 500000.0);
        assert_eq!(
            config.rope_freq_factors,
            Some(factors.iter().map(|&f| f64::from(f)).collect())
        );
        write_llama_gguf(&path, &factors[..5]);
        let short = GgufFile::open(&path).unwrap().config();
        write_llama_gguf(&path, &[0.0; 8]);
        let zero = GgufFile::open(&path).unwrap().config();
        let _ = std::fs::remove_file(&path);
        assert!(matches!(short, Err(ModelError::InvalidFile { .. })));
        assert!(matches!(zero, Err(ModelError::InvalidFile { .. })));
    }
}
