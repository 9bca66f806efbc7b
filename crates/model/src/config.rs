//! The architecture-independent description of a Llama-family model, filled from GGUF metadata
//! or a Hugging Face `config.json` (transformers v4 or v5 keys). One struct covers Llama,
//! Mistral, Qwen2 and Qwen3: they differ only in a few switches (QKV bias, q/k norm, tied head,
//! rope scaling). Settings of mechanisms this forward pass does not run are refused, not
//! ignored.

use serde::Deserialize;

use crate::error::{ModelError, Result};

/// Which family a checkpoint belongs to; decides defaults and weight-name conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Architecture {
    /// Map an HF `architectures[0]`/`model_type` or a GGUF `general.architecture` to a family.
    pub fn parse(name: &str) -> Result<Self> {
        let lower = name.to_ascii_lowercase();
        let arch = match lower.as_str() {
            "llama" | "llamaforcausallm" => Architecture::Llama,
            "mistral" | "mistralforcausallm" => Architecture::Mistral,
            "qwen2" | "qwen2forcausallm" => Architecture::Qwen2,
            "qwen3" | "qwen3forcausallm" => Architecture::Qwen3,
            _ => return Err(ModelError::UnsupportedArchitecture(name.to_string())),
        };
        Ok(arch)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }
}

/// Llama-3 style frequency-dependent rope scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Shapes and switches of a decoder-only Llama-family transformer.
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
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// llama.cpp's per-frequency divisors (a GGUF's `rope_freqs.weight`, how Llama 3.x GGUFs
    /// carry their rope scaling): inverse frequency `i` is divided by factor `i`.
    pub rope_freq_factors: Option<Vec<f64>>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Qwen2 puts biases on the q/k/v projections.
    pub qkv_bias: bool,
    /// Qwen3 RMS-normalizes q and k per head before rope.
    pub qk_norm: bool,
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
        Ok(())
    }

    /// Total parameter count implied by the shapes (for the load summary).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let mut per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 2 * h;
        if self.qkv_bias {
            per_layer += q + 2 * kv;
        }
        if self.qk_norm {
            per_layer += 2 * self.head_dim;
        }
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * per_layer + h + head
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
        let (rope_theta, rope_scaling) = rope_settings(obj)?;
        let mut max_position_embeddings = raw.max_position_embeddings.unwrap_or(4096);
        if let Some(window) = check_settings(obj)? {
            if window < max_position_embeddings {
                // vLLM's --disable-sliding-window: exact attention, context capped at the window.
                tracing::warn!(
                    window,
                    max_position_embeddings,
                    "sliding-window attention is not implemented: the context is capped at the window"
                );
                max_position_embeddings = window;
            }
        }
        let config = ModelConfig {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rope_freq_factors: None,
            max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: raw
                .attention_bias
                .unwrap_or(architecture == Architecture::Qwen2),
            qk_norm: architecture == Architecture::Qwen3,
        };
        config.validate()?;
        Ok(config)
    }
}

type JsonMap = serde_json::Map<String, serde_json::Value>;

fn unsupported(m: String) -> ModelError {
    ModelError::Unsupported(m)
}

/// A number-valued key of a rope object, or an error naming it.
fn rope_number(obj: &JsonMap, key: &str, whose: &str) -> Result<Option<f64>> {
    match obj.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| ModelError::Config(format!("{whose}.{key} must be a number"))),
    }
}

/// `rope_theta` and the scaling, from v5's `rope_parameters` or v4's `rope_theta` /
/// `rope_scaling`. Conflicting values, unknown rope types, unknown keys and a llama3 scaling
/// without its four parameters are errors.
fn rope_settings(obj: &JsonMap) -> Result<(f64, Option<Llama3RopeScaling>)> {
    let v4_theta = rope_number(obj, "rope_theta", "config")?;
    let v4_scaling = obj.get("rope_scaling").filter(|v| !v.is_null());
    let v5 = obj.get("rope_parameters").filter(|v| !v.is_null());
    let (theta, scaling, whose) = match v5 {
        Some(params) => {
            let p = params.as_object().ok_or_else(|| {
                ModelError::Config("config.json: rope_parameters must be an object".into())
            })?;
            if !p.is_empty() && p.values().all(serde_json::Value::is_object) {
                return Err(unsupported(format!(
                    "per-layer-type rope parameters ({}) are not supported",
                    p.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            let theta = rope_number(p, "rope_theta", "rope_parameters")?;
            if let (Some(a), Some(b)) = (theta, v4_theta) {
                if a != b {
                    return Err(ModelError::Config(format!(
                        "config.json: rope_theta {b} and rope_parameters.rope_theta {a} disagree"
                    )));
                }
            }
            // Only a theta may sit beside a v4 rope_scaling: the scaling is said once.
            if v4_scaling.is_some() && p.keys().any(|k| k != "rope_theta") {
                return Err(ModelError::Config(
                    "config.json: both rope_scaling and rope_parameters set the rope scaling"
                        .into(),
                ));
            }
            match v4_scaling {
                Some(s) => (theta.or(v4_theta), s, "rope_scaling"),
                None => (theta.or(v4_theta), params, "rope_parameters"),
            }
        }
        None => match v4_scaling {
            Some(s) => (v4_theta, s, "rope_scaling"),
            None => return Ok((v4_theta.unwrap_or(10_000.0), None)),
        },
    };
    let theta = theta.unwrap_or(10_000.0);
    if theta <= 0.0 {
        return Err(ModelError::Config(format!(
            "rope_theta {theta} must be positive"
        )));
    }
    let s = scaling
        .as_object()
        .ok_or_else(|| ModelError::Config(format!("config.json: {whose} must be an object")))?;
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("default");
    const COMMON: [&str; 3] = ["rope_type", "type", "rope_theta"];
    const LLAMA3: [&str; 4] = [
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ];
    let allowed: &[&str] = match kind {
        "default" => &[],
        "llama3" => &LLAMA3,
        other => {
            return Err(unsupported(format!(
                "rope type `{other}` is not supported (supported: default, llama3)"
            )))
        }
    };
    if let Some(k) = s
        .keys()
        .find(|k| !COMMON.contains(&k.as_str()) && !allowed.contains(&k.as_str()))
    {
        return Err(unsupported(format!(
            "{whose}.{k} is not understood for rope type `{kind}`"
        )));
    }
    if kind == "default" {
        return Ok((theta, None));
    }
    let need = |k: &str| -> Result<f64> {
        rope_number(s, k, whose)?
            .filter(|x| *x > 0.0)
            .ok_or_else(|| {
                ModelError::Config(format!(
                    "{whose}.{k} must be a positive number for llama3 scaling"
                ))
            })
    };
    Ok((
        theta,
        Some(Llama3RopeScaling {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")? as usize,
        }),
    ))
}

/// Settings of other families' mechanisms that this Llama-family forward pass does not run:
/// present with an effect, they are refused rather than ignored. Returns the sliding window
/// when one is in force (the caller caps the context at it).
fn check_settings(obj: &JsonMap) -> Result<Option<usize>> {
    use serde_json::Value;
    let active = |k: &str| {
        obj.get(k)
            .is_some_and(|v| !v.is_null() && *v != Value::Bool(false))
    };
    if let Some(act) = obj
        .get("hidden_act")
        .or_else(|| obj.get("hidden_activation"))
    {
        if act.as_str() != Some("silu") {
            return Err(unsupported(format!(
                "hidden_act {act} is not supported (only silu)"
            )));
        }
    }
    if active("mlp_bias") {
        return Err(unsupported("mlp_bias is not supported".into()));
    }
    if let Some(f) = rope_number(obj, "partial_rotary_factor", "config")? {
        if f != 1.0 {
            return Err(unsupported(format!(
                "partial_rotary_factor {f} is not supported"
            )));
        }
    }
    for key in [
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "query_pre_attn_scalar",
        "no_rope_layers",
        "no_rope_layer_interval",
        "embedding_multiplier",
        "residual_multiplier",
        "attention_multiplier",
        "logits_scaling",
    ] {
        if active(key) {
            return Err(unsupported(format!(
                "{key} is set, but this model family's mechanism for it is not supported"
            )));
        }
    }
    let window = match obj.get("sliding_window") {
        Some(Value::Number(n)) => n.as_u64().map(|w| w as usize),
        _ => None,
    };
    // Qwen2/Qwen3 carry a window they do not use unless `use_sliding_window` says so.
    let used = obj
        .get("use_sliding_window")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    Ok(window.filter(|_| used))
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
}
