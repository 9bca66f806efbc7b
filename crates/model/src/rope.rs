//! Rotary position embeddings in the Hugging Face ("rotate half") layout. Tables are computed
//! once for every position up to the context length; each step gathers the rows of its tokens'
//! positions, so sequences at different positions share one batched rope call.

use candle_core::{DType, Device, Tensor};

use crate::config::{Llama3RopeScaling, ModelConfig};
use crate::error::Result;

/// Precomputed cos/sin tables, `[max_positions, head_dim / 2]`.
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
}

/// Inverse frequencies, with Llama-3's frequency-dependent scaling when configured, or divided
/// by a GGUF's per-frequency factors (`rope_freqs.weight`, llama.cpp's form of the same).
pub fn inverse_frequencies(
    head_dim: usize,
    theta: f64,
    scaling: Option<&Llama3RopeScaling>,
    freq_factors: Option<&[f64]>,
) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
            if let Some(f) = freq_factors.and_then(|f| f.get(i)) {
                return freq / f;
            }
            match scaling {
                None => freq,
                Some(s) => {
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

impl RotaryEmbedding {
    pub fn new(
        config: &ModelConfig,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = config.head_dim / 2;
        let inv = inverse_frequencies(
            config.head_dim,
            config.rope_theta,
            config.rope_scaling.as_ref(),
            config.rope_freq_factors.as_deref(),
        );
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for f in &inv {
                // Angles in f64 then rounded once, as the reference computes them in fp32 from
                // fp32 frequencies; the difference is far below the golden tolerance.
                let angle = (pos as f32) * (*f as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }

    /// Rotate `q` `[tokens, heads, head_dim]` and `k` likewise, token `i` at `positions[i]`.
    pub fn apply(&self, q: &Tensor, k: &Tensor, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let cos = self.cos.index_select(positions, 0)?;
        let sin = self.sin.index_select(positions, 0)?;
        let q = candle_nn::rotary_emb::rope_thd(&q.unsqueeze(0)?.contiguous()?, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope_thd(&k.unsqueeze(0)?.contiguous()?, &cos, &sin)?;
        Ok((q.squeeze(0)?, k.squeeze(0)?))
    }
}
