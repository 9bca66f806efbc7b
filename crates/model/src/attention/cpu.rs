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

/// 16 independent lanes, summed in a fixed order: vectorizes to whatever width the function it
/// is inlined into was compiled for.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = a.len() / 16;
    for c in 0..chunks {
        let (x, y) = (&a[c * 16..c * 16 + 16], &b[c * 16..c * 16 + 16]);
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 16..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

#[inline(always)]
fn axpy(out: &mut [f32], w: f32, x: &[f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o += w * v;
    }
}

/// Attention of one sequence's queries for the query heads of one KV head, over the paged
/// cache of one layer. A portable version, and an AVX-512 one for the common head sizes that
/// keeps the query and the output accumulator in registers (the baseline x86-64 target only
/// allows 4-wide SSE, and the portable loop's scalar reductions dominated batched decode).
struct HeadKernel<'a> {
    kc: &'a [f32],
    vc: &'a [f32],
    qd: &'a [f32],
    block_stride: usize,
    block_size: usize,
    head_dim: usize,
    num_heads: usize,
    group: usize,
    scale: f32,
}

impl HeadKernel<'_> {
    /// `[query_len, group, head_dim]` for sequence `seq` and KV head `g`.
    fn run(&self, seq: &super::SequenceSlice, g: usize) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature was detected; each arm's chunk count matches head_dim.
                unsafe {
                    match self.head_dim {
                        64 => return self.run_avx512::<4>(seq, g),
                        80 => return self.run_avx512::<5>(seq, g),
                        96 => return self.run_avx512::<6>(seq, g),
                        128 => return self.run_avx512::<8>(seq, g),
                        256 => return self.run_avx512::<16>(seq, g),
                        _ => {}
                    }
                }
            }
        }
        self.run_generic(seq, g)
    }

    /// The same computation as [`Self::run_generic`] for `head_dim == 16 * C`.
    ///
    /// # Safety
    /// AVX-512F must be available and `self.head_dim == 16 * C`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512<const C: usize>(&self, seq: &super::SequenceSlice, g: usize) -> Vec<f32> {
        use std::arch::x86_64::*;
        let (bs, hd, group) = (self.block_size, self.head_dim, self.group);
        debug_assert_eq!(hd, 16 * C);
        let mut out = vec![0f32; seq.query_len * group * hd];
        let mut scores = vec![0f32; seq.context_len];
        let first_pos = seq.context_len - seq.query_len;
        let row = |j: usize| {
            let block = seq.block_table[j / bs] as usize;
            block * self.block_stride + (g * bs + j % bs) * hd
        };
        for i in 0..seq.query_len {
            let t = seq.query_start + i;
            let visible = first_pos + i + 1;
            for hq in 0..group {
                let head = g * group + hq;
                let qv = &self.qd[(t * self.num_heads + head) * hd..][..hd];
                let mut q = [_mm512_setzero_ps(); C];
                for (c, qc) in q.iter_mut().enumerate() {
                    *qc = _mm512_loadu_ps(qv.as_ptr().add(16 * c));
                }
                let mut max = f32::NEG_INFINITY;
                for (j, score) in scores[..visible].iter_mut().enumerate() {
                    let k = self.kc[row(j)..][..hd].as_ptr();
                    let mut acc = _mm512_mul_ps(q[0], _mm512_loadu_ps(k));
                    for (c, qc) in q.iter().enumerate().skip(1) {
                        acc = _mm512_fmadd_ps(*qc, _mm512_loadu_ps(k.add(16 * c)), acc);
                    }
                    let sc = _mm512_reduce_add_ps(acc) * self.scale;
                    *score = sc;
                    max = max.max(sc);
                }
                let mut denom = 0f32;
                for score in scores[..visible].iter_mut() {
                    *score = (*score - max).exp();
                    denom += *score;
                }
                let inv = 1.0 / denom;
                let mut acc = [_mm512_setzero_ps(); C];
                for (j, &w) in scores[..visible].iter().enumerate() {
                    let v = self.vc[row(j)..][..hd].as_ptr();
                    let w = _mm512_set1_ps(w * inv);
                    for (c, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(w, _mm512_loadu_ps(v.add(16 * c)), *a);
                    }
                }
                let dst = out[(i * group + hq) * hd..][..hd].as_mut_ptr();
                for (c, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(dst.add(16 * c), *a);
                }
            }
        }
        out
    }

    #[inline(always)]
    fn run_generic(&self, seq: &super::SequenceSlice, g: usize) -> Vec<f32> {
        let (bs, hd, group) = (self.block_size, self.head_dim, self.group);
        let mut out = vec![0f32; seq.query_len * group * hd];
        let mut scores = vec![0f32; seq.context_len];
        let first_pos = seq.context_len - seq.query_len;
        // Row `j` of this head's keys (or values) in the paged cache.
        let row = |j: usize| {
            let block = seq.block_table[j / bs] as usize;
            block * self.block_stride + (g * bs + j % bs) * hd
        };
        for i in 0..seq.query_len {
            let t = seq.query_start + i;
            let visible = first_pos + i + 1; // causal: positions 0..=first_pos+i
            for hq in 0..group {
                let head = g * group + hq;
                let qv = &self.qd[(t * self.num_heads + head) * hd..][..hd];
                let mut max = f32::NEG_INFINITY;
                for (j, score) in scores[..visible].iter_mut().enumerate() {
                    let off = row(j);
                    let sc = dot(qv, &self.kc[off..off + hd]) * self.scale;
                    *score = sc;
                    max = max.max(sc);
                }
                let mut denom = 0f32;
                for score in scores[..visible].iter_mut() {
                    *score = (*score - max).exp();
                    denom += *score;
                }
                let inv = 1.0 / denom;
                let acc = &mut out[(i * group + hq) * hd..][..hd];
                for (j, &w) in scores[..visible].iter().enumerate() {
                    let off = row(j);
                    axpy(acc, w * inv, &self.vc[off..off + hd]);
                }
            }
        }
        out
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
        let kernel = HeadKernel {
            kc,
            vc,
            qd: &qd,
            block_stride: this.block_stride(),
            block_size,
            head_dim,
            num_heads,
            group,
            scale: this.scale,
        };
        let results: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(s, g)| kernel.run(&md.sequences[s], g))
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
