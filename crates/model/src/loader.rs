//! From a `--model` argument to a ready model: decide what kind of source it is, read config,
//! tokenizer and weights, and report one summary line.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};

use crate::bert::BertModel;
use crate::config::ModelConfig;
use crate::cpu_bf16::{self, CpuArithmetic};
use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, GgufWeights};
use crate::hf::{
    fetch_from_hub, load_encoder_tokenizer, load_tokenizer, parse_repo_id, SafetensorsWeights,
};
use crate::info::ModelInfo;
use crate::llama::LlamaModel;
use crate::options::{CpuArithmeticChoice, DTypeChoice, DeviceChoice, LoadFormat, LoadOptions};
use crate::tokenizer::TokenizerBundle;
use crate::weights::{DummyWeights, WeightSource};

/// What `--model` turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A single GGUF file carrying weights, tokenizer and chat template.
    Gguf(PathBuf),
    /// A Hugging Face model directory (config.json + safetensors + tokenizer files).
    HfDirectory(PathBuf),
    /// A Hub repo id, downloaded into the HF cache first.
    Hub {
        repo_id: String,
        revision: Option<String>,
    },
    /// Random weights for the config.json at this path (a file or a directory holding one).
    Dummy(PathBuf),
}

impl ModelSource {
    /// Resolve `options.model` and `options.load_format` into a source, without loading.
    pub fn resolve(options: &LoadOptions) -> Result<Self> {
        let path = Path::new(&options.model);
        if options.model.is_empty() {
            return Err(ModelError::Config("no model given (--model)".into()));
        }
        match options.load_format {
            LoadFormat::Dummy => {
                if !path.exists() {
                    return Err(ModelError::NotFound(path.to_path_buf()));
                }
                return Ok(Self::Dummy(path.to_path_buf()));
            }
            LoadFormat::Gguf => return Ok(Self::Gguf(path.to_path_buf())),
            LoadFormat::Safetensors | LoadFormat::Auto => {}
        }
        if path.is_file() {
            if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
            {
                return Ok(Self::Gguf(path.to_path_buf()));
            }
            return Err(ModelError::Unsupported(format!(
                "{}: expected a .gguf file or a model directory",
                path.display()
            )));
        }
        if path.is_dir() {
            let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| ModelError::Io {
                    path: path.to_path_buf(),
                    source: e,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
                })
                .collect();
            if path.join("config.json").exists() || options.load_format == LoadFormat::Safetensors {
                return Ok(Self::HfDirectory(path.to_path_buf()));
            }
            if ggufs.len() == 1 {
                return Ok(Self::Gguf(ggufs[0].clone()));
            }
            return Err(ModelError::Config(format!(
                "{}: no config.json and {} .gguf files; point --model at one file",
                path.display(),
                ggufs.len()
            )));
        }
        if let Some((repo_id, revision)) = parse_repo_id(&options.model) {
            return Ok(Self::Hub {
                repo_id,
                revision: options.revision.clone().or(revision),
            });
        }
        Err(ModelError::NotFound(path.to_path_buf()))
    }
}

/// A loaded embedding model (encoder) with its tokenizer and a summary.
pub struct LoadedEncoder {
    pub model: BertModel,
    pub tokenizer: TokenizerBundle,
    /// `max_model_len` is the longest input (sentence-transformers' `max_seq_length`).
    pub info: ModelInfo,
}

/// What `--model` turned out to be: a decoder to generate with, or an encoder to embed with.
pub enum Loaded {
    Decoder(LoadedModel),
    Encoder(LoadedEncoder),
}

/// Whether a model directory holds a BERT-family encoder (what sentence-transformers
/// embedding models are) rather than a decoder.
pub fn is_encoder_dir(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    let bert_type = json
        .get("model_type")
        .and_then(|v| v.as_str())
        .is_some_and(|t| t == "bert");
    let bert_arch = json
        .get("architectures")
        .and_then(|v| v.as_array())
        .is_some_and(|a| {
            a.iter()
                .filter_map(|x| x.as_str())
                .any(|x| x.starts_with("Bert"))
        });
    bert_type || bert_arch
}

/// Load whatever `options.model` is: an encoder directory (or Hub repo) as an embedding model,
/// anything else as a decoder through [`load`].
pub fn load_any(options: &LoadOptions) -> Result<Loaded> {
    let dir = match ModelSource::resolve(options)? {
        ModelSource::HfDirectory(dir) => Some(dir),
        ModelSource::Hub { repo_id, revision } => {
            Some(fetch_from_hub(&repo_id, revision.as_deref())?)
        }
        _ => None,
    };
    match dir {
        Some(dir) if is_encoder_dir(&dir) => Ok(Loaded::Encoder(load_encoder(&dir, options)?)),
        _ => Ok(Loaded::Decoder(load(options)?)),
    }
}

/// Load a BERT-family encoder with its sentence-transformers head (CPU; bf16 products under
/// `--dtype auto`/`bfloat16` where the CPU has them, else f32).
pub fn load_encoder(dir: &Path, options: &LoadOptions) -> Result<LoadedEncoder> {
    let started = Instant::now();
    if options.device != DeviceChoice::Cpu {
        return Err(ModelError::Unsupported(
            "embedding models run on the CPU only (use --device cpu)".into(),
        ));
    }
    // `bfloat16`, and `auto` where `vdpbf16ps` is native: bf16 products (cosine >= 0.9999 to
    // the fp32 reference); `float32` keeps the exact path, as `auto` does where bf16 products
    // would be emulated (AVX2: slower than f32, measured in benches/RESULTS.md).
    let bf16 = match options.dtype {
        DTypeChoice::Auto => cpu_bf16::native(),
        DTypeChoice::BFloat16 => true,
        DTypeChoice::Float32 | DTypeChoice::Float16 => false,
    };
    let model = if bf16 {
        BertModel::load(dir)?.with_bf16_products()?
    } else {
        BertModel::load(dir)?
    };
    let tokenizer = load_encoder_tokenizer(dir)?;
    let max_model_len = served_len(model.max_input_len(), options, "input limit")?;
    let info = ModelInfo {
        architecture: "bert".into(),
        max_model_len,
        vocab_size: model.config().vocab_size,
        num_parameters: model.num_parameters(),
        active_parameters: model.num_parameters(),
        dtype: if model.uses_bf16() {
            "bfloat16"
        } else {
            "float32"
        }
        .into(),
        device: options.device.to_string(),
    };
    tracing::info!(
        "loaded embedding model ({}, {}, {} pooling{}): {:.1}M parameters, {} dimensions, max input {} tokens, in {:.2}s",
        info.architecture,
        info.dtype,
        format!("{:?}", model.head().pooling).to_lowercase(),
        if model.head().normalize { ", normalized" } else { "" },
        info.num_parameters as f64 / 1e6,
        model.hidden_size(),
        info.max_model_len,
        started.elapsed().as_secs_f64()
    );
    Ok(LoadedEncoder {
        model,
        tokenizer,
        info,
    })
}

/// A loaded model with its tokenizer and a summary.
pub struct LoadedModel {
    pub model: LlamaModel,
    pub tokenizer: TokenizerBundle,
    pub info: ModelInfo,
}

fn select_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(ordinal) => {
            if !cfg!(feature = "cuda") {
                return Err(ModelError::Unsupported(format!(
                    "--device cuda:{ordinal} needs a CUDA build of spindle: rebuild with \
                     `cargo build --release --features cuda` (see README, CUDA section)"
                )));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
    }
}

/// The CPU arithmetic `--dtype auto` gets where the CPU has it: bf16 products are the fastest
/// mode at concurrency and in prefill, as fast as f32 for a single stream, and pass the
/// accuracy contract with the highest exact-match share of the faster modes (docs/cpu-arithmetic.md).
const CPU_DEFAULT_ARITHMETIC: CpuArithmetic = CpuArithmetic::Bf16;

/// The activation dtype and, on the CPU, how linear layers multiply. On the CPU the forward
/// pass stays f32 and `--dtype bfloat16` means bf16 products in the linear layers (AVX-512 BF16
/// kernels, emulated on AVX2; f32 accumulation), which is where bf16 pays off on a CPU;
/// `--cpu-arithmetic` chooses directly (int8 included).
fn select_dtype(
    choice: DTypeChoice,
    arithmetic: CpuArithmeticChoice,
    device: &Device,
) -> (DType, CpuArithmetic) {
    let dtype = match choice {
        DTypeChoice::Auto if device.is_cuda() => DType::BF16,
        DTypeChoice::Auto | DTypeChoice::Float32 => DType::F32,
        DTypeChoice::Float16 => DType::F16,
        DTypeChoice::BFloat16 => DType::BF16,
    };
    if device.is_cuda() {
        if arithmetic != CpuArithmeticChoice::Auto {
            tracing::warn!("--cpu-arithmetic applies to the CPU only; ignored on CUDA");
        }
        return (dtype, CpuArithmetic::F32);
    }
    if dtype == DType::F16 && arithmetic == CpuArithmeticChoice::Auto {
        // vLLM users sometimes pass --dtype half on CPU out of habit; here that is a slow path.
        tracing::warn!(
            "float16 on the CPU runs candle's generic kernels, about 10x slower than float32 or bfloat16 here: use --dtype auto or bfloat16"
        );
        return (dtype, CpuArithmetic::F32);
    }
    let wanted = match (arithmetic, choice) {
        (CpuArithmeticChoice::Float32, _) => CpuArithmetic::F32,
        (CpuArithmeticChoice::BFloat16, _) => CpuArithmetic::Bf16,
        (CpuArithmeticChoice::Int8, _) => CpuArithmetic::Int8,
        // Emulated bf16 products (AVX2) are exact to the same contract but slower than f32
        // there: `auto` takes them only where `vdpbf16ps` runs natively.
        (CpuArithmeticChoice::Auto, DTypeChoice::Auto) if !cpu_bf16::native() => {
            tracing::info!(
                "this CPU (or SPINDLE_CPU_ISA) has no AVX-512 BF16: the linear layers run float32"
            );
            CpuArithmetic::F32
        }
        (CpuArithmeticChoice::Auto, DTypeChoice::Auto) => CPU_DEFAULT_ARITHMETIC,
        (CpuArithmeticChoice::Auto, DTypeChoice::BFloat16) => CpuArithmetic::Bf16,
        (CpuArithmeticChoice::Auto, _) => CpuArithmetic::F32,
    };
    let available = match wanted {
        CpuArithmetic::F32 => true,
        CpuArithmetic::Bf16 => cpu_bf16::supported(),
        CpuArithmetic::Int8 => crate::quant::int8::available(),
    };
    if !available {
        tracing::warn!(
            "this CPU lacks the instructions for {} products: using float32",
            arithmetic_name(wanted)
        );
        return (DType::F32, CpuArithmetic::F32);
    }
    (DType::F32, wanted)
}

fn arithmetic_name(a: CpuArithmetic) -> &'static str {
    match a {
        CpuArithmetic::F32 => "float32",
        CpuArithmetic::Bf16 => "bfloat16",
        CpuArithmetic::Int8 => "int8",
    }
}

/// The dtype name a model reports: what its linear layers compute in.
fn serving_dtype_name(dtype: DType, arithmetic: CpuArithmetic) -> &'static str {
    match arithmetic {
        CpuArithmetic::F32 => dtype_name(dtype),
        other => arithmetic_name(other),
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// A chat template given on the command line: a file path or the template itself.
fn chat_template_override(value: &str) -> Result<String> {
    let path = Path::new(value);
    if !value.contains("{%") && !value.contains("{{") {
        return std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            source: e,
        });
    }
    Ok(value.to_string())
}

fn dummy_config_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    }
}

/// Load a model as `options` say, logging one summary line at the end.
pub fn load(options: &LoadOptions) -> Result<LoadedModel> {
    let started = Instant::now();
    let source = ModelSource::resolve(options)?;
    let device = select_device(options.device)?;
    let (dtype, arithmetic) = select_dtype(options.dtype, options.cpu_arithmetic, &device);
    let dtype_label = serving_dtype_name(dtype, arithmetic);
    tracing::info!(?source, dtype = dtype_label, device = %options.device, "loading model");

    let (config, mut tokenizer, model) = match &source {
        ModelSource::Gguf(path) => {
            let mut file = GgufFile::open(path)?;
            let config = file.config()?;
            let tokenizer = file.vocab()?.build()?;
            let max_pos = max_positions(&config, options)?;
            let mut weights = GgufWeights::new(&mut file, &config, dtype, device.clone())
                .with_arithmetic(arithmetic);
            let model = load_with_progress(config.clone(), &mut weights, max_pos, dtype, &device)?;
            (config, tokenizer, model)
        }
        ModelSource::HfDirectory(dir) => load_hf_dir(dir, options, (dtype, arithmetic), &device)?,
        ModelSource::Hub { repo_id, revision } => {
            let dir = fetch_from_hub(repo_id, revision.as_deref())?;
            load_hf_dir(&dir, options, (dtype, arithmetic), &device)?
        }
        ModelSource::Dummy(path) => {
            let config_path = dummy_config_path(path);
            let text = std::fs::read_to_string(&config_path).map_err(|e| ModelError::Io {
                path: config_path.clone(),
                source: e,
            })?;
            let config = ModelConfig::from_hf_json(&text)?;
            let dir = config_path.parent().unwrap_or(Path::new("."));
            let tokenizer = if dir.join("tokenizer.json").exists() {
                load_tokenizer(dir)?
            } else {
                TokenizerBundle::byte_fallback(config.vocab_size)?
            };
            let max_pos = max_positions(&config, options)?;
            let mut weights =
                DummyWeights::new(options.seed, dtype, device.clone(), config.qkv_bias)
                    .with_arithmetic(arithmetic);
            let model = load_with_progress(config.clone(), &mut weights, max_pos, dtype, &device)?;
            (config, tokenizer, model)
        }
    };
    if let Some(template) = &options.chat_template {
        tokenizer.chat_template = Some(chat_template_override(template)?);
    }
    let info = ModelInfo {
        architecture: config.architecture.as_str().to_string(),
        max_model_len: max_positions(&config, options)?,
        vocab_size: config.vocab_size,
        num_parameters: config.num_parameters(),
        active_parameters: config.active_parameters(),
        dtype: dtype_label.to_string(),
        device: options.device.to_string(),
    };
    let experts = match &config.moe {
        Some(m) => format!(
            " ({:.1}M active per token: {} of {} experts)",
            info.active_parameters as f64 / 1e6,
            m.top_k,
            m.num_experts
        ),
        None => String::new(),
    };
    tracing::info!(
        "loaded {}: {:.1}M parameters{experts}, {}, {}, max_model_len {}, in {:.2}s",
        info.architecture,
        info.num_parameters as f64 / 1e6,
        info.dtype,
        info.device,
        info.max_model_len,
        started.elapsed().as_secs_f64()
    );
    Ok(LoadedModel {
        model,
        tokenizer,
        info,
    })
}

/// The context length we serve: the model's, or a smaller `--max-model-len`.
fn max_positions(config: &ModelConfig, options: &LoadOptions) -> Result<usize> {
    served_len(config.max_position_embeddings, options, "context length")
}

/// The model's `limit` (its `what`), or a smaller `--max-model-len`.
fn served_len(limit: usize, options: &LoadOptions, what: &str) -> Result<usize> {
    match options.max_model_len {
        None => Ok(limit),
        Some(0) => Err(ModelError::Config(
            "--max-model-len must be positive".into(),
        )),
        Some(n) if n > limit => Err(ModelError::Config(format!(
            "--max-model-len {n} exceeds the model's {what} {limit}"
        ))),
        Some(n) => Ok(n),
    }
}

fn load_hf_dir(
    dir: &Path,
    options: &LoadOptions,
    (dtype, arithmetic): (DType, CpuArithmetic),
    device: &Device,
) -> Result<(ModelConfig, TokenizerBundle, LlamaModel)> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ModelError::NotFound(config_path.clone()),
        _ => ModelError::Io {
            path: config_path.clone(),
            source: e,
        },
    })?;
    let config = ModelConfig::from_hf_json(&text)?;
    let tokenizer = load_tokenizer(dir)?;
    let max_pos = max_positions(&config, options)?;
    let mut weights =
        SafetensorsWeights::open(dir, dtype, device.clone())?.with_arithmetic(arithmetic);
    let model = load_with_progress(config.clone(), &mut weights, max_pos, dtype, device)?;
    Ok((config, tokenizer, model))
}

/// Load the layers with a progress bar (drawn only when stderr is a terminal).
fn load_with_progress(
    config: ModelConfig,
    weights: &mut dyn WeightSource,
    max_positions: usize,
    dtype: DType,
    device: &Device,
) -> Result<LlamaModel> {
    let bar = indicatif::ProgressBar::new((config.num_layers + 2) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("loading weights {bar:40} {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let model = LlamaModel::load(config, weights, max_positions, dtype, device, |done, _| {
        bar.set_position(done as u64)
    });
    bar.finish_and_clear();
    model
}
