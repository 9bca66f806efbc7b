//! How a caller asks for a model: the `--model`, `--load-format`, `--dtype`, `--device` choices.

use std::fmt;
use std::str::FromStr;

/// `--load-format`: how to read weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadFormat {
    /// Guess from the path: a `.gguf` file, a directory with safetensors, or a Hub repo id.
    #[default]
    Auto,
    Gguf,
    Safetensors,
    /// Random weights of the configured shapes, for benchmarking without downloads.
    Dummy,
}

impl FromStr for LoadFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "gguf" => Ok(Self::Gguf),
            "safetensors" => Ok(Self::Safetensors),
            "dummy" => Ok(Self::Dummy),
            other => Err(format!(
                "unsupported load format '{other}' (expected auto, gguf, safetensors or dummy)"
            )),
        }
    }
}

/// `--dtype`: the serving dtype weights are converted to at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    /// CPU: f32 activations with bf16 products in the linear layers where the CPU has AVX-512
    /// BF16 (else f32); CUDA: bf16.
    #[default]
    Auto,
    Float32,
    Float16,
    BFloat16,
}

impl FromStr for DTypeChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "float32" | "float" | "fp32" | "f32" => Ok(Self::Float32),
            "float16" | "half" | "fp16" | "f16" => Ok(Self::Float16),
            "bfloat16" | "bf16" => Ok(Self::BFloat16),
            other => Err(format!(
                "unsupported dtype '{other}' (expected auto, float32, float16 or bfloat16)"
            )),
        }
    }
}

/// `--cpu-arithmetic`: how the CPU linear layers multiply (spindle's own flag; `auto` follows
/// `--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuArithmeticChoice {
    /// `--dtype float32`: f32; `--dtype bfloat16`: bf16; `--dtype auto`: bf16 where the CPU
    /// has AVX-512 BF16, else f32.
    #[default]
    Auto,
    /// f32 products, exact against an f32 reference.
    Float32,
    /// bf16 products with f32 accumulation (AVX-512 BF16; emulated on AVX2).
    BFloat16,
    /// int8 activations with integer dot products on GGUF block weights (AVX-512 VNNI, or
    /// AVX2's `vpmaddubsw`).
    Int8,
}

impl FromStr for CpuArithmeticChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "float32" | "f32" => Ok(Self::Float32),
            "bfloat16" | "bf16" => Ok(Self::BFloat16),
            "int8" => Ok(Self::Int8),
            other => Err(format!(
                "unsupported CPU arithmetic '{other}' (expected auto, float32, bfloat16 or int8)"
            )),
        }
    }
}

/// `--device`: where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(Self::Cuda(ordinal)),
                _ => Err(format!(
                    "unsupported device '{other}' (expected cpu, cuda or cuda:N)"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Everything needed to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// A `.gguf` file, a Hugging Face model directory, or a Hub repo id `org/name[@revision]`.
    pub model: String,
    /// Hub revision (`--revision`); `@rev` in `model` works too.
    pub revision: Option<String>,
    pub load_format: LoadFormat,
    pub dtype: DTypeChoice,
    /// How the CPU linear layers multiply.
    pub cpu_arithmetic: CpuArithmeticChoice,
    pub device: DeviceChoice,
    /// Overrides the model's context length (must not exceed it).
    pub max_model_len: Option<usize>,
    /// A chat template (file path or inline Jinja) replacing the model's own.
    pub chat_template: Option<String>,
    /// Seed for dummy weights.
    pub seed: u64,
}
