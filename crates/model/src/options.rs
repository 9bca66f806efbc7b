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
    /// f32 on CPU (candle's CPU matmul has no fast bf16 path), bf16 on CUDA.
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
    pub device: DeviceChoice,
    /// Overrides the model's context length (must not exceed it).
    pub max_model_len: Option<usize>,
    /// A chat template (file path or inline Jinja) replacing the model's own.
    pub chat_template: Option<String>,
    /// Seed for dummy weights.
    pub seed: u64,
}
