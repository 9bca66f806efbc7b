//! One decoder for every family (Llama, Mistral, Qwen2/3, Gemma 2/3, SmolLM3, OLMo 2, Granite,
//! Phi-3, and the MoE families Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss): a plain struct with `load`
//! and `forward`. The families differ in a few switches ([`crate::config::FamilyTraits`]): where
//! the norms sit, the activation, multipliers, soft-caps and which layers slide or skip rope; a
//! layer's MLP is dense or a mixture of experts ([`crate::mlp::Mlp`]). The forward pass takes a
//! flattened batch (all sequences' new tokens in one `[tokens, hidden]` matrix), so projections
//! and MLPs run as single large matmuls, and only attention looks at sequence boundaries, through
//! the [`AttentionBackend`].

use candle_core::{DType, Device, Tensor};

use crate::attention::{AttentionBackend, AttentionMetadata, LayerAttention};
use crate::config::{BlockNorms, ModelConfig};
use crate::error::{ModelError, Result};
use crate::mlp::{GatedMlp, Mlp};
use crate::moe::MoeBlock;
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

/// Which rope table a layer uses.
#[derive(Clone, Copy)]
enum LayerRope {
    Global,
    /// Gemma 3's sliding layers.
    Local,
    /// SmolLM3's NoPE layers.
    None,
}

struct Layer {
    /// Before attention (absent in OLMo 2's post-norm blocks).
    input_norm: Option<Tensor>,
    /// q, k and v projections fused into one `[q + 2 kv, hidden]` matrix.
    qkv: LinearWeight,
    qkv_bias: Option<Tensor>,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    o_proj: LinearWeight,
    /// gpt-oss (and Llama-style configs with `attention_bias`) bias the output projection.
    o_bias: Option<Tensor>,
    /// On the attention output, before the residual add (Gemma, OLMo 2).
    post_attn_norm: Option<Tensor>,
    /// Before the MLP (Llama's `post_attention_layernorm`, Gemma's `pre_feedforward_layernorm`).
    pre_mlp_norm: Option<Tensor>,
    /// On the MLP output, before the residual add (Gemma, OLMo 2).
    post_mlp_norm: Option<Tensor>,
    attention: LayerAttention,
    rope: LayerRope,
    mlp: Mlp,
}

/// The loaded decoder.
pub struct LlamaModel {
    config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: LinearWeight,
    rope: RotaryEmbedding,
    /// Gemma 3's sliding layers' table.
    local_rope: Option<RotaryEmbedding>,
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
        let f = &c.family;
        let plus_one = f.norm_plus_one;
        // Gemma stores norm weights as `w - 1`.
        let norm = |w: &mut dyn WeightSource, name: &str, len: usize| -> Result<Tensor> {
            let t = w.get(name, &[len])?;
            Ok(if plus_one { (t + 1.0)? } else { t })
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let inter = c.intermediate_size;
            let (qkv, mlp) = if f.fused_projections {
                // Phi-3 stores them fused already (gate before up, as spindle fuses them).
                let gate_up =
                    weights.get_linear(&format!("{p}.mlp.gate_up_proj.weight"), &[2 * inter, h])?;
                let down = weights.get_linear(&format!("{p}.mlp.down_proj.weight"), &[h, inter])?;
                (
                    weights.get_linear(
                        &format!("{p}.self_attn.qkv_proj.weight"),
                        &[q_dim + 2 * kv_dim, h],
                    )?,
                    Mlp::Dense(GatedMlp {
                        gate_up,
                        down,
                        inter,
                        biases: None,
                    }),
                )
            } else {
                let get = |w: &mut dyn WeightSource, name: &str, rows: usize| {
                    w.get_linear(&format!("{p}.{name}.weight"), &[rows, h])
                };
                let q = get(weights, "self_attn.q_proj", q_dim)?;
                let k = get(weights, "self_attn.k_proj", kv_dim)?;
                let v = get(weights, "self_attn.v_proj", kv_dim)?;
                let mlp = match &c.moe {
                    Some(spec) if spec.is_sparse(i) => Mlp::Sparse(MoeBlock::load(
                        weights,
                        c.architecture,
                        i,
                        spec,
                        h,
                        dtype,
                        device,
                    )?),
                    _ => Mlp::Dense(GatedMlp::load(
                        weights,
                        &format!("{p}.mlp"),
                        GatedMlp::HF_PARTS,
                        h,
                        inter,
                        dtype,
                        device,
                    )?),
                };
                (LinearWeight::concat(&[q, k, v], dtype, device)?, mlp)
            };
            let qkv_bias = if c.qkv_bias {
                let qb = weights.get(&format!("{p}.self_attn.q_proj.bias"), &[q_dim])?;
                let kb = weights.get(&format!("{p}.self_attn.k_proj.bias"), &[kv_dim])?;
                let vb = weights.get(&format!("{p}.self_attn.v_proj.bias"), &[kv_dim])?;
                Some(Tensor::cat(&[qb, kb, vb], 0)?)
            } else {
                None
            };
            let (q_norm, k_norm) = if c.qk_norm {
                let (qn, kn) = if f.qk_norm_whole {
                    (q_dim, kv_dim)
                } else {
                    (c.head_dim, c.head_dim)
                };
                (
                    Some(norm(weights, &format!("{p}.self_attn.q_norm.weight"), qn)?),
                    Some(norm(weights, &format!("{p}.self_attn.k_norm.weight"), kn)?),
                )
            } else {
                (None, None)
            };
            let mut named = |suffix: &str| norm(weights, &format!("{p}.{suffix}.weight"), h);
            let (input_norm, post_attn_norm, pre_mlp_norm, post_mlp_norm) = match f.norms {
                BlockNorms::Pre => (
                    Some(named("input_layernorm")?),
                    None,
                    Some(named("post_attention_layernorm")?),
                    None,
                ),
                BlockNorms::Sandwich => (
                    Some(named("input_layernorm")?),
                    Some(named("post_attention_layernorm")?),
                    Some(named("pre_feedforward_layernorm")?),
                    Some(named("post_feedforward_layernorm")?),
                ),
                BlockNorms::Post => (
                    None,
                    Some(named("post_attention_layernorm")?),
                    None,
                    Some(named("post_feedforward_layernorm")?),
                ),
            };
            let kind = f.layer(i);
            let sinks = if c.attention_sinks {
                let s = weights.get(&format!("{p}.self_attn.sinks"), &[c.num_heads])?;
                Some(s.to_dtype(DType::F32)?.to_vec1::<f32>()?.into())
            } else {
                None
            };
            let attention = LayerAttention {
                scale: f
                    .attention_scale
                    .map_or(1.0 / (c.head_dim as f32).sqrt(), |s| s as f32),
                softcap: f.attn_softcap.map(|x| x as f32),
                window: f.sliding_window.filter(|_| kind.sliding),
                sinks,
            };
            let o_bias_name = format!("{p}.self_attn.o_proj.bias");
            let o_bias = if weights.contains(&o_bias_name) {
                Some(weights.get(&o_bias_name, &[h])?)
            } else {
                None
            };
            let rope = match (kind.rope, kind.sliding && c.local_rope.is_some()) {
                (false, _) => LayerRope::None,
                (true, true) => LayerRope::Local,
                (true, false) => LayerRope::Global,
            };
            layers.push(Layer {
                input_norm,
                qkv,
                qkv_bias,
                q_norm,
                k_norm,
                o_proj: weights.get_linear(&format!("{p}.self_attn.o_proj.weight"), &[h, q_dim])?,
                o_bias,
                post_attn_norm,
                pre_mlp_norm,
                post_mlp_norm,
                attention,
                rope,
                mlp,
            });
            progress(i + 2, total);
        }
        let norm = norm(weights, "model.norm.weight", h)?;
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
        let local_rope = match &c.local_rope {
            Some(spec) => Some(RotaryEmbedding::from_spec(
                c.rotary_dim(),
                spec,
                None,
                max_positions,
                dtype,
                device,
            )?),
            None => None,
        };
        Ok(Self {
            config,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            local_rope,
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
        let f = &c.family;
        let norm = |x: &Tensor, w: &Tensor| candle_nn::ops::rms_norm(x, w, eps);
        // Granite scales each sublayer's output before the residual add.
        let residual = |x: Tensor, out: Tensor| -> Result<Tensor> {
            Ok(match f.residual_scale {
                Some(s) => (x + (out * s)?)?,
                None => (x + out)?,
            })
        };
        let mut x = self.embed.index_select(&ids, 0)?;
        if let Some(s) = f.embedding_scale {
            // Gemma multiplies by sqrt(hidden) rounded to the weights' dtype, as transformers.
            let s = Tensor::new(s as f32, &self.device)?.to_dtype(x.dtype())?;
            x = x.broadcast_mul(&s)?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let h = match &layer.input_norm {
                Some(w) => norm(&x, w)?,
                None => x.clone(),
            };
            let mut qkv = linear(&h, &layer.qkv)?;
            if let Some(b) = &layer.qkv_bias {
                qkv = qkv.broadcast_add(b)?;
            }
            let mut q = qkv.narrow(1, 0, q_dim)?;
            let mut k = qkv.narrow(1, q_dim, kv_dim)?;
            let mut v = qkv.narrow(1, q_dim + kv_dim, kv_dim)?;
            if let (Some(qn), Some(kn), true) = (&layer.q_norm, &layer.k_norm, f.qk_norm_whole) {
                q = norm(&q.contiguous()?, qn)?;
                k = norm(&k.contiguous()?, kn)?;
            }
            if let Some(clip) = c.clip_qkv {
                // OLMoE clamps after its q/k norms.
                q = q.clamp(-clip, clip)?;
                k = k.clamp(-clip, clip)?;
                v = v.clamp(-clip, clip)?;
            }
            let mut q = q.reshape((tokens, c.num_heads, c.head_dim))?;
            let mut k = k.reshape((tokens, c.num_kv_heads, c.head_dim))?;
            let v = v.reshape((tokens, c.num_kv_heads, c.head_dim))?;
            if let (Some(qn), Some(kn), false) = (&layer.q_norm, &layer.k_norm, f.qk_norm_whole) {
                q = norm(&q.contiguous()?, qn)?;
                k = norm(&k.contiguous()?, kn)?;
            }
            let (q, k) = match (layer.rope, &self.local_rope) {
                (LayerRope::None, _) => (q.contiguous()?, k.contiguous()?),
                (LayerRope::Local, Some(local)) => local.apply(&q, &k, &positions)?,
                _ => self.rope.apply(&q, &k, &positions)?,
            };
            let attn = attention.attend(i, &layer.attention, &q, &k, &v.contiguous()?)?;
            let mut attn = linear(&attn.reshape((tokens, q_dim))?, &layer.o_proj)?;
            if let Some(b) = &layer.o_bias {
                attn = attn.broadcast_add(b)?;
            }
            if let Some(w) = &layer.post_attn_norm {
                attn = norm(&attn, w)?;
            }
            x = residual(x, attn)?;

            let h = match &layer.pre_mlp_norm {
                Some(w) => norm(&x, w)?,
                None => x.clone(),
            };
            let mut mlp = layer.mlp.forward(&h, f.activation)?;
            if let Some(w) = &layer.post_mlp_norm {
                mlp = norm(&mlp, w)?;
            }
            x = residual(x, mlp)?;
        }
        let rows = Tensor::new(batch.logit_rows.as_slice(), &self.device)?;
        let last = x.index_select(&rows, 0)?;
        let last = norm(&last, &self.norm)?;
        let mut logits = linear(&last, &self.lm_head)?.to_dtype(DType::F32)?;
        if let Some(d) = f.logits_divisor {
            logits = (logits / d)?;
        }
        if let Some(cap) = f.final_softcap {
            logits = crate::cpu_ops::soft_cap_tensor(&logits, cap)?;
        }
        Ok(logits)
    }
}
