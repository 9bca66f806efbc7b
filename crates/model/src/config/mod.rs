//! The architecture-independent description of a decoder, filled from GGUF metadata or a Hugging
//! Face `config.json` (transformers v4 or v5 keys). One struct covers every family the decoder
//! runs: shapes, rope, the family's traits ([`FamilyTraits`]: norm placement, activation,
//! multipliers, soft-caps, sliding and no-rope layers) and, for mixtures of experts, the
//! experts ([`MoeSpec`]). Settings of mechanisms this forward pass does not run are refused, not
//! ignored.

mod family;
mod moe;
mod rope;

use serde::Deserialize;

use crate::error::{ModelError, Result};

pub use family::{Activation, BlockNorms, FamilyTraits, LayerKind};
pub use moe::{MoeRouting, MoeSpec};
pub use rope::{
    Llama3RopeScaling, LongRopeScaling, RopeScaling, RopeSettings, RopeSpec, YarnRopeScaling,
};

/// Which family a checkpoint belongs to; decides defaults and weight-name conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    /// Gemma 3's text model (`Gemma3ForCausalLM`, `model_type` `gemma3_text`).
    Gemma3,
    SmolLM3,
    Olmo2,
    Granite,
    /// Phi-3, Phi-3.5 and Phi-4-mini (`Phi3ForCausalLM`).
    Phi3,
    /// Mistral's attention with top-2 experts (a GGUF `llama` with `expert_count`).
    Mixtral,
    /// Qwen2's attention, routed experts plus a sigmoid-gated shared expert.
    Qwen2Moe,
    /// Qwen3's attention (q/k norm) with routed experts.
    Qwen3Moe,
    /// OLMoE: Llama blocks with q/k norm over the whole projection and routed experts.
    Olmoe,
    /// gpt-oss: attention sinks, biases everywhere, alternating sliding and full layers,
    /// top-k-then-softmax routing and a clamped SwiGLU.
    GptOss,
}

/// Every family, in the order error messages list them.
pub const SUPPORTED_ARCHITECTURES: [Architecture; 15] = [
    Architecture::Llama,
    Architecture::Mistral,
    Architecture::Qwen2,
    Architecture::Qwen3,
    Architecture::Gemma2,
    Architecture::Gemma3,
    Architecture::SmolLM3,
    Architecture::Olmo2,
    Architecture::Granite,
    Architecture::Phi3,
    Architecture::Mixtral,
    Architecture::Qwen2Moe,
    Architecture::Qwen3Moe,
    Architecture::Olmoe,
    Architecture::GptOss,
];

impl Architecture {
    /// Map an HF `architectures[0]`/`model_type` or a GGUF `general.architecture` to a family.
    pub fn parse(name: &str) -> Result<Self> {
        let lower = name.to_ascii_lowercase();
        let arch = match lower.as_str() {
            "llama" | "llamaforcausallm" => Architecture::Llama,
            "mistral" | "mistralforcausallm" => Architecture::Mistral,
            "qwen2" | "qwen2forcausallm" => Architecture::Qwen2,
            "qwen3" | "qwen3forcausallm" => Architecture::Qwen3,
            "gemma2" | "gemma2forcausallm" => Architecture::Gemma2,
            "gemma3" | "gemma3_text" | "gemma3forcausallm" => Architecture::Gemma3,
            "smollm3" | "smollm3forcausallm" => Architecture::SmolLM3,
            "olmo2" | "olmo2forcausallm" => Architecture::Olmo2,
            "granite" | "graniteforcausallm" => Architecture::Granite,
            "phi3" | "phi3forcausallm" => Architecture::Phi3,
            "mixtral" | "mixtralforcausallm" => Architecture::Mixtral,
            "qwen2moe" | "qwen2_moe" | "qwen2moeforcausallm" => Architecture::Qwen2Moe,
            "qwen3moe" | "qwen3_moe" | "qwen3moeforcausallm" => Architecture::Qwen3Moe,
            "olmoe" | "olmoeforcausallm" => Architecture::Olmoe,
            "gpt_oss" | "gpt-oss" | "gptossforcausallm" => Architecture::GptOss,
            _ => return Err(ModelError::UnsupportedArchitecture(name.to_string())),
        };
        Ok(arch)
    }

    /// Whether the family's MLPs are mixtures of experts.
    pub fn has_experts(self) -> bool {
        use Architecture::*;
        matches!(self, Mixtral | Qwen2Moe | Qwen3Moe | Olmoe | GptOss)
    }

    /// The supported families' names, for error messages.
    pub fn supported_list() -> String {
        SUPPORTED_ARCHITECTURES
            .iter()
            .map(|a| a.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Gemma2 => "gemma2",
            Architecture::Gemma3 => "gemma3",
            Architecture::SmolLM3 => "smollm3",
            Architecture::Olmo2 => "olmo2",
            Architecture::Granite => "granite",
            Architecture::Phi3 => "phi3",
            Architecture::Mixtral => "mixtral",
            Architecture::Qwen2Moe => "qwen2moe",
            Architecture::Qwen3Moe => "qwen3moe",
            Architecture::Olmoe => "olmoe",
            Architecture::GptOss => "gpt-oss",
        }
    }
}

/// Shapes and switches of a decoder-only Llama-style transformer (dense or mixture-of-experts).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// The rope of full-attention layers (of every layer, for most families).
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// Gemma 3: the rope of sliding-window layers (its own base, no scaling).
    pub local_rope: Option<RopeSpec>,
    /// llama.cpp's per-frequency divisors (a GGUF's `rope_freqs.weight`, how Llama 3.x GGUFs
    /// carry their rope scaling): inverse frequency `i` is divided by factor `i`.
    pub rope_freq_factors: Option<Vec<f64>>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Qwen2 puts biases on the q/k/v projections.
    pub qkv_bias: bool,
    /// Qwen3, Gemma 3 and OLMo 2 RMS-normalize q and k before rope (per head, or over the
    /// whole projection: `family.qk_norm_whole`).
    pub qk_norm: bool,
    /// OLMoE: q, k and v are clamped to `[-clip, clip]` after projection.
    pub clip_qkv: Option<f64>,
    /// gpt-oss: a learned sink logit per head and layer (`self_attn.sinks`).
    pub attention_sinks: bool,
    /// How the family's decoder differs from Llama's.
    pub family: FamilyTraits,
    /// Experts, for mixture-of-experts families (their sparse layers' MLPs).
    pub moe: Option<MoeSpec>,
}

impl ModelConfig {
    /// Reject shapes that would make the forward pass index out of bounds later.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(ModelError::Config(m));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.head_dim == 0 {
            return fail("head counts and head_dim must be positive".into());
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return fail(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if let Some(r) = self.family.rotary_dim {
            if r == 0 || r % 2 != 0 || r > self.head_dim {
                return fail(format!(
                    "rotary dimension {r} must be even and within head_dim {}",
                    self.head_dim
                ));
            }
        }
        if self.head_dim % 2 != 0 {
            return fail(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            ));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return fail("vocab_size, hidden_size and num_hidden_layers must be positive".into());
        }
        if self.max_position_embeddings == 0 {
            return fail("max_position_embeddings must be positive".into());
        }
        let f = &self.family;
        if !f.layers.is_empty() && f.layers.len() != self.num_layers {
            return fail(format!(
                "{} layer kinds for {} layers",
                f.layers.len(),
                self.num_layers
            ));
        }
        if f.layers.iter().any(|l| l.sliding) && f.sliding_window.is_none() {
            return fail("sliding layers need a sliding_window".into());
        }
        if let Some(c) = self.clip_qkv {
            if !(c > 0.0) {
                return fail(format!("clip_qkv {c} must be positive"));
            }
        }
        if let Some(moe) = &self.moe {
            moe.validate(self.num_layers)?;
        }
        Ok(())
    }

    /// Dimensions of each head that rotary embeddings turn (all of them unless the family
    /// rotates only a part: Phi-4-mini's `partial_rotary_factor`).
    pub fn rotary_dim(&self) -> usize {
        self.family.rotary_dim.unwrap_or(self.head_dim)
    }

    /// Total parameter count implied by the shapes (for the load summary).
    pub fn num_parameters(&self) -> usize {
        self.parameters().0
    }

    /// Parameters one token reads: all of a dense model, the routed experts' share of a MoE
    /// (what bounds decode speed on memory bandwidth).
    pub fn active_parameters(&self) -> usize {
        self.parameters().1
    }

    /// (total, active per token) parameters.
    fn parameters(&self) -> (usize, usize) {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let mut per_layer = h * q + 2 * h * kv + q * h + 2 * h;
        if self.qkv_bias {
            per_layer += q + 2 * kv;
        }
        if self.qk_norm {
            per_layer += if self.family.qk_norm_whole {
                q + kv
            } else {
                2 * self.head_dim
            };
        }
        if self.family.norms == BlockNorms::Sandwich {
            per_layer += 2 * h;
        }
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        let dense_mlp = 3 * h * self.intermediate_size;
        let (mut mlp_total, mut mlp_active) = (0, 0);
        for i in 0..self.num_layers {
            let (total, active) = match &self.moe {
                Some(moe) if moe.is_sparse(i) => moe.layer_parameters(h),
                _ => (dense_mlp, dense_mlp),
            };
            mlp_total += total;
            mlp_active += active;
        }
        let rest = self.vocab_size * h + self.num_layers * per_layer + h + head;
        (rest + mlp_total, rest + mlp_active)
    }

    /// Parse a Hugging Face `config.json`: transformers v4's keys (`rope_theta`,
    /// `rope_scaling`) and v5's `rope_parameters`. A setting that is present but not understood
    /// is refused, never defaulted silently (see [`check_settings`]).
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        let raw: HfConfig = serde_json::from_value(value.clone())
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| ModelError::Config("config.json is not an object".into()))?;
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| raw.model_type.clone())
            .ok_or_else(|| ModelError::Config("config.json names no architecture".into()))?;
        let architecture = Architecture::parse(&arch_name)?;
        let num_heads = raw.num_attention_heads;
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if num_heads > 0 => raw.hidden_size / num_heads,
            None => 0,
        };
        let num_layers = raw.num_hidden_layers;
        let max_positions = raw.max_position_embeddings.unwrap_or(4096);
        let (family, unused_window) =
            family::read_traits(architecture, obj, num_layers, raw.hidden_size, head_dim)?;
        let per_layer_type = architecture == Architecture::Gemma3;
        let default_theta = if per_layer_type {
            1_000_000.0
        } else {
            10_000.0
        };
        let rope = rope::rope_settings(obj, per_layer_type, default_theta, max_positions)?;
        let mut max_position_embeddings = max_positions;
        if let Some(window) = unused_window {
            if window < max_position_embeddings {
                // vLLM's --disable-sliding-window: exact attention, context capped at the window.
                tracing::warn!(
                    window,
                    max_position_embeddings,
                    "sliding-window attention is not run for this family: the context is capped at the window"
                );
                max_position_embeddings = window;
            }
        }
        use Architecture::*;
        let qk_norm = matches!(architecture, Qwen3 | Gemma3 | Olmo2 | Qwen3Moe | Olmoe);
        let moe = moe::read_hf(architecture, obj, num_layers, raw.intermediate_size)?;
        // Other families refuse the key (`family::read_traits`).
        let clip_qkv = rope::number(obj, "clip_qkv", "config")?;
        // Qwen2-MoE names its q/k/v bias switch `qkv_bias`.
        let qkv_bias = match architecture {
            Qwen2Moe => raw.qkv_bias.unwrap_or(true),
            _ => raw
                .attention_bias
                .unwrap_or(matches!(architecture, Qwen2 | GptOss)),
        };
        let config = ModelConfig {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: rope.global.theta,
            rope_scaling: rope.global.scaling,
            local_rope: rope.local,
            rope_freq_factors: None,
            max_position_embeddings,
            tie_word_embeddings: raw
                .tie_word_embeddings
                .unwrap_or(matches!(architecture, Gemma2 | Gemma3)),
            qkv_bias,
            qk_norm,
            clip_qkv,
            attention_sinks: architecture == GptOss,
            family,
            moe,
        };
        config.validate()?;
        Ok(config)
    }
}

type JsonMap = serde_json::Map<String, serde_json::Value>;

fn unsupported(m: String) -> ModelError {
    ModelError::Unsupported(m)
}

#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    qkv_bias: Option<bool>,
}
