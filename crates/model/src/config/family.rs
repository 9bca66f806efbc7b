//! How each dense family's decoder differs from Llama's, read from `config.json`: norm
//! placement, activation, multipliers, soft-caps and the per-layer pattern of sliding-window and
//! no-rope layers. Each family accepts only the settings it runs; another family's mechanism
//! present with an effect is refused, never ignored.

use serde_json::Value;

use crate::error::{ModelError, Result};

use super::rope::number;
use super::{unsupported, Architecture, JsonMap};

/// Where a layer's RMS norms sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockNorms {
    /// Llama: `x + attn(norm(x))`, `x + mlp(norm(x))`.
    #[default]
    Pre,
    /// Gemma 2/3: `x + norm(attn(norm(x)))`, `x + norm(mlp(norm(x)))`.
    Sandwich,
    /// OLMo 2: `x + norm(attn(x))`, `x + norm(mlp(x))`.
    Post,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Activation {
    #[default]
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`, Gemma's GeGLU).
    GeluTanh,
    /// gpt-oss: `(clamp(up, ±limit) + 1) · g · sigmoid(alpha · g)` with `g = min(gate, limit)`.
    ClampedSwiglu { alpha: f32, limit: f32 },
}

/// One decoder layer's attention kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerKind {
    /// Attends to the last `sliding_window` tokens only.
    pub sliding: bool,
    /// Applies rotary embeddings (SmolLM3 leaves every few layers without: NoPE).
    pub rope: bool,
}

impl Default for LayerKind {
    fn default() -> Self {
        Self {
            sliding: false,
            rope: true,
        }
    }
}

/// Everything a family changes in the Llama decoder. `Default` is Llama.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FamilyTraits {
    pub norms: BlockNorms,
    /// Gemma stores RMS-norm weights as `w - 1`: the norm multiplies by `1 + w`.
    pub norm_plus_one: bool,
    /// OLMo 2 RMS-normalizes q and k over the whole projection, not per head.
    pub qk_norm_whole: bool,
    pub activation: Activation,
    /// Multiplies the token embeddings (Gemma: sqrt(hidden), rounded to the weights' dtype;
    /// Granite: `embedding_multiplier`).
    pub embedding_scale: Option<f64>,
    /// Granite: each sublayer's output is multiplied by this before the residual add.
    pub residual_scale: Option<f64>,
    /// The attention score scale, when not `1 / sqrt(head_dim)`.
    pub attention_scale: Option<f64>,
    /// Gemma 2: attention scores soft-capped at this.
    pub attn_softcap: Option<f64>,
    /// Gemma 2: logits soft-capped at this.
    pub final_softcap: Option<f64>,
    /// Granite: logits divided by this.
    pub logits_divisor: Option<f64>,
    /// The window of sliding layers.
    pub sliding_window: Option<usize>,
    /// Per layer; empty means every layer is full attention with rope.
    pub layers: Vec<LayerKind>,
    /// Rope on the first `rotary_dim` dimensions of each head only (Phi-4-mini's
    /// `partial_rotary_factor`); `None` is the whole head.
    pub rotary_dim: Option<usize>,
    /// Phi-3 stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`.
    pub fused_projections: bool,
}

impl FamilyTraits {
    /// What the architecture itself fixes, whichever file describes the model (HF config or
    /// GGUF): norm placement, the q/k-norm span, the gate activation, fused projections and
    /// Gemma's embedding scale. The readers add what their file says.
    pub fn of(arch: Architecture, hidden_size: usize) -> Self {
        let mut t = Self::default();
        match arch {
            Architecture::Gemma2 | Architecture::Gemma3 => {
                t.norms = BlockNorms::Sandwich;
                t.activation = Activation::GeluTanh;
                t.embedding_scale = Some((hidden_size as f64).sqrt());
            }
            Architecture::Olmo2 => {
                t.norms = BlockNorms::Post;
                t.qk_norm_whole = true;
            }
            Architecture::Olmoe => t.qk_norm_whole = true,
            Architecture::Phi3 => t.fused_projections = true,
            Architecture::GptOss => {
                t.activation = Activation::ClampedSwiglu {
                    alpha: 1.702,
                    limit: 7.0,
                }
            }
            _ => {}
        }
        t
    }

    /// Which layers slide when every `every`-th layer is full attention (Gemma's pattern;
    /// `every == 0`: all slide).
    pub fn every_nth_full(num_layers: usize, every: usize) -> Vec<bool> {
        (0..num_layers)
            .map(|i| every == 0 || (i + 1) % every != 0)
            .collect()
    }

    /// Set the per-layer kinds from sliding flags (every layer keeps its rope).
    pub fn set_sliding(&mut self, sliding: Vec<bool>) {
        self.layers = sliding
            .into_iter()
            .map(|sliding| LayerKind {
                sliding,
                rope: true,
            })
            .collect();
    }

    /// Layer `i`'s kind.
    pub fn layer(&self, i: usize) -> LayerKind {
        self.layers.get(i).copied().unwrap_or_default()
    }

    /// Whether every layer slides (then blocks that leave the window could be freed).
    pub fn all_sliding(&self, num_layers: usize) -> bool {
        self.sliding_window.is_some() && (0..num_layers).all(|i| self.layer(i).sliding)
    }
}

/// What a family reads beyond the shapes. Returns the traits and, for a family that runs no
/// sliding window but carries one, the window to cap the context at.
pub(super) fn read_traits(
    arch: Architecture,
    obj: &JsonMap,
    num_layers: usize,
    hidden_size: usize,
    head_dim: usize,
) -> Result<(FamilyTraits, Option<usize>)> {
    use Architecture::*;
    let active = |k: &str| {
        obj.get(k)
            .is_some_and(|v| !v.is_null() && *v != Value::Bool(false))
    };
    let num = |k: &str| number(obj, k, "config");
    let positive = |k: &str| -> Result<Option<f64>> {
        match num(k)? {
            Some(x) if x <= 0.0 => Err(ModelError::Config(format!("{k} must be positive"))),
            other => Ok(other),
        }
    };
    let mut t = FamilyTraits::of(arch, hidden_size);

    // The activation is the family's (silu everywhere but Gemma); another one is refused.
    let act = obj
        .get("hidden_activation")
        .filter(|v| !v.is_null())
        .or_else(|| obj.get("hidden_act"))
        .and_then(Value::as_str);
    let expected = match t.activation {
        // gpt-oss's config says silu for its clamped SwiGLU.
        Activation::Silu | Activation::ClampedSwiglu { .. } => "silu",
        Activation::GeluTanh => "gelu_pytorch_tanh",
    };
    if let Some(other) = act.filter(|a| *a != expected) {
        return Err(unsupported(format!(
            "hidden_act {other} is not supported for {} (only {expected})",
            arch.as_str()
        )));
    }
    if obj
        .get("hidden_act")
        .is_some_and(|v| !v.is_string() && !v.is_null())
    {
        return Err(ModelError::Config("hidden_act must be a string".into()));
    }
    if active("mlp_bias") {
        return Err(unsupported("mlp_bias is not supported".into()));
    }
    // transformers v5 repeats partial_rotary_factor inside rope_parameters.
    let in_rope = match obj.get("rope_parameters").and_then(Value::as_object) {
        Some(p) => number(p, "partial_rotary_factor", "rope_parameters")?,
        None => None,
    };
    let partial = match (num("partial_rotary_factor")?, in_rope) {
        (Some(a), Some(b)) if a != b => {
            return Err(ModelError::Config(format!(
                "partial_rotary_factor {a} and rope_parameters.partial_rotary_factor {b} disagree"
            )))
        }
        (a, b) => a.or(b).filter(|f| *f != 1.0),
    };
    if let Some(f) = partial {
        if arch != Phi3 {
            return Err(unsupported(format!(
                "partial_rotary_factor {f} is not supported for {}",
                arch.as_str()
            )));
        }
        if !(f > 0.0 && f < 1.0) {
            return Err(ModelError::Config(format!(
                "partial_rotary_factor {f} must be in (0, 1]"
            )));
        }
        // transformers: int(head_dim * factor).
        t.rotary_dim = Some((head_dim as f64 * f) as usize);
    }

    // Keys each family owns; present elsewhere with an effect, they are refused.
    let owned: &[(&str, &[Architecture])] = &[
        ("attn_logit_softcapping", &[Gemma2, Gemma3]),
        ("final_logit_softcapping", &[Gemma2, Gemma3]),
        ("query_pre_attn_scalar", &[Gemma2, Gemma3]),
        ("sliding_window_pattern", &[Gemma3]),
        ("no_rope_layers", &[SmolLM3]),
        ("no_rope_layer_interval", &[SmolLM3]),
        ("embedding_multiplier", &[Granite]),
        ("residual_multiplier", &[Granite]),
        ("attention_multiplier", &[Granite]),
        ("logits_scaling", &[Granite]),
        ("use_bidirectional_attention", &[]),
        ("clip_qkv", &[Olmoe]),
        ("swiglu_limit", &[GptOss]),
        ("swiglu_alpha", &[GptOss]),
    ];
    for (key, families) in owned {
        if active(key) && !families.contains(&arch) {
            return Err(unsupported(format!(
                "{key} is set, but {} does not run that mechanism",
                arch.as_str()
            )));
        }
    }

    match arch {
        Gemma2 | Gemma3 => {
            // HF checkpoints store Gemma's norm weights as `w - 1` (GGUFs have the 1 added).
            t.norm_plus_one = true;
            let scalar = positive("query_pre_attn_scalar")?.unwrap_or(256.0);
            t.attention_scale = Some(1.0 / scalar.sqrt());
            t.final_softcap = positive("final_logit_softcapping")?;
            if arch == Gemma2 {
                t.attn_softcap = positive("attn_logit_softcapping")?;
            } else if active("attn_logit_softcapping") {
                // transformers' Gemma 3 attention does not apply it; neither does vLLM's.
                tracing::warn!("attn_logit_softcapping is set but Gemma 3 does not use it");
            }
            let pattern = match arch {
                Gemma2 => 2,
                _ => positive("sliding_window_pattern")?.map_or(6, |p| p as usize),
            };
            let kinds = layer_types(obj, num_layers)?
                .unwrap_or_else(|| FamilyTraits::every_nth_full(num_layers, pattern));
            t.sliding_window = window(obj)?.or(Some(4096));
            t.set_sliding(kinds);
            return Ok((t, None));
        }
        SmolLM3 => {
            let rope: Vec<bool> = match obj.get("no_rope_layers").filter(|v| !v.is_null()) {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| match v.as_u64() {
                        Some(0) => Ok(false),
                        Some(1) => Ok(true),
                        _ => Err(ModelError::Config("no_rope_layers holds 0s and 1s".into())),
                    })
                    .collect::<Result<_>>()?,
                Some(_) => return Err(ModelError::Config("no_rope_layers must be a list".into())),
                None => {
                    let every = positive("no_rope_layer_interval")?.map_or(4, |x| x as usize);
                    (0..num_layers).map(|i| (i + 1) % every != 0).collect()
                }
            };
            if rope.len() != num_layers {
                return Err(ModelError::Config(format!(
                    "no_rope_layers has {} entries for {num_layers} layers",
                    rope.len()
                )));
            }
            let used = obj
                .get("use_sliding_window")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let w = window(obj)?.filter(|_| used);
            let sliding = match layer_types(obj, num_layers)? {
                Some(kinds) if w.is_some() => kinds,
                _ => rope.iter().map(|r| w.is_some() && !r).collect(),
            };
            t.sliding_window = w;
            t.layers = rope
                .into_iter()
                .zip(sliding)
                .map(|(rope, sliding)| LayerKind { sliding, rope })
                .collect();
            return Ok((t, None));
        }
        Granite => {
            t.embedding_scale = positive("embedding_multiplier")?;
            t.residual_scale = positive("residual_multiplier")?;
            t.attention_scale = positive("attention_multiplier")?;
            t.logits_divisor = positive("logits_scaling")?;
        }
        GptOss => {
            // The config may override the defaults `FamilyTraits::of` set.
            if let Activation::ClampedSwiglu { alpha, limit } = &mut t.activation {
                if let Some(a) = positive("swiglu_alpha")? {
                    *alpha = a as f32;
                }
                if let Some(l) = positive("swiglu_limit")? {
                    *limit = l as f32;
                }
            }
            // Sliding and full layers alternate (layer_types), windows of 128.
            let kinds = layer_types(obj, num_layers)?
                .unwrap_or_else(|| FamilyTraits::every_nth_full(num_layers, 2));
            t.sliding_window = window(obj)?.or(Some(128));
            t.set_sliding(kinds);
            return Ok((t, None));
        }
        Llama | Mistral | Qwen2 | Qwen3 | Phi3 | Olmo2 | Mixtral | Qwen2Moe | Qwen3Moe | Olmoe => {}
    }
    if let Some(types) = layer_types(obj, num_layers)? {
        if types.iter().any(|&s| s) && window(obj)?.is_some() && uses_window(obj) {
            return Err(unsupported(format!(
                "{} with sliding-window layer_types is not supported",
                arch.as_str()
            )));
        }
    }
    // Mistral-style: one window for every layer, in force unless `use_sliding_window` is false.
    let w = window(obj)?.filter(|_| uses_window(obj));
    if let Some(w) = w {
        if matches!(arch, Mistral | Llama | Mixtral) {
            t.sliding_window = Some(w);
            t.set_sliding(vec![true; num_layers]);
            return Ok((t, None));
        }
    }
    Ok((t, w))
}

/// Qwen2/Qwen3 carry a window they do not use unless `use_sliding_window` says so.
fn uses_window(obj: &JsonMap) -> bool {
    obj.get("use_sliding_window")
        .and_then(Value::as_bool)
        .unwrap_or(true)
}

fn window(obj: &JsonMap) -> Result<Option<usize>> {
    match obj.get("sliding_window") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            // transformers' Qwen2-MoE writes 0 next to `use_sliding_window: false`.
            Some(0) if obj.get("use_sliding_window") == Some(&Value::Bool(false)) => Ok(None),
            Some(0) => Err(ModelError::Config(
                "sliding_window must be a positive integer".into(),
            )),
            None => Err(ModelError::Config(
                "sliding_window must be a positive integer".into(),
            )),
            Some(w) => Ok(Some(w as usize)),
        },
    }
}

/// transformers' `layer_types` (`"sliding_attention"` / `"full_attention"`), as "is sliding".
fn layer_types(obj: &JsonMap, num_layers: usize) -> Result<Option<Vec<bool>>> {
    let Some(v) = obj.get("layer_types").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let list = v
        .as_array()
        .ok_or_else(|| ModelError::Config("layer_types must be a list".into()))?;
    if list.len() != num_layers {
        return Err(ModelError::Config(format!(
            "layer_types has {} entries for {num_layers} layers",
            list.len()
        )));
    }
    list.iter()
        .map(|t| match t.as_str() {
            Some("sliding_attention") => Ok(true),
            Some("full_attention") => Ok(false),
            _ => Err(unsupported(format!("layer type {t} is not supported"))),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}
