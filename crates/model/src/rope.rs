//! Rotary position embeddings in the Hugging Face ("rotate half") layout. Tables are computed
//! once for every position up to the context length; each step gathers the rows of its tokens'
//! positions, so sequences at different positions share one batched rope call.

use candle_core::{DType, Device, Tensor};

use crate::config::{ModelConfig, RopeScaling, RopeSpec, YarnRopeScaling};
use crate::error::Result;

/// Precomputed cos/sin tables, `[max_positions, rotary_dim / 2]`.
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
    /// Dimensions of each head that rotate (the first ones); the rest pass through.
    rotary_dim: usize,
}

/// Inverse frequencies under `scaling` (llama3, linear, YaRN, or LongRoPE's short factors), or
/// divided by a GGUF's per-frequency factors (`rope_freqs.weight`, llama.cpp's form of the
/// llama3 scaling).
pub fn inverse_frequencies(
    head_dim: usize,
    theta: f64,
    scaling: Option<&RopeScaling>,
    freq_factors: Option<&[f64]>,
) -> Vec<f64> {
    let plain = |i: usize| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
    match scaling {
        Some(RopeScaling::Yarn(y)) => return yarn_frequencies(head_dim, theta, y),
        // Within the original context (the table switches per position: `from_spec`).
        Some(RopeScaling::LongRope(l)) => {
            return longrope_frequencies(head_dim, theta, &l.short_factor)
        }
        _ => {}
    }
    (0..head_dim / 2)
        .map(|i| {
            let freq = plain(i);
            if let Some(f) = freq_factors.and_then(|f| f.get(i)) {
                return freq / f;
            }
            match scaling {
                None | Some(RopeScaling::Yarn(_)) | Some(RopeScaling::LongRope(_)) => freq,
                Some(RopeScaling::Linear { factor }) => freq / factor,
                Some(RopeScaling::Llama3(s)) => {
                    let original = s.original_max_position_embeddings as f64;
                    let low_wavelen = original / s.low_freq_factor;
                    let high_wavelen = original / s.high_freq_factor;
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    if wavelen < high_wavelen {
                        freq
                    } else if wavelen > low_wavelen {
                        freq / s.factor
                    } else {
                        let smooth = (original / wavelen - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * freq / s.factor + smooth * freq
                    }
                }
            }
        })
        .collect()
}

/// LongRoPE: each plain frequency divided by its factor (`1 / (f_i · θ^(2i/d))`, in f32 as
/// transformers computes it).
fn longrope_frequencies(dim: usize, theta: f64, factors: &[f64]) -> Vec<f64> {
    (0..dim / 2)
        .map(|i| {
            let base = (theta as f32).powf((2 * i) as f32 / dim as f32);
            let f = factors.get(i).copied().unwrap_or(1.0) as f32;
            (1.0 / (f * base)) as f64
        })
        .collect()
}

/// YaRN's blend of interpolated (`freq / factor`) and original frequencies: dimensions that
/// rotate fewer than `beta_slow` times over the original context are interpolated, more than
/// `beta_fast` times kept, with a linear ramp between (as transformers computes it).
fn yarn_frequencies(head_dim: usize, theta: f64, y: &YarnRopeScaling) -> Vec<f64> {
    let dim = head_dim as f64;
    let original = y.original_max_position_embeddings as f64;
    let correction_dim = |rotations: f64| {
        dim * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
    };
    let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
    if y.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
    if low == high {
        high += 0.001;
    }
    (0..head_dim / 2)
        .map(|i| {
            // transformers computes the ramp and the frequencies in f32.
            let pos_freq = (theta as f32).powf((2 * i) as f32 / head_dim as f32) as f64;
            let extrapolation = 1.0 / pos_freq;
            let interpolation = 1.0 / (y.factor * pos_freq);
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let keep = 1.0 - ramp;
            interpolation * (1.0 - keep) + extrapolation * keep
        })
        .collect()
}

impl RotaryEmbedding {
    /// The table of the model's (full-attention layers') rope.
    pub fn new(
        config: &ModelConfig,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let spec = RopeSpec {
            theta: config.rope_theta,
            scaling: config.rope_scaling.clone(),
        };
        let factors = config.rope_freq_factors.as_deref();
        Self::from_spec(
            config.rotary_dim(),
            &spec,
            factors,
            max_positions,
            dtype,
            device,
        )
    }

    /// A table for `spec` over the first `rotary_dim` dimensions of each head (Gemma 3's local
    /// layers have their own table). LongRoPE uses its short factors for positions within the
    /// original context and its long ones beyond: per position, so a cached key never changes
    /// (transformers switches the whole sequence once it is longer; vLLM the whole batch).
    pub fn from_spec(
        rotary_dim: usize,
        spec: &RopeSpec,
        freq_factors: Option<&[f64]>,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = rotary_dim / 2;
        let inv = inverse_frequencies(rotary_dim, spec.theta, spec.scaling.as_ref(), freq_factors);
        // YaRN and LongRoPE scale cos and sin (their "attention factor").
        let (gain, long) = match &spec.scaling {
            Some(RopeScaling::Yarn(y)) => (y.attention_factor as f32, None),
            Some(RopeScaling::LongRope(l)) => (
                l.attention_factor as f32,
                Some((
                    l.original_max_position_embeddings,
                    longrope_frequencies(rotary_dim, spec.theta, &l.long_factor),
                )),
            ),
            _ => (1.0, None),
        };
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            let inv = match &long {
                Some((original, long_inv)) if pos >= *original => long_inv,
                _ => &inv,
            };
            for f in inv {
                // Angles in f64 then rounded once, as the reference computes them in fp32 from
                // fp32 frequencies; the difference is far below the golden tolerance.
                let angle = (pos as f32) * (*f as f32);
                cos.push(angle.cos() * gain);
                sin.push(angle.sin() * gain);
            }
        }
        let cos = Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?;
        Ok(Self {
            cos,
            sin,
            rotary_dim,
        })
    }

    /// Rotate `q` `[tokens, heads, head_dim]` and `k` likewise, token `i` at `positions[i]`.
    pub fn apply(&self, q: &Tensor, k: &Tensor, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let cos = self.cos.index_select(positions, 0)?;
        let sin = self.sin.index_select(positions, 0)?;
        let rotate = |x: &Tensor| -> Result<Tensor> {
            let head_dim = x.dim(2)?;
            let part = |x: &Tensor| -> Result<Tensor> {
                let r =
                    candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, &cos, &sin)?;
                Ok(r.squeeze(0)?)
            };
            if self.rotary_dim >= head_dim {
                return part(x);
            }
            // Partial rotary: the first `rotary_dim` dimensions turn, the rest pass through.
            let turned = part(&x.narrow(2, 0, self.rotary_dim)?)?;
            let kept = x.narrow(2, self.rotary_dim, head_dim - self.rotary_dim)?;
            Ok(Tensor::cat(&[&turned, &kept], 2)?)
        };
        Ok((rotate(q)?, rotate(k)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LongRopeScaling;

    /// LongRoPE rows use the short factors below the original context and the long ones from
    /// it on, both scaled by the attention factor.
    #[test]
    fn longrope_switches_factors_at_the_original_context() {
        let l = LongRopeScaling {
            short_factor: vec![1.0, 2.0],
            long_factor: vec![3.0, 5.0],
            original_max_position_embeddings: 8,
            attention_factor: 1.25,
        };
        let spec = RopeSpec {
            theta: 10_000.0,
            scaling: Some(RopeScaling::LongRope(l)),
        };
        let rope = RotaryEmbedding::from_spec(4, &spec, None, 12, DType::F32, &Device::Cpu)
            .expect("table");
        let cos: Vec<Vec<f32>> = rope.cos.to_vec2().expect("cos");
        for (pos, row) in cos.iter().enumerate() {
            let factors = if pos < 8 { [1.0f32, 2.0] } else { [3.0, 5.0] };
            for (i, &c) in row.iter().enumerate() {
                let inv = 1.0 / (factors[i] * 10_000f32.powf((2 * i) as f32 / 4.0));
                let want = (pos as f32 * inv).cos() * 1.25;
                assert!((c - want).abs() < 1e-6, "pos {pos}, dim {i}: {c} vs {want}");
            }
        }
    }
}
