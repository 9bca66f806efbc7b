//! Mixture-of-experts shapes and routing, read from `config.json` or GGUF metadata: how many
//! experts, how many each token uses, whether the chosen weights are renormalized, the shared
//! expert (Qwen2-MoE) and which layers are sparse. Families whose MLPs are dense have none.

use serde_json::Value;

use crate::error::{ModelError, Result};

use super::{Architecture, JsonMap};

/// How router logits become expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MoeRouting {
    /// Softmax over all experts, then the top k (renormalized or not): Mixtral, Qwen, OLMoE.
    #[default]
    SoftmaxThenTopK,
    /// The top k logits, then a softmax over just those: gpt-oss.
    TopKThenSoftmax,
}

impl MoeRouting {
    /// The family's rule (the same whichever file describes the model).
    pub fn of(arch: Architecture) -> Self {
        match arch {
            Architecture::GptOss => MoeRouting::TopKThenSoftmax,
            _ => MoeRouting::SoftmaxThenTopK,
        }
    }
}

/// A sparse MLP layer's shape and routing rule.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeSpec {
    pub routing: MoeRouting,
    pub num_experts: usize,
    /// Experts each token is sent to (`num_experts_per_tok`).
    pub top_k: usize,
    /// Each expert's intermediate size (`moe_intermediate_size`; Mixtral's `intermediate_size`).
    pub expert_intermediate: usize,
    /// Divide the chosen experts' softmax weights by their sum (Mixtral always; Qwen/OLMoE's
    /// `norm_topk_prob`).
    pub renormalize: bool,
    /// Qwen2-MoE: an always-on expert of this intermediate size, gated by a sigmoid.
    pub shared_expert_intermediate: Option<usize>,
    /// Per layer: whether its MLP is sparse (Qwen's `decoder_sparse_step`/`mlp_only_layers`
    /// leave some dense, of the config's `intermediate_size`).
    pub sparse_layers: Vec<bool>,
}

impl MoeSpec {
    /// Whether layer `i` routes through experts.
    pub fn is_sparse(&self, i: usize) -> bool {
        self.sparse_layers.get(i).copied().unwrap_or(false)
    }

    pub fn validate(&self, num_layers: usize) -> Result<()> {
        let fail = |m: String| Err(ModelError::Config(m));
        if self.num_experts == 0 || self.expert_intermediate == 0 {
            return fail("num_experts and the expert intermediate size must be positive".into());
        }
        if self.top_k == 0 || self.top_k > self.num_experts {
            return fail(format!(
                "num_experts_per_tok {} must be in 1..={}",
                self.top_k, self.num_experts
            ));
        }
        if self.shared_expert_intermediate == Some(0) {
            return fail("shared_expert_intermediate_size must be positive".into());
        }
        if self.sparse_layers.len() != num_layers {
            return fail(format!(
                "{} sparse-layer flags for {num_layers} layers",
                self.sparse_layers.len()
            ));
        }
        Ok(())
    }

    /// Parameters of one sparse layer's experts (all of them, and those one token reads).
    pub fn layer_parameters(&self, hidden: usize) -> (usize, usize) {
        let expert = 3 * hidden * self.expert_intermediate;
        let shared = self
            .shared_expert_intermediate
            .map_or(0, |s| 3 * hidden * s + hidden);
        let router = self.num_experts * hidden;
        (
            self.num_experts * expert + shared + router,
            self.top_k * expert + shared + router,
        )
    }
}

/// The MoE settings of an HF `config.json`, for the families that have experts.
pub(super) fn read_hf(
    arch: Architecture,
    obj: &JsonMap,
    num_layers: usize,
    intermediate_size: usize,
) -> Result<Option<MoeSpec>> {
    use Architecture::*;
    let uint = |k: &str| -> Result<Option<usize>> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| ModelError::Config(format!("{k} must be a non-negative integer"))),
        }
    };
    let flag = |k: &str, default: bool| -> Result<bool> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ModelError::Config(format!("{k} must be a boolean"))),
        }
    };
    let moe_keys = [
        "num_experts",
        "num_local_experts",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
    ];
    if !arch.has_experts() {
        if let Some(k) = moe_keys
            .iter()
            .find(|k| uint(k).ok().flatten().unwrap_or(0) > 0)
        {
            return Err(ModelError::Unsupported(format!(
                "{k} is set, but {} has no experts",
                arch.as_str()
            )));
        }
        return Ok(None);
    }
    // Mixtral calls it `num_local_experts`, the others `num_experts` (transformers v5 writes
    // Qwen3-MoE's as `num_local_experts` too).
    let num_experts = match uint("num_experts")? {
        Some(n) => n,
        None => uint("num_local_experts")?.ok_or_else(|| {
            ModelError::Config("config.json has no num_experts or num_local_experts".into())
        })?,
    };
    let top_k = uint("num_experts_per_tok")?
        .ok_or_else(|| ModelError::Config("config.json has no num_experts_per_tok".into()))?;
    let expert_intermediate = match arch {
        Mixtral | Olmoe | GptOss => intermediate_size,
        _ => uint("moe_intermediate_size")?.unwrap_or(intermediate_size),
    };
    let renormalize = arch == Mixtral || flag("norm_topk_prob", false)?;
    let shared_expert_intermediate = match arch {
        Qwen2Moe => Some(uint("shared_expert_intermediate_size")?.unwrap_or(5632)),
        _ => None,
    };
    let sparse_layers = match arch {
        Qwen2Moe | Qwen3Moe => {
            let step = uint("decoder_sparse_step")?.unwrap_or(1);
            if step == 0 {
                return Err(ModelError::Config(
                    "decoder_sparse_step must be positive".into(),
                ));
            }
            let dense: Vec<usize> = match obj.get("mlp_only_layers") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| v.as_u64().map(|n| n as usize))
                    .collect::<Option<_>>()
                    .ok_or_else(|| {
                        ModelError::Config("mlp_only_layers holds layer indices".into())
                    })?,
                Some(_) => return Err(ModelError::Config("mlp_only_layers must be a list".into())),
            };
            (0..num_layers)
                .map(|i| !dense.contains(&i) && (i + 1) % step == 0)
                .collect()
        }
        _ => vec![true; num_layers],
    };
    // `ModelConfig::validate` checks the spec with the rest of the config.
    Ok(Some(MoeSpec {
        routing: MoeRouting::of(arch),
        num_experts,
        top_k,
        expert_intermediate,
        renormalize,
        shared_expert_intermediate,
        sparse_layers,
    }))
}
