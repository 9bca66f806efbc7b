//! Paged attention on the CPU, in plain Rust over f32 slices. The cache of each layer is one
//! `Vec<f32>` for K and one for V, laid out `[num_blocks, num_kv_heads, block_size, head_dim]`
//! so that the keys of one head inside a block are contiguous (good for the dot-product loops).
//! Work is split across (sequence, kv-head) pairs with rayon; accumulation is in f32.

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::{AttentionBackend, AttentionMetadata, CacheShape};
use crate::error::{ModelError, Result};

/// The CPU KV cache and the attention kernels that read it.
pub struct CpuAttention {
    shape: CacheShape,
    /// Per layer: (K, V), each `num_blocks * num_kv_heads * block_size * head_dim` floats.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    scale: f32,
}

impl CpuAttention {
    /// Allocate a zeroed cache of `shape`. Errors instead of aborting when memory is short.
    pub fn new(shape: CacheShape) -> Result<Self> {
        let per_layer = shape
            .num_blocks
            .checked_mul(shape.num_kv_heads)
            .and_then(|x| x.checked_mul(shape.block_size))
            .and_then(|x| x.checked_mul(shape.head_dim))
            .ok_or_else(|| ModelError::Config("KV cache size overflows".into()))?;
        let mut layers = Vec::with_capacity(shape.num_layers);
        for _ in 0..shape.num_layers {
            let mut k = Vec::new();
            let mut v = Vec::new();
            k.try_reserve_exact(per_layer).map_err(|_| oom(per_layer))?;
            v.try_reserve_exact(per_layer).map_err(|_| oom(per_layer))?;
            k.resize(per_layer, 0.0);
            v.resize(per_layer, 0.0);
            layers.push((k, v));
        }
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        Ok(Self {
            shape,
            layers,
            scale,
        })
    }

    fn block_stride(&self) -> usize {
        self.shape.num_kv_heads * self.shape.block_size * self.shape.head_dim
    }

    /// Offset of (block, kv_head, slot-in-block) in a layer's K or V buffer.
    fn offset(&self, block: usize, head: usize, in_block: usize) -> usize {
        block * self.block_stride()
            + (head * self.shape.block_size + in_block) * self.shape.head_dim
    }

    fn check_metadata(&self, md: &AttentionMetadata, tokens: usize) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidBatch(m));
        if md.slot_mapping.len() != tokens {
            return bad(format!(
                "{} slots for {} tokens",
                md.slot_mapping.len(),
                tokens
            ));
        }
        let capacity = self.shape.capacity_tokens();
        if let Some(slot) = md.slot_mapping.iter().find(|&&s| s as usize >= capacity) {
            return bad(format!(
                "slot {slot} is outside a cache of {capacity} slots"
            ));
        }
        for (i, seq) in md.sequences.iter().enumerate() {
            let end = seq.query_start + seq.query_len;
            if end > tokens || seq.query_len == 0 || seq.query_len > seq.context_len {
                return bad(format!(
                    "sequence {i}: inconsistent query range or context length"
                ));
            }
            let blocks_needed = seq.context_len.div_ceil(self.shape.block_size);
            if seq.block_table.len() < blocks_needed {
                return bad(format!(
                    "sequence {i}: {} blocks cannot hold {} tokens",
                    seq.block_table.len(),
                    seq.context_len
                ));
            }
            if let Some(b) = seq
                .block_table
                .iter()
                .find(|&&b| b as usize >= self.shape.num_blocks)
            {
                return bad(format!("sequence {i}: block {b} is outside the cache"));
            }
        }
        Ok(())
    }
}

fn oom(elements: usize) -> ModelError {
    ModelError::Config(format!(
        "cannot allocate {} MiB for the KV cache",
        elements * 4 >> 20
    ))
}

/// Borrow a tensor's data as a contiguous f32 slice (converting if needed).
fn f32_data(t: &Tensor) -> Result<Vec<f32>> {
    let t = t.to_dtype(DType::F32)?;
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let all = cpu.as_slice::<f32>()?;
            let start = layout.start_offset();
            Ok(all[start..start + t.elem_count()].to_vec())
        }
        _ => Err(ModelError::Unsupported(
            "the CPU attention backend needs CPU tensors".into(),
        )),
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

#[inline]
fn axpy(out: &mut [f32], w: f32, x: &[f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o += w * v;
    }
}

impl AttentionBackend for CpuAttention {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        md: &AttentionMetadata,
    ) -> Result<Tensor> {
        let CacheShape {
            block_size,
            num_kv_heads,
            head_dim,
            ..
        } = self.shape;
        let (tokens, num_heads, q_dim) = q.dims3()?;
        if q_dim != head_dim
            || k.dims3()? != (tokens, num_kv_heads, head_dim)
            || k.dims() != v.dims()
        {
            return Err(ModelError::InvalidBatch(format!(
                "q {:?} / k {:?} / v {:?} do not match the cache (kv heads {num_kv_heads}, head_dim {head_dim})",
                q.dims(),
                k.dims(),
                v.dims()
            )));
        }
        if layer >= self.layers.len() {
            return Err(ModelError::InvalidBatch(format!(
                "layer {layer} has no cache"
            )));
        }
        self.check_metadata(md, tokens)?;
        let group = num_heads / num_kv_heads;
        let (qd, kd, vd) = (f32_data(q)?, f32_data(k)?, f32_data(v)?);

        // 1. Write the new K/V at their slots.
        let offsets: Vec<(usize, usize)> = md
            .slot_mapping
            .iter()
            .map(|&s| (s as usize / block_size, s as usize % block_size))
            .collect();
        {
            let block_stride = self.block_stride();
            let (kc, vc) = &mut self.layers[layer];
            for (t, &(block, in_block)) in offsets.iter().enumerate() {
                for h in 0..num_kv_heads {
                    let dst = block * block_stride + (h * block_size + in_block) * head_dim;
                    let src = (t * num_kv_heads + h) * head_dim;
                    kc[dst..dst + head_dim].copy_from_slice(&kd[src..src + head_dim]);
                    vc[dst..dst + head_dim].copy_from_slice(&vd[src..src + head_dim]);
                }
            }
        }

        // 2. Attention per (sequence, kv head); each task yields [query_len, group, head_dim].
        let (kc, vc) = &self.layers[layer];
        let this = &*self;
        let tasks: Vec<(usize, usize)> = (0..md.sequences.len())
            .flat_map(|s| (0..num_kv_heads).map(move |g| (s, g)))
            .collect();
        let results: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(s, g)| {
                let seq = &md.sequences[s];
                let mut out = vec![0f32; seq.query_len * group * head_dim];
                let mut scores = vec![0f32; seq.context_len];
                let first_pos = seq.context_len - seq.query_len;
                for i in 0..seq.query_len {
                    let t = seq.query_start + i;
                    let visible = first_pos + i + 1; // causal: positions 0..=first_pos+i
                    for hq in 0..group {
                        let head = g * group + hq;
                        let qv = &qd[(t * num_heads + head) * head_dim..][..head_dim];
                        let mut max = f32::NEG_INFINITY;
                        for (j, score) in scores[..visible].iter_mut().enumerate() {
                            let block = seq.block_table[j / block_size] as usize;
                            let off = this.offset(block, g, j % block_size);
                            let sc = dot(qv, &kc[off..off + head_dim]) * this.scale;
                            *score = sc;
                            max = max.max(sc);
                        }
                        let mut denom = 0f32;
                        for score in scores[..visible].iter_mut() {
                            *score = (*score - max).exp();
                            denom += *score;
                        }
                        let inv = 1.0 / denom;
                        let acc = &mut out[(i * group + hq) * head_dim..][..head_dim];
                        for (j, &w) in scores[..visible].iter().enumerate() {
                            let block = seq.block_table[j / block_size] as usize;
                            let off = this.offset(block, g, j % block_size);
                            axpy(acc, w * inv, &vc[off..off + head_dim]);
                        }
                    }
                }
                out
            })
            .collect();

        // 3. Scatter into [tokens, num_heads, head_dim]. Tokens no sequence claims stay zero.
        let mut output = vec![0f32; tokens * num_heads * head_dim];
        for (&(s, g), res) in tasks.iter().zip(&results) {
            let seq = &md.sequences[s];
            for i in 0..seq.query_len {
                let t = seq.query_start + i;
                for hq in 0..group {
                    let head = g * group + hq;
                    let dst = (t * num_heads + head) * head_dim;
                    let src = (i * group + hq) * head_dim;
                    output[dst..dst + head_dim].copy_from_slice(&res[src..src + head_dim]);
                }
            }
        }
        let out = Tensor::from_vec(output, (tokens, num_heads, head_dim), &Device::Cpu)?;
        Ok(out.to_dtype(q.dtype())?)
    }

    fn copy_blocks(&mut self, pairs: &[(u32, u32)]) -> Result<()> {
        let stride = self.block_stride();
        let n = self.shape.num_blocks as u32;
        if let Some(&(s, d)) = pairs.iter().find(|&&(s, d)| s >= n || d >= n) {
            return Err(ModelError::InvalidBatch(format!(
                "block copy {s} -> {d} is out of range"
            )));
        }
        for (k, v) in self.layers.iter_mut() {
            for &(src, dst) in pairs {
                let (src, dst) = (src as usize * stride, dst as usize * stride);
                k.copy_within(src..src + stride, dst);
                v.copy_within(src..src + stride, dst);
            }
        }
        Ok(())
    }

    fn shape(&self) -> CacheShape {
        self.shape
    }
}
