//! A mixture-of-experts MLP over a flattened batch. The router runs in f32 and picks each
//! token's experts ([`routing`]); tokens are then grouped by expert, so each active expert
//! multiplies all of its tokens at once (one weight pass per step however many sequences chose
//! it: the reason continuous batching pays off for MoE on a CPU), and outputs are scattered
//! back with their weights. Each token's sum runs over its experts in ascending index order
//! and every expert row is one batch-independent dot product, so a sequence's result does not
//! depend on what else is in the batch, even though the groups do. Experts keep the weight
//! source's form (quantized GGUF blocks, bf16 or f32). Off the CPU the same code runs on the
//! device's matmuls with the grouping done on the host (a correct, unoptimized path).

mod gpt_oss;
pub mod routing;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::config::{Activation, Architecture, MoeRouting, MoeSpec};
use crate::error::{ModelError, Result};
use crate::mlp::GatedMlp;
use crate::weights::{LinearWeight, WeightSource};

/// Qwen2-MoE's always-on expert and its sigmoid gate.
struct SharedExpert {
    mlp: GatedMlp,
    /// `[1, hidden]`, f32.
    gate: LinearWeight,
}

/// One sparse layer's router and experts.
pub struct MoeBlock {
    /// `[num_experts, hidden]`, f32 whatever the weights' dtype.
    router: LinearWeight,
    /// gpt-oss's router bias, `[num_experts]`.
    router_bias: Option<Vec<f32>>,
    routing: MoeRouting,
    experts: Vec<GatedMlp>,
    shared: Option<SharedExpert>,
    top_k: usize,
    renormalize: bool,
    hidden: usize,
}

/// HF names of a family's MoE tensors under `model.layers.N.`.
struct Names {
    block: &'static str,
    router: &'static str,
    /// gate, up, down of one expert.
    parts: [&'static str; 3],
}

fn names(arch: Architecture) -> Names {
    match arch {
        Architecture::Mixtral => Names {
            block: "block_sparse_moe",
            router: "block_sparse_moe.gate.weight",
            parts: ["w1", "w3", "w2"],
        },
        _ => Names {
            block: "mlp",
            router: "mlp.gate.weight",
            parts: GatedMlp::HF_PARTS,
        },
    }
}

/// A weight read as an f32 dense matrix (routers and gates stay exact whatever the arithmetic).
fn f32_matrix(weights: &mut dyn WeightSource, name: &str, shape: &[usize]) -> Result<LinearWeight> {
    Ok(LinearWeight::Dense(
        weights.get(name, shape)?.to_dtype(DType::F32)?,
    ))
}

impl MoeBlock {
    /// Read layer `layer`'s router, experts and shared expert.
    pub fn load(
        weights: &mut dyn WeightSource,
        arch: Architecture,
        layer: usize,
        spec: &MoeSpec,
        hidden: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let p = format!("model.layers.{layer}");
        if arch == Architecture::GptOss {
            return gpt_oss::load(weights, &p, spec, hidden, dtype, device);
        }
        let n = names(arch);
        let router = f32_matrix(
            weights,
            &format!("{p}.{}", n.router),
            &[spec.num_experts, hidden],
        )?;
        let experts = (0..spec.num_experts)
            .map(|e| {
                let prefix = format!("{p}.{}.experts.{e}", n.block);
                GatedMlp::load(
                    weights,
                    &prefix,
                    n.parts,
                    hidden,
                    spec.expert_intermediate,
                    dtype,
                    device,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = match spec.shared_expert_intermediate {
            Some(inter) => Some(SharedExpert {
                mlp: GatedMlp::load(
                    weights,
                    &format!("{p}.mlp.shared_expert"),
                    GatedMlp::HF_PARTS,
                    hidden,
                    inter,
                    dtype,
                    device,
                )?,
                gate: f32_matrix(
                    weights,
                    &format!("{p}.mlp.shared_expert_gate.weight"),
                    &[1, hidden],
                )?,
            }),
            None => None,
        };
        Ok(Self {
            router,
            router_bias: None,
            routing: spec.routing,
            experts,
            shared,
            top_k: spec.top_k,
            renormalize: spec.renormalize,
            hidden,
        })
    }

    /// `x` is `[tokens, hidden]`; returns the same shape and dtype.
    pub fn forward(&self, x: &Tensor, activation: Activation) -> Result<Tensor> {
        let (tokens, hidden) = x.dims2()?;
        if hidden != self.hidden {
            return Err(ModelError::InvalidBatch(format!(
                "MoE input width {hidden}, expected {}",
                self.hidden
            )));
        }
        let x32 = x.to_dtype(DType::F32)?;
        let mut logits = self.router.forward(&x32)?.flatten_all()?.to_vec1::<f32>()?;
        let n = self.experts.len();
        if let Some(bias) = &self.router_bias {
            for row in logits.chunks_exact_mut(n) {
                row.iter_mut().zip(bias).for_each(|(l, b)| *l += b);
            }
        }
        let choices = match self.routing {
            MoeRouting::SoftmaxThenTopK => routing::route(&logits, n, self.top_k, self.renormalize),
            MoeRouting::TopKThenSoftmax => routing::route_top_k_softmax(&logits, n, self.top_k),
        };

        // Group tokens by expert: (token, weight) lists in token order.
        let mut groups: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.experts.len()];
        for (t, choice) in choices.iter().enumerate() {
            for &(e, w) in choice {
                groups[e].push((t, w));
            }
        }
        let host = x32.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; tokens * hidden];
        let device = x.device();
        let active: Vec<usize> = (0..n).filter(|&e| !groups[e].is_empty()).collect();
        tracing::trace!(tokens, active = active.len(), experts = n, "moe layer");
        let run = |e: usize| -> Result<Vec<f32>> {
            let group = &groups[e];
            let mut rows = Vec::with_capacity(group.len() * hidden);
            for &(t, _) in group {
                rows.extend_from_slice(&host[t * hidden..(t + 1) * hidden]);
            }
            let input =
                Tensor::from_vec(rows, (group.len(), hidden), device)?.to_dtype(x.dtype())?;
            let y = self.experts[e].forward(&input, activation)?;
            Ok(y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        // On the CPU the experts run side by side (each matmul still splits its rows when a
        // core is free): small experts no longer pay a fork-join per projection each.
        let outputs: Vec<Vec<f32>> = if device.is_cpu() {
            active.par_iter().map(|&e| run(e)).collect::<Result<_>>()?
        } else {
            active.iter().map(|&e| run(e)).collect::<Result<_>>()?
        };
        // Experts ascend, so each token sums its experts in index order (as transformers).
        for (&e, y) in active.iter().zip(&outputs) {
            for (&(t, w), row) in groups[e].iter().zip(y.chunks_exact(hidden)) {
                for (o, v) in out[t * hidden..(t + 1) * hidden].iter_mut().zip(row) {
                    *o += v * w;
                }
            }
        }
        if let Some(shared) = &self.shared {
            let y = shared.mlp.forward(x, activation)?;
            let y = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let g = shared.gate.forward(&x32)?.flatten_all()?.to_vec1::<f32>()?;
            for (t, (o, row)) in out
                .chunks_exact_mut(hidden)
                .zip(y.chunks_exact(hidden))
                .enumerate()
            {
                let gate = 1.0 / (1.0 + (-g[t]).exp());
                for (o, v) in o.iter_mut().zip(row) {
                    *o += gate * v;
                }
            }
        }
        Ok(Tensor::from_vec(out, (tokens, hidden), device)?.to_dtype(x.dtype())?)
    }
}
