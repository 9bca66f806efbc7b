//! What a GGUF says about its family, as llama.cpp writes and reads it: soft-caps, sliding
//! windows and their layer pattern, Granite's multipliers and the rope scaling come from
//! `<arch>.*` metadata; what llama.cpp's converter does not store it fixes per family, and so do
//! we (Gemma's attention scale from the model size, Gemma 3's default pattern of 6, SmolLM3's
//! rope-free layer every 4th). Gemma's norms are stored with the `+ 1` already added. Metadata of
//! a mechanism the family does not run is refused. Experts: `<arch>.expert_*` keys, sparse layers
//! and the shared expert from which tensors exist.

use candle_core::quantized::gguf_file::Value;

use crate::config::{
    Architecture, FamilyTraits, LayerKind, MoeRouting, MoeSpec, RopeScaling, RopeSpec,
    YarnRopeScaling,
};
use crate::error::{ModelError, Result};

use super::GgufFile;

/// The family-specific parts of a GGUF's config.
pub(super) struct GgufFamily {
    pub traits: FamilyTraits,
    pub local_rope: Option<RopeSpec>,
    pub rope_scaling: Option<RopeScaling>,
}

/// Shapes the family rules need.
pub(super) struct Shapes {
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    pub context: usize,
}

impl GgufFile {
    /// The sliding layers from `attention.sliding_window_pattern` (a per-layer bool array, or
    /// "every n-th layer is full"), else every `default`-th layer full (llama.cpp's rule).
    fn swa_pattern(&self, key: &str, num_layers: usize, default: usize) -> Result<Vec<bool>> {
        let every = match self.value(key) {
            Some(Value::Array(a)) => {
                if a.len() != num_layers {
                    return Err(self.invalid(format!(
                        "'{key}' has {} entries for {num_layers} layers",
                        a.len()
                    )));
                }
                return a
                    .iter()
                    .map(|v| match v {
                        Value::Bool(b) => Ok(*b),
                        _ => Err(self.invalid(format!("'{key}' holds a non-bool"))),
                    })
                    .collect();
            }
            Some(_) => self.usize_opt(key)?.unwrap_or(default),
            None => default,
        };
        Ok(FamilyTraits::every_nth_full(num_layers, every))
    }

    /// `rope.scaling.*`: none, linear or YaRN.
    fn rope_scaling(
        &self,
        key: &dyn Fn(&str) -> String,
        context: usize,
    ) -> Result<Option<RopeScaling>> {
        let kind = self.string_opt(&key("rope.scaling.type"))?;
        let factor = self.f64_opt(&key("rope.scaling.factor"))?;
        let positive = |what: &str, x: Option<f64>| match x {
            Some(f) if f > 0.0 && f.is_finite() => Ok(f),
            _ => Err(self.invalid(format!("rope scaling needs a positive {what}"))),
        };
        match kind.as_deref() {
            None | Some("none") => {
                if let Some(scale) = self.f64_opt(&key("rope.scale_linear"))? {
                    if scale != 1.0 {
                        return Ok(Some(RopeScaling::Linear {
                            factor: positive("rope.scale_linear", Some(scale))?,
                        }));
                    }
                }
                Ok(None)
            }
            Some("linear") => Ok(Some(RopeScaling::Linear {
                factor: positive("rope.scaling.factor", factor)?,
            })),
            Some("yarn") => {
                let factor = positive("rope.scaling.factor", factor)?;
                let original = self
                    .usize_opt(&key("rope.scaling.original_context_length"))?
                    .unwrap_or(context);
                if self
                    .f64_opt(&key("rope.scaling.attn_factor"))?
                    .is_some_and(|a| a != 1.0)
                {
                    return Err(ModelError::Unsupported(format!(
                        "'{}' is not supported with YaRN",
                        key("rope.scaling.attn_factor")
                    )));
                }
                // The converter stores transformers' `attention_factor` here when one is set.
                let attention_factor = self
                    .f64_opt(&key("rope.scaling.yarn_attn_factor"))?
                    .unwrap_or(YarnRopeScaling::mscale(factor, 1.0));
                Ok(Some(RopeScaling::Yarn(YarnRopeScaling {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: self
                        .f64_opt(&key("rope.scaling.yarn_beta_fast"))?
                        .unwrap_or(32.0),
                    beta_slow: self
                        .f64_opt(&key("rope.scaling.yarn_beta_slow"))?
                        .unwrap_or(1.0),
                    attention_factor,
                    truncate: true,
                })))
            }
            Some(other) => Err(ModelError::Unsupported(format!(
                "rope scaling type `{other}` is not supported (supported: none, linear, yarn)"
            ))),
        }
    }

    /// The family's traits from metadata and llama.cpp's per-family rules.
    pub(super) fn family(
        &self,
        arch: Architecture,
        key: &dyn Fn(&str) -> String,
        s: &Shapes,
    ) -> Result<GgufFamily> {
        use Architecture::*;
        let mut t = FamilyTraits::of(arch, s.hidden_size);
        let softcap =
            |k: &str| -> Result<Option<f64>> { Ok(self.f64_opt(&key(k))?.filter(|c| *c > 0.0)) };
        let window = self
            .usize_opt(&key("attention.sliding_window"))?
            .filter(|w| *w > 0);
        let pattern_key = key("attention.sliding_window_pattern");
        let mut local_rope = None;
        // Keys only some families run: refused elsewhere rather than ignored.
        let owned: [(&str, &[Architecture]); 6] = [
            ("attn_logit_softcapping", &[Gemma2]),
            ("final_logit_softcapping", &[Gemma2, Gemma3]),
            ("embedding_scale", &[Granite]),
            ("residual_scale", &[Granite]),
            ("logit_scale", &[Granite]),
            ("attention.scale", &[Granite]),
        ];
        for (k, families) in owned {
            if self.value(&key(k)).is_some() && !families.contains(&arch) {
                return Err(ModelError::Unsupported(format!(
                    "GGUF metadata '{}' is set, but {} does not run that mechanism",
                    key(k),
                    arch.as_str()
                )));
            }
        }
        match arch {
            Gemma2 | Gemma3 => {
                // llama.cpp: the 27B models scale by hidden / heads, the others by head_dim.
                let big = (arch == Gemma2 && s.num_layers == 46)
                    || (arch == Gemma3 && s.num_layers == 62);
                let scalar = if big {
                    s.hidden_size / s.num_heads
                } else {
                    s.head_dim
                };
                t.attention_scale = Some(1.0 / (scalar as f64).sqrt());
                t.final_softcap = softcap("final_logit_softcapping")?;
                let sliding = if arch == Gemma2 {
                    t.attn_softcap = softcap("attn_logit_softcapping")?;
                    t.sliding_window = Some(window.unwrap_or(4096));
                    self.swa_pattern(&pattern_key, s.num_layers, 2)?
                } else if let Some(w) = window {
                    t.sliding_window = Some(w);
                    local_rope = Some(RopeSpec {
                        theta: self
                            .f64_opt(&key("rope.freq_base_swa"))?
                            .unwrap_or(10_000.0),
                        scaling: None,
                    });
                    self.swa_pattern(&pattern_key, s.num_layers, 6)?
                } else {
                    vec![false; s.num_layers]
                };
                t.set_sliding(sliding);
            }
            SmolLM3 => {
                // llama.cpp: no rope on every 4th layer (not stored in the file).
                t.layers = (0..s.num_layers)
                    .map(|i| LayerKind {
                        sliding: false,
                        rope: (i + 1) % 4 != 0,
                    })
                    .collect();
            }
            Granite => {
                t.embedding_scale = self.f64_opt(&key("embedding_scale"))?;
                t.residual_scale = self.f64_opt(&key("residual_scale"))?;
                t.attention_scale = self.f64_opt(&key("attention.scale"))?;
                t.logits_divisor = self.f64_opt(&key("logit_scale"))?;
            }
            Mistral | Llama | Mixtral => {
                if let Some(w) = window {
                    t.sliding_window = Some(w);
                    t.set_sliding(vec![true; s.num_layers]);
                }
            }
            Qwen2 | Qwen3 | Olmo2 | Qwen2Moe | Qwen3Moe | Olmoe => {}
            GptOss => {
                // llama.cpp: sliding and full layers alternate, the first slides.
                if let Some(w) = window {
                    t.sliding_window = Some(w);
                    t.set_sliding(FamilyTraits::every_nth_full(s.num_layers, 2));
                }
            }
            Phi3 => {
                // Rope on the first `rope.dimension_count` dimensions (Phi-4-mini: 3/4).
                if let Some(d) = self.usize_opt(&key("rope.dimension_count"))? {
                    if d < s.head_dim {
                        t.rotary_dim = Some(d);
                    }
                }
            }
        }
        if window.is_some() && t.sliding_window.is_none() && arch != Phi3 {
            return Err(ModelError::Unsupported(format!(
                "GGUF metadata '{}' is set, but spindle does not run sliding windows for {}",
                key("attention.sliding_window"),
                arch.as_str()
            )));
        }
        let mut rope_scaling = self.rope_scaling(key, s.context)?;
        if let (GptOss, Some(RopeScaling::Yarn(yarn))) = (arch, &mut rope_scaling) {
            // gpt-oss's config says `truncate: false` (transformers keeps the correction range
            // fractional); the converter drops the key and llama.cpp always truncates. We run
            // the model as its config defines it.
            yarn.truncate = false;
        }
        Ok(GgufFamily {
            traits: t,
            local_rope,
            rope_scaling,
        })
    }
}

impl GgufFile {
    /// The experts of a MoE GGUF (`<arch>.expert_count` > 0), `None` for a dense one. Which
    /// layers are sparse is read from the tensors (`blk.N.ffn_gate_inp.weight`); whether the
    /// chosen weights are renormalized follows llama.cpp's per-family rule unless
    /// `<arch>.expert_weights_norm` says.
    pub(super) fn moe(
        &self,
        arch: Architecture,
        key: &dyn Fn(&str) -> String,
        num_layers: usize,
        feed_forward: usize,
    ) -> Result<Option<MoeSpec>> {
        let num_experts = self.usize_opt(&key("expert_count"))?.unwrap_or(0);
        if num_experts == 0 {
            return Ok(None);
        }
        if !arch.has_experts() {
            return Err(ModelError::Unsupported(format!(
                "GGUF metadata '{}' is set, but spindle runs no experts for {}",
                key("expert_count"),
                arch.as_str()
            )));
        }
        use Architecture::*;
        let renormalize = match self.bool_opt(&key("expert_weights_norm"))? {
            Some(b) => b,
            None => matches!(arch, Mixtral | Qwen3Moe),
        };
        let has_shared =
            (0..num_layers).any(|i| self.has_tensor(&format!("blk.{i}.ffn_gate_shexp.weight")));
        let spec = MoeSpec {
            routing: MoeRouting::of(arch),
            num_experts,
            top_k: self.usize_req(&key("expert_used_count"))?,
            expert_intermediate: self
                .usize_opt(&key("expert_feed_forward_length"))?
                .unwrap_or(feed_forward),
            renormalize,
            shared_expert_intermediate: match has_shared {
                true => Some(self.usize_req(&key("expert_shared_feed_forward_length"))?),
                false => None,
            },
            sparse_layers: (0..num_layers)
                .map(|i| self.has_tensor(&format!("blk.{i}.ffn_gate_inp.weight")))
                .collect(),
        };
        if let Some(w) = self.f64_opt(&key("expert_weights_scale"))? {
            if w != 1.0 && w != 0.0 {
                return Err(ModelError::Unsupported(format!(
                    "GGUF metadata '{}' = {w} is not supported",
                    key("expert_weights_scale")
                )));
            }
        }
        Ok(Some(spec))
    }
}
