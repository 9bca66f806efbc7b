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
}

impl GatedMlp {
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
        })
    }

    pub fn forward(&self, x: &Tensor, activation: Activation) -> Result<Tensor> {
        let gate_up = self.gate_up.forward(x)?;
        let act = match activation {
            Activation::Silu => crate::cpu_ops::silu_and_mul(&gate_up, self.inter)?,
            Activation::GeluTanh => crate::cpu_ops::gelu_tanh_and_mul(&gate_up, self.inter)?,
        };
        self.down.forward(&act)
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
