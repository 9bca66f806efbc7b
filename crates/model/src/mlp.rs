//! A decoder layer's feed-forward part: a gated MLP (`down(act(gate(x)) * up(x))`, gate and up
//! fused into one matrix) or a mixture of experts ([`crate::moe::MoeBlock`]), whose experts are
//! gated MLPs themselves.

use candle_core::{DType, Device, Tensor};

use crate::config::Activation;
use crate::error::Result;
use crate::moe::MoeBlock;
use crate::weights::{LinearWeight, WeightSource};

/// `down(act(gate(x)) * up(x))`.
pub struct GatedMlp {
    /// gate and up projections fused into one `[2 * inter, hidden]` matrix.
    pub gate_up: LinearWeight,
    pub down: LinearWeight,
    pub inter: usize,
    /// gpt-oss's experts add biases to both projections (`[2 * inter]`, `[hidden]`).
    pub biases: Option<(Tensor, Tensor)>,
}

impl GatedMlp {
    /// The projections' names in Llama-style checkpoints (`{prefix}.gate_proj.weight`, ...).
    pub const HF_PARTS: [&'static str; 3] = ["gate_proj", "up_proj", "down_proj"];

    /// Read `{prefix}.{gate}.weight`, `{prefix}.{up}.weight` and `{prefix}.{down}.weight`.
    pub fn load(
        weights: &mut dyn WeightSource,
        prefix: &str,
        [gate, up, down]: [&str; 3],
        hidden: usize,
        inter: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let gate = weights.get_linear(&format!("{prefix}.{gate}.weight"), &[inter, hidden])?;
        let up = weights.get_linear(&format!("{prefix}.{up}.weight"), &[inter, hidden])?;
        Ok(Self {
            gate_up: LinearWeight::concat(&[gate, up], dtype, device)?,
            down: weights.get_linear(&format!("{prefix}.{down}.weight"), &[hidden, inter])?,
            inter,
            biases: None,
        })
    }

    pub fn forward(&self, x: &Tensor, activation: Activation) -> Result<Tensor> {
        let mut gate_up = self.gate_up.forward(x)?;
        if let Some((b, _)) = &self.biases {
            gate_up = gate_up.broadcast_add(b)?;
        }
        let inter = self.inter;
        let act = match activation {
            Activation::Silu => crate::cpu_ops::silu_and_mul(&gate_up, inter)?,
            Activation::GeluTanh => crate::cpu_ops::gelu_tanh_and_mul(&gate_up, inter)?,
            Activation::ClampedSwiglu { alpha, limit } => {
                crate::cpu_ops::clamped_swiglu(&gate_up, inter, alpha, limit)?
            }
        };
        let out = self.down.forward(&act)?;
        Ok(match &self.biases {
            Some((_, b)) => out.broadcast_add(b)?,
            None => out,
        })
    }
}

/// A layer's feed-forward part.
pub enum Mlp {
    Dense(GatedMlp),
    Sparse(MoeBlock),
}

impl Mlp {
    pub fn forward(&self, x: &Tensor, activation: Activation) -> Result<Tensor> {
        match self {
            Mlp::Dense(m) => m.forward(x, activation),
            Mlp::Sparse(m) => m.forward(x, activation),
        }
    }
}
