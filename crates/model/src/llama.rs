//! One decoder for the Llama family (Llama, Mistral, Qwen2, Qwen3): a plain struct with `load`
//! and `forward`. The forward pass takes a flattened batch (all sequences' new tokens in one
//! `[tokens, hidden]` matrix), so projections and MLPs run as single large matmuls, and only
//! attention looks at sequence boundaries, through the [`AttentionBackend`].

use candle_core::{DType, Device, Tensor};

use crate::attention::{AttentionBackend, AttentionMetadata};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::rope::RotaryEmbedding;
use crate::weights::WeightSource;

/// A flattened batch for one forward pass.
#[derive(Debug, Clone, Default)]
pub struct ForwardBatch {
    /// New tokens of every sequence, concatenated.
    pub token_ids: Vec<u32>,
    /// Absolute position of each new token in its sequence.
    pub positions: Vec<u32>,
    pub attention: AttentionMetadata,
    /// Rows of the flattened batch whose logits are wanted (usually each sequence's last token).
    pub logit_rows: Vec<u32>,
}

struct Layer {
    input_norm: Tensor,
    /// q, k and v projections fused into one `[q + 2 kv, hidden]` matrix.
    qkv: LinearWeight,
    qkv_bias: Option<Tensor>,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    o_proj: LinearWeight,
    post_norm: Tensor,
    /// gate and up projections fused into one `[2 * intermediate, hidden]` matrix.
    gate_up: LinearWeight,
    down: LinearWeight,
}

/// The loaded decoder.
pub struct LlamaModel {
    config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: LinearWeight,
    rope: RotaryEmbedding,
    device: Device,
    dtype: DType,
    /// How the CPU linear layers multiply (from the weight source).
    arithmetic: CpuArithmetic,
}

use crate::cpu_bf16::CpuArithmetic;
use crate::weights::LinearWeight;

/// `x @ wᵀ` for a 2-D `x`.
fn linear(x: &Tensor, w: &LinearWeight) -> Result<Tensor> {
    w.forward(x)
}

impl LlamaModel {
    /// Build the model from `weights` (HF tensor names). `max_positions` bounds the rope tables.
    pub fn load(
        config: ModelConfig,
        weights: &mut dyn WeightSource,
        max_positions: usize,
        dtype: DType,
        device: &Device,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let (h, q_dim, kv_dim) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let total = c.num_layers + 2;
        let embed = weights.get("model.embed_tokens.weight", &[c.vocab_size, h])?;
        progress(1, total);
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let q = weights.get_linear(&format!("{p}.self_attn.q_proj.weight"), &[q_dim, h])?;
            let k = weights.get_linear(&format!("{p}.self_attn.k_proj.weight"), &[kv_dim, h])?;
            let v = weights.get_linear(&format!("{p}.self_attn.v_proj.weight"), &[kv_dim, h])?;
            let qkv_bias = if c.qkv_bias {
                let qb = weights.get(&format!("{p}.self_attn.q_proj.bias"), &[q_dim])?;
                let kb = weights.get(&format!("{p}.self_attn.k_proj.bias"), &[kv_dim])?;
                let vb = weights.get(&format!("{p}.self_attn.v_proj.bias"), &[kv_dim])?;
                Some(Tensor::cat(&[qb, kb, vb], 0)?)
            } else {
                None
            };
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(weights.get(&format!("{p}.self_attn.q_norm.weight"), &[c.head_dim])?),
                    Some(weights.get(&format!("{p}.self_attn.k_norm.weight"), &[c.head_dim])?),
                )
            } else {
                (None, None)
            };
            let gate = weights.get_linear(
                &format!("{p}.mlp.gate_proj.weight"),
                &[c.intermediate_size, h],
            )?;
            let up = weights.get_linear(
                &format!("{p}.mlp.up_proj.weight"),
                &[c.intermediate_size, h],
            )?;
            layers.push(Layer {
                input_norm: weights.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                qkv: LinearWeight::concat(&[q, k, v], dtype, device)?,
                qkv_bias,
                q_norm,
                k_norm,
                o_proj: weights.get_linear(&format!("{p}.self_attn.o_proj.weight"), &[h, q_dim])?,
                post_norm: weights.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up: LinearWeight::concat(&[gate, up], dtype, device)?,
                down: weights.get_linear(
                    &format!("{p}.mlp.down_proj.weight"),
                    &[h, c.intermediate_size],
                )?,
            });
            progress(i + 2, total);
        }
        let norm = weights.get("model.norm.weight", &[h])?;
        let lm_head = if !c.tie_word_embeddings && weights.contains("lm_head.weight") {
            weights.get_linear("lm_head.weight", &[c.vocab_size, h])?
        } else if weights.keeps_quantized() {
            // Tied head: lookups use the dense table, the matmul a quantized copy.
            weights.get_linear("model.embed_tokens.weight", &[c.vocab_size, h])?
        } else {
            LinearWeight::Dense(embed.clone()).with_arithmetic(weights.arithmetic())?
        };
        progress(total, total);
        let rope = RotaryEmbedding::new(c, max_positions, dtype, device)?;
        Ok(Self {
            config,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            device: device.clone(),
            dtype,
            arithmetic: weights.arithmetic(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// How the CPU linear layers multiply (the model's effective dtype on the CPU: a KV cache
    /// of `--kv-cache-dtype auto` follows it).
    pub fn cpu_arithmetic(&self) -> CpuArithmetic {
        self.arithmetic
    }

    /// Run the batch; returns logits `[logit_rows.len(), vocab]` in f32.
    pub fn forward(
        &self,
        batch: &ForwardBatch,
        attention: &mut dyn AttentionBackend,
    ) -> Result<Tensor> {
        let c = &self.config;
        let tokens = batch.token_ids.len();
        if tokens == 0 || batch.positions.len() != tokens {
            return Err(ModelError::InvalidBatch(format!(
                "{tokens} tokens with {} positions",
                batch.positions.len()
            )));
        }
        if let Some(bad) = batch
            .token_ids
            .iter()
            .find(|&&t| t as usize >= c.vocab_size)
        {
            return Err(ModelError::InvalidBatch(format!(
                "token id {bad} is outside the vocabulary ({})",
                c.vocab_size
            )));
        }
        if let Some(bad) = batch.logit_rows.iter().find(|&&r| r as usize >= tokens) {
            return Err(ModelError::InvalidBatch(format!(
                "logit row {bad} of {tokens} tokens"
            )));
        }
        let ids = Tensor::new(batch.token_ids.as_slice(), &self.device)?;
        let positions = Tensor::new(batch.positions.as_slice(), &self.device)?;
        let eps = c.rms_norm_eps as f32;
        let (q_dim, kv_dim) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);

        attention.begin_step(&batch.attention, c.num_heads)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.input_norm, eps)?;
            let mut qkv = linear(&h, &layer.qkv)?;
            if let Some(b) = &layer.qkv_bias {
                qkv = qkv.broadcast_add(b)?;
            }
            let mut q = qkv
                .narrow(1, 0, q_dim)?
                .reshape((tokens, c.num_heads, c.head_dim))?;
            let mut k =
                qkv.narrow(1, q_dim, kv_dim)?
                    .reshape((tokens, c.num_kv_heads, c.head_dim))?;
            let v = qkv.narrow(1, q_dim + kv_dim, kv_dim)?.reshape((
                tokens,
                c.num_kv_heads,
                c.head_dim,
            ))?;
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = candle_nn::ops::rms_norm(&q.contiguous()?, qn, eps)?;
                k = candle_nn::ops::rms_norm(&k.contiguous()?, kn, eps)?;
            }
            let (q, k) = self.rope.apply(&q, &k, &positions)?;
            let attn = attention.attend(i, &q, &k, &v.contiguous()?)?;
            let attn = attn.reshape((tokens, q_dim))?;
            x = (x + linear(&attn, &layer.o_proj)?)?;

            let h = candle_nn::ops::rms_norm(&x, &layer.post_norm, eps)?;
            let gate_up = linear(&h, &layer.gate_up)?;
            let inter = c.intermediate_size;
            let act = crate::cpu_ops::silu_and_mul(&gate_up, inter)?;
            x = (x + linear(&act, &layer.down)?)?;
        }
        let rows = Tensor::new(batch.logit_rows.as_slice(), &self.device)?;
        let last = x.index_select(&rows, 0)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, eps)?;
        let logits = linear(&last, &self.lm_head)?;
        Ok(logits.to_dtype(DType::F32)?)
    }
}
