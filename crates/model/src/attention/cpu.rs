//! Paged attention on the CPU, in plain Rust over f32 slices. The cache of each layer is one
//! `Vec<f32>` for K and one for V. V is `[num_blocks, num_kv_heads, block_size, head_dim]`, so a
//! value row is contiguous for the weighted sum. K is stored transposed inside each block,
//! `[num_blocks, num_kv_heads, head_dim, block_size]`: with 16-token blocks one vector load
//! holds dimension `d` of all 16 keys, and the scores of a whole block come out of `head_dim`
//! broadcast-FMAs with no horizontal sums. Work is split across (sequence, kv-head) pairs with
//! rayon; accumulation is in f32.
//!
//! The cache holds f32, or bf16/f16 (`--kv-cache-dtype`): half the bytes per token, so twice
//! the tokens per GiB and half the cache traffic of long-context and batched attention. Keys
//! and values are rounded once when written and widened exactly when read; scores, softmax and
//! sums stay f32.

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::kv_dtype::{Bf16, KvDtype, KvElem, F16};
use super::{check_layer_inputs, AttentionBackend, AttentionMetadata, CacheShape, LayerAttention};
use crate::error::{ModelError, Result};

/// One layer's K and V in the cache's element type.
enum LayerCache {
    F32(Vec<f32>, Vec<f32>),
    Bf16(Vec<Bf16>, Vec<Bf16>),
    F16(Vec<F16>, Vec<F16>),
}

/// Run `$body` with `$k`, `$v` bound to a layer's K and V slices (as `&mut` when `$layer` is).
macro_rules! with_layer {
    ($layer:expr, |$k:ident, $v:ident| $body:expr) => {
        match $layer {
            LayerCache::F32($k, $v) => $body,
            LayerCache::Bf16($k, $v) => $body,
            LayerCache::F16($k, $v) => $body,
        }
    };
}

/// The CPU KV cache and the attention kernels that read it.
pub struct CpuAttention {
    shape: CacheShape,
    dtype: KvDtype,
    /// Per layer: K and V, each `num_blocks * num_kv_heads * block_size * head_dim` elements.
    layers: Vec<LayerCache>,
    /// The validated metadata of the step in flight and its query head count.
    step: Option<(AttentionMetadata, usize)>,
}

/// A zeroed vector of `n` elements, or an error (not an abort) when memory is short. The
/// memory comes zeroed from the allocator (large blocks are fresh anonymous mappings, zero on
/// first touch) and is not written here, so the cache's pages become resident only as blocks
/// are first used: resident memory follows the work, not `--kv-cache-memory`.
fn zeroed<E: KvElem>(n: usize) -> Result<Vec<E>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<E>(n).map_err(|_| oom(usize::MAX))?;
    // SAFETY: `layout` has a non-zero size; `KvElem` promises that all-zero bits are a valid
    // 0.0, so the zeroed allocation holds `n` valid values, and the Vec takes ownership of
    // exactly that allocation (capacity = length = n, the layout `Vec<E>` would use).
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut E;
        if ptr.is_null() {
            return Err(oom(layout.size()));
        }
        Ok(Vec::from_raw_parts(ptr, n, n))
    }
}

impl CpuAttention {
    /// Allocate a zeroed f32 cache of `shape`.
    pub fn new(shape: CacheShape) -> Result<Self> {
        Self::with_dtype(shape, KvDtype::F32)
    }

    /// Allocate a zeroed cache of `shape` holding `dtype`. Errors instead of aborting when
    /// memory is short.
    pub fn with_dtype(shape: CacheShape, dtype: KvDtype) -> Result<Self> {
        let per_layer = shape
            .num_blocks
            .checked_mul(shape.num_kv_heads)
            .and_then(|x| x.checked_mul(shape.block_size))
            .and_then(|x| x.checked_mul(shape.head_dim))
            .ok_or_else(|| ModelError::Config("KV cache size overflows".into()))?;
        let mut layers = Vec::with_capacity(shape.num_layers);
        for _ in 0..shape.num_layers {
            layers.push(match dtype {
                KvDtype::F32 => LayerCache::F32(zeroed(per_layer)?, zeroed(per_layer)?),
                KvDtype::Bf16 => LayerCache::Bf16(zeroed(per_layer)?, zeroed(per_layer)?),
                KvDtype::F16 => LayerCache::F16(zeroed(per_layer)?, zeroed(per_layer)?),
            });
        }
        Ok(Self {
            shape,
            dtype,
            layers,
            step: None,
        })
    }

    /// The element type the cache holds.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    fn block_stride(&self) -> usize {
        self.shape.num_kv_heads * self.shape.block_size * self.shape.head_dim
    }
}

fn oom(bytes: usize) -> ModelError {
    ModelError::Config(format!(
        "cannot allocate {} MiB for the KV cache",
        bytes >> 20
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

#[inline(always)]
fn axpy<E: KvElem>(out: &mut [f32], w: f32, x: &[E]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o += w * v.to_f32();
    }
}

/// Gemma 2's soft-capping, `cap * tanh(score / cap)`, in place (a no-op without a cap).
#[inline(always)]
fn soft_cap(scores: &mut [f32], cap: Option<f32>) {
    if let Some(cap) = cap {
        crate::cpu_ops::soft_cap(scores, cap);
    }
}

/// In-place softmax of `scores`, in f32; a `sink` logit joins the maximum and the denominator
/// (and gets no value).
#[inline(always)]
fn softmax(scores: &mut [f32], sink: Option<f32>) {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let max = sink.map_or(max, |s| max.max(s));
    let mut denom = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        denom += *s;
    }
    if let Some(s) = sink {
        denom += (s - max).exp();
    }
    let inv = 1.0 / denom;
    for s in scores.iter_mut() {
        *s *= inv;
    }
}

/// Attention of one sequence's queries for the query heads of one KV head, over the paged
/// cache of one layer: a portable version, and an AVX-512 one for 16-token blocks and the
/// common head sizes (the baseline x86-64 target only allows 4-wide SSE). A query at position
/// `p` attends to keys `how.first_visible(p) ..= p`.
struct HeadKernel<'a, E: KvElem> {
    kc: &'a [E],
    vc: &'a [E],
    qd: &'a [f32],
    block_stride: usize,
    block_size: usize,
    head_dim: usize,
    num_heads: usize,
    group: usize,
    how: LayerAttention,
}

impl<E: KvElem> HeadKernel<'_, E> {
    /// Query head `head`'s sink logit, if the layer has sinks.
    fn sink(&self, head: usize) -> Option<f32> {
        self.how.sinks.as_ref().and_then(|s| s.get(head).copied())
    }

    /// `[query_len, group, head_dim]` for sequence `seq` and KV head `g`.
    fn run(&self, seq: &super::SequenceSlice, g: usize) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        {
            if self.block_size == avx512::BLOCK && crate::cpu_isa::avx2() {
                let wide = crate::cpu_isa::avx512();
                macro_rules! go {
                    ($c:literal) => {
                        // SAFETY: the instruction set was checked; `$c` chunks make head_dim
                        // and the block size was checked.
                        return unsafe {
                            if wide {
                                self.run_avx512::<$c>(seq, g)
                            } else {
                                self.run_avx2::<$c>(seq, g)
                            }
                        }
                    };
                }
                match self.head_dim {
                    64 => go!(4),
                    80 => go!(5),
                    96 => go!(6),
                    128 => go!(8),
                    256 => go!(16),
                    _ => {}
                }
            }
        }
        self.run_generic(seq, g)
    }

    fn run_generic(&self, seq: &super::SequenceSlice, g: usize) -> Vec<f32> {
        let (bs, hd, group) = (self.block_size, self.head_dim, self.group);
        let mut out = vec![0f32; seq.query_len * group * hd];
        let mut scores = vec![0f32; seq.context_len];
        let first_pos = seq.context_len - seq.query_len;
        // Where key `j` (dimension 0; the others follow `bs` apart) and value row `j` start.
        let key = |j: usize| {
            let block = seq.block_table[j / bs] as usize;
            block * self.block_stride + g * hd * bs + j % bs
        };
        let value = |j: usize| {
            let block = seq.block_table[j / bs] as usize;
            block * self.block_stride + (g * bs + j % bs) * hd
        };
        for i in 0..seq.query_len {
            let t = seq.query_start + i;
            let visible = first_pos + i + 1; // causal: positions lo..=first_pos+i
            let lo = self.how.first_visible(first_pos + i);
            for hq in 0..group {
                let head = g * group + hq;
                let qv = &self.qd[(t * self.num_heads + head) * hd..][..hd];
                let scores = &mut scores[lo..visible];
                for (j, score) in (lo..).zip(scores.iter_mut()) {
                    let k = &self.kc[key(j)..];
                    let dot: f32 = qv
                        .iter()
                        .enumerate()
                        .map(|(d, &q)| q * k[d * bs].to_f32())
                        .sum();
                    *score = dot * self.how.scale;
                }
                soft_cap(scores, self.how.softcap);
                softmax(scores, self.sink(head));
                let acc = &mut out[(i * group + hq) * hd..][..hd];
                for (j, &w) in (lo..).zip(scores.iter()) {
                    let off = value(j);
                    axpy(acc, w, &self.vc[off..off + hd]);
                }
            }
        }
        out
    }
}

/// The vectorized kernel, written once against the AVX-512 intrinsics' names and instantiated
/// for AVX-512 and for AVX2 (`cpu_emu512`: the same lanes in the same order, identical
/// results): `$run` and its block scores `$scores`, compiled with `$features`, with the
/// intrinsics of `$simd`, helpers of `$module` and cache loads `KvElem::$load`.
#[cfg(target_arch = "x86_64")]
macro_rules! head_kernels {
    ($run:ident, $scores:ident, $features:literal, $simd:path, $module:ident, $load:ident) => {
        /// The same computation as [`Self::run_generic`] for 16-token blocks and
        /// `head_dim == 16 * C`: block scores from broadcast-FMAs over the transposed keys (up to
        /// four query heads per pass over a block, so each key vector is loaded once for them), and
        /// the weighted sum of values in `C` register accumulators.
        ///
        /// # Safety
        /// The CPU has `$features`, `self.block_size == 16` and `self.head_dim == 16 * C`.
        #[target_feature(enable = $features)]
        unsafe fn $run<const C: usize>(&self, seq: &super::SequenceSlice, g: usize) -> Vec<f32> {
            use $simd::*;
            const BS: usize = $module::BLOCK;
            let (hd, group) = (self.head_dim, self.group);
            debug_assert!(hd == 16 * C && self.block_size == BS);
            let mut out = vec![0f32; seq.query_len * group * hd];
            // One row of scores per query head, padded to whole blocks.
            let stride = seq.context_len.next_multiple_of(BS);
            let mut scores = vec![0f32; group * stride];
            let first_pos = seq.context_len - seq.query_len;
            for i in 0..seq.query_len {
                let t = seq.query_start + i;
                let visible = first_pos + i + 1;
                let lo = self.how.first_visible(first_pos + i);
                let q = &self.qd[(t * self.num_heads + g * group) * hd..][..group * hd];
                let mut h0 = 0;
                while h0 < group {
                    let nh = (group - h0).min(4);
                    let (q, sc) = (&q[h0 * hd..], &mut scores[h0 * stride..]);
                    match nh {
                        4 => self.$scores::<4>(seq, g, q, sc, stride, lo..visible),
                        3 => self.$scores::<3>(seq, g, q, sc, stride, lo..visible),
                        2 => self.$scores::<2>(seq, g, q, sc, stride, lo..visible),
                        _ => self.$scores::<1>(seq, g, q, sc, stride, lo..visible),
                    }
                    h0 += nh;
                }
                for hq in 0..group {
                    let sc = &mut scores[hq * stride + lo..hq * stride + visible];
                    soft_cap(sc, self.how.softcap);
                    let inv = $module::softmax_unnormalized(sc, self.sink(g * group + hq));
                    // Two keys per iteration into two accumulator sets: twice the FMA chains.
                    let mut acc = [[_mm512_setzero_ps(); C]; 2];
                    let value = |j: usize| {
                        let block = seq.block_table[j / BS] as usize;
                        let off = block * self.block_stride + (g * BS + j % BS) * hd;
                        self.vc[off..off + hd].as_ptr()
                    };
                    let mut j = lo;
                    while j < visible {
                        let pair = (visible - j).min(2);
                        for (u, acc) in acc.iter_mut().enumerate().take(pair) {
                            let v = value(j + u);
                            let w = _mm512_set1_ps(sc[j + u - lo]);
                            for (c, a) in acc.iter_mut().enumerate() {
                                *a = _mm512_fmadd_ps(w, E::$load(v.add(16 * c)), *a);
                            }
                        }
                        j += pair;
                    }
                    let inv = _mm512_set1_ps(inv);
                    let dst = out[(i * group + hq) * hd..][..hd].as_mut_ptr();
                    for (c, (a0, a1)) in acc[0].iter().zip(&acc[1]).enumerate() {
                        let sum = _mm512_add_ps(*a0, *a1);
                        _mm512_storeu_ps(dst.add(16 * c), _mm512_mul_ps(sum, inv));
                    }
                }
            }
            out
        }

        /// Scaled scores of `NH` query heads (`q`, `head_dim` apart) against keys `keys`, written
        /// to `scores` at the keys' positions (rows `stride` apart); lanes past the end are not
        /// written, lanes before the start in its block are (and are never read).
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $scores<const NH: usize>(
            &self,
            seq: &super::SequenceSlice,
            g: usize,
            q: &[f32],
            scores: &mut [f32],
            stride: usize,
            keys: std::ops::Range<usize>,
        ) {
            use $simd::*;
            const BS: usize = $module::BLOCK;
            let hd = self.head_dim;
            let visible = keys.end;
            assert!(q.len() >= NH * hd && scores.len() >= (NH - 1) * stride + visible);
            let (qp, sp) = (q.as_ptr(), scores.as_mut_ptr());
            let scale = _mm512_set1_ps(self.how.scale);
            for b in keys.start / BS..visible.div_ceil(BS) {
                let block = seq.block_table[b] as usize;
                let kp = self.kc[block * self.block_stride + g * hd * BS..][..hd * BS].as_ptr();
                // Two interleaved chains per head keep enough FMAs in flight.
                let mut even = [_mm512_setzero_ps(); NH];
                let mut odd = [_mm512_setzero_ps(); NH];
                for d in (0..hd).step_by(2) {
                    let k0 = E::$load(kp.add(d * BS));
                    let k1 = E::$load(kp.add((d + 1) * BS));
                    for h in 0..NH {
                        even[h] = _mm512_fmadd_ps(_mm512_set1_ps(*qp.add(h * hd + d)), k0, even[h]);
                        odd[h] =
                            _mm512_fmadd_ps(_mm512_set1_ps(*qp.add(h * hd + d + 1)), k1, odd[h]);
                    }
                }
                let n = (visible - b * BS).min(BS);
                let mask = if n == BS { u16::MAX } else { (1u16 << n) - 1 };
                for h in 0..NH {
                    let s = _mm512_mul_ps(_mm512_add_ps(even[h], odd[h]), scale);
                    _mm512_mask_storeu_ps(sp.add(h * stride + b * BS), mask, s);
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
impl<E: KvElem> HeadKernel<'_, E> {
    head_kernels!(
        run_avx512,
        block_scores_avx512,
        "avx512f",
        std::arch::x86_64,
        avx512,
        load16
    );
    head_kernels!(
        run_avx2,
        block_scores_avx2,
        "avx2,fma,f16c",
        crate::cpu_emu512,
        avx2,
        load16_avx2
    );
}

/// Softmax and `exp`, written once against the AVX-512 intrinsics' names and instantiated for
/// AVX-512 and for AVX2 (`cpu_emu512`, identical results).
macro_rules! softmax_kernels {
    ($features:literal) => {
        /// The block size the vectorized kernel serves: one 16-lane vector per key dimension.
        pub(super) const BLOCK: usize = 16;

        /// Replace `scores` by `exp(score - max)` and return `1 / Σ`, 16 lanes at a time (a
        /// scalar `expf` per key cost more than the dot products).
        ///
        /// # Safety
        /// The CPU has `$features`.
        #[inline]
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn softmax_unnormalized(scores: &mut [f32], sink: Option<f32>) -> f32 {
            let n = scores.len();
            let p = scores.as_mut_ptr();
            let mask = |i: usize| {
                let left = n - i;
                if left >= 16 {
                    u16::MAX
                } else {
                    (1u16 << left) - 1
                }
            };
            let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
            for i in (0..n).step_by(16) {
                max =
                    _mm512_mask_max_ps(max, mask(i), max, _mm512_maskz_loadu_ps(mask(i), p.add(i)));
            }
            let max = _mm512_reduce_max_ps(max);
            let max = sink.map_or(max, |s| max.max(s));
            let sink_term = sink.map_or(0.0, |s| (s - max).exp());
            let max = _mm512_set1_ps(max);
            let mut sum = _mm512_setzero_ps();
            for i in (0..n).step_by(16) {
                let m = mask(i);
                let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), max));
                _mm512_mask_storeu_ps(p.add(i), m, e);
                sum = _mm512_mask_add_ps(sum, m, sum, e);
            }
            1.0 / (_mm512_reduce_add_ps(sum) + sink_term)
        }

        /// `exp(x)` for `x <= 0` to about 1 ulp: `2^n · e^r` with `|r| <= ln2 / 2` and Cephes'
        /// polynomial for `e^r`; inputs below -87 give `e^-87` (negligible next to the maximum's 1).
        /// Shared with the other vectorized CPU ops (`cpu_ops::gelu_erf`).
        ///
        /// # Safety
        /// The CPU has `$features`.
        #[inline]
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn exp(x: __m512) -> __m512 {
            let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
            );
            // r = x - n·ln2, with ln2 split in two for precision.
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
            let mut y = _mm512_set1_ps(1.987_569_1e-4);
            for c in [
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                0.166_666_65,
                0.5,
            ] {
                y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
            }
            let y = _mm512_add_ps(
                _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r),
                _mm512_set1_ps(1.0),
            );
            _mm512_scalef_ps(y, n)
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;
    softmax_kernels!("avx512f");

    #[cfg(test)]
    mod tests {
        #[test]
        fn exp_matches_libm() {
            if !std::is_x86_feature_detected!("avx512f") {
                eprintln!("skipped: no AVX-512 on this CPU");
                return;
            }
            let xs: Vec<f32> = (0..4000).map(|i| -(i as f32) * 0.0219).collect();
            let mut ys = vec![0f32; xs.len()];
            for (x, y) in xs.chunks(16).zip(ys.chunks_mut(16)) {
                // SAFETY: the feature was detected; chunks are whole (4000 = 250 x 16).
                unsafe {
                    use std::arch::x86_64::*;
                    _mm512_storeu_ps(y.as_mut_ptr(), super::exp(_mm512_loadu_ps(x.as_ptr())));
                }
            }
            for (x, y) in xs.iter().zip(&ys) {
                let want = x.exp();
                if *x >= -87.0 {
                    assert!(
                        (y - want).abs() <= 2e-7 * want,
                        "exp({x}) = {y}, libm {want}"
                    );
                }
            }
        }

        #[test]
        fn softmax_sums_to_one_on_ragged_lengths() {
            if !std::is_x86_feature_detected!("avx512f") {
                eprintln!("skipped: no AVX-512 on this CPU");
                return;
            }
            for n in [1usize, 5, 16, 17, 40] {
                let mut s: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
                let want: Vec<f32> = {
                    let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    let e: Vec<f32> = s.iter().map(|x| (x - max).exp()).collect();
                    let sum: f32 = e.iter().sum();
                    e.iter().map(|x| x / sum).collect()
                };
                // SAFETY: the feature was detected.
                let inv = unsafe { super::softmax_unnormalized(&mut s, None) };
                for (a, b) in s.iter().zip(&want) {
                    assert!((a * inv - b).abs() <= 1e-6, "n={n}: {} vs {b}", a * inv);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use crate::cpu_emu512::*;
    softmax_kernels!("avx2,fma,f16c");
}

/// Store one step's new keys and values (`[tokens, num_kv_heads, head_dim]` each) at their
/// cache slots: values as rows, keys transposed within their block.
fn write_slots<E: KvElem>(
    kc: &mut [E],
    vc: &mut [E],
    kd: &[f32],
    vd: &[f32],
    offsets: &[(usize, usize)],
    (num_kv_heads, block_size, head_dim, block_stride): (usize, usize, usize, usize),
) {
    for (t, &(block, in_block)) in offsets.iter().enumerate() {
        for h in 0..num_kv_heads {
            let src = (t * num_kv_heads + h) * head_dim;
            let k_dst = block * block_stride + h * head_dim * block_size + in_block;
            for (d, &x) in kd[src..src + head_dim].iter().enumerate() {
                kc[k_dst + d * block_size] = E::from_f32(x);
            }
            let v_dst = block * block_stride + (h * block_size + in_block) * head_dim;
            for (o, &x) in vc[v_dst..v_dst + head_dim]
                .iter_mut()
                .zip(&vd[src..src + head_dim])
            {
                *o = E::from_f32(x);
            }
        }
    }
}

impl AttentionBackend for CpuAttention {
    fn begin_step(&mut self, md: &AttentionMetadata, num_heads: usize) -> Result<()> {
        self.step = None;
        md.validate(&self.shape, md.num_tokens())?;
        self.step = Some((md.clone(), num_heads));
        Ok(())
    }

    fn attend(
        &mut self,
        layer: usize,
        how: &LayerAttention,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        how.validate()?;
        let CacheShape {
            block_size,
            num_kv_heads,
            head_dim,
            ..
        } = self.shape;
        let Some((md, step_heads)) = self.step.as_ref() else {
            return Err(ModelError::InvalidBatch("attend before begin_step".into()));
        };
        let tokens = md.num_tokens();
        let num_heads = check_layer_inputs(&self.shape, layer, tokens, q, k, v)?;
        if num_heads != *step_heads {
            return Err(ModelError::InvalidBatch(format!(
                "{num_heads} query heads in a step begun for {step_heads}"
            )));
        }
        let group = num_heads / num_kv_heads;
        let (qd, kd, vd) = (f32_data(q)?, f32_data(k)?, f32_data(v)?);

        // 1. Write the new K/V at their slots (rounded to the cache's type).
        let offsets: Vec<(usize, usize)> = md
            .slot_mapping
            .iter()
            .map(|&s| (s as usize / block_size, s as usize % block_size))
            .collect();
        let block_stride = self.block_stride();
        with_layer!(&mut self.layers[layer], |kc, vc| {
            write_slots(
                kc,
                vc,
                &kd,
                &vd,
                &offsets,
                (num_kv_heads, block_size, head_dim, block_stride),
            )
        });

        // 2. Attention per (sequence, kv head); each task yields [query_len, group, head_dim].
        let tasks: Vec<(usize, usize)> = (0..md.sequences.len())
            .flat_map(|s| (0..num_kv_heads).map(move |g| (s, g)))
            .collect();
        if how.sinks.as_ref().is_some_and(|s| s.len() != num_heads) {
            return Err(ModelError::InvalidBatch(format!(
                "{} attention sinks for {num_heads} heads",
                how.sinks.as_ref().map_or(0, |s| s.len())
            )));
        }
        let how = how.clone();
        let results: Vec<Vec<f32>> = with_layer!(&self.layers[layer], |kc, vc| {
            let kernel = HeadKernel {
                kc,
                vc,
                qd: &qd,
                block_stride,
                block_size,
                head_dim,
                num_heads,
                group,
                how,
            };
            tasks
                .par_iter()
                .map(|&(s, g)| kernel.run(&md.sequences[s], g))
                .collect()
        });

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
        for layer in self.layers.iter_mut() {
            with_layer!(layer, |k, v| {
                for &(src, dst) in pairs {
                    let (src, dst) = (src as usize * stride, dst as usize * stride);
                    k.copy_within(src..src + stride, dst);
                    v.copy_within(src..src + stride, dst);
                }
            });
        }
        Ok(())
    }

    fn shape(&self) -> CacheShape {
        self.shape
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::SequenceSlice;

    /// A 16-bit cache computes exactly what the f32 cache computes on keys and values rounded
    /// to that type first (rounding happens once, on write; reads widen exactly), for the
    /// vectorized kernel (16-token blocks, head size 64) and the portable one.
    #[test]
    fn half_precision_caches_equal_an_f32_cache_of_rounded_values() {
        for (block_size, head_dim) in [(16usize, 64usize), (4, 24)] {
            let (kv_heads, heads, layers) = (2, 4, 1);
            let shape = CacheShape {
                num_layers: layers,
                num_blocks: 20,
                block_size,
                num_kv_heads: kv_heads,
                head_dim,
            };
            // Two sequences: a 37-token prefill and a 5-token one.
            let lens = [37usize, 5];
            let tokens: usize = lens.iter().sum();
            let per_seq = 10;
            let mut sequences = Vec::new();
            let mut slots = Vec::new();
            let mut start = 0;
            for (s, &len) in lens.iter().enumerate() {
                let table: Vec<u32> = (0..len.div_ceil(block_size))
                    .map(|b| (s * per_seq + b) as u32)
                    .collect();
                for p in 0..len {
                    slots.push(table[p / block_size] * block_size as u32 + (p % block_size) as u32);
                }
                sequences.push(SequenceSlice {
                    query_start: start,
                    query_len: len,
                    context_len: len,
                    block_table: table,
                });
                start += len;
            }
            let md = AttentionMetadata {
                sequences,
                slot_mapping: slots,
            };
            let values = |n: usize, seed: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| (((i * 7919 + seed) % 2003) as f32 / 1001.0 - 1.0) * 3.3)
                    .collect()
            };
            let q = values(tokens * heads * head_dim, 1);
            let k = values(tokens * kv_heads * head_dim, 2);
            let v = values(tokens * kv_heads * head_dim, 3);
            let tensor = |x: &[f32], h: usize| {
                Tensor::from_vec(x.to_vec(), (tokens, h, head_dim), &Device::Cpu).unwrap()
            };
            let run = |dtype: KvDtype, k: &[f32], v: &[f32]| -> Vec<f32> {
                let mut cache = CpuAttention::with_dtype(shape, dtype).unwrap();
                assert_eq!(cache.dtype(), dtype);
                cache.begin_step(&md, heads).unwrap();
                let out = cache
                    .attend(
                        0,
                        &LayerAttention::causal(head_dim),
                        &tensor(&q, heads),
                        &tensor(k, kv_heads),
                        &tensor(v, kv_heads),
                    )
                    .unwrap();
                out.flatten_all().unwrap().to_vec1().unwrap()
            };
            let exact = run(KvDtype::F32, &k, &v);
            for dtype in [KvDtype::Bf16, KvDtype::F16] {
                let round = |x: &[f32]| -> Vec<f32> {
                    x.iter()
                        .map(|&x| match dtype {
                            KvDtype::Bf16 => Bf16::from_f32(x).to_f32(),
                            _ => F16::from_f32(x).to_f32(),
                        })
                        .collect()
                };
                let half = run(dtype, &k, &v);
                assert_eq!(half, run(KvDtype::F32, &round(&k), &round(&v)), "{dtype:?}");
                let worst = half
                    .iter()
                    .zip(&exact)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 0.05, "{dtype:?}: {worst}");
                assert_ne!(half, exact, "{dtype:?} should round");
            }
        }
    }
}

/// The AVX2 instantiation of the vectorized kernel against the AVX-512 one, bit for bit, on
/// each cache element type (where this CPU has both).
#[cfg(all(test, target_arch = "x86_64"))]
mod isa_tests {
    use super::*;
    use crate::attention::SequenceSlice;

    fn compare<E: KvElem>() {
        let (bs, hd, kv_heads, group, blocks) = (16usize, 64usize, 2usize, 3usize, 6usize);
        let block_stride = kv_heads * hd * bs;
        let values = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 7919 + seed) % 2003) as f32 / 1001.0 - 1.0) * 2.1)
                .collect()
        };
        let kc: Vec<E> = values(blocks * block_stride, 1)
            .into_iter()
            .map(E::from_f32)
            .collect();
        let vc: Vec<E> = values(blocks * block_stride, 2)
            .into_iter()
            .map(E::from_f32)
            .collect();
        // A 7-token chunk at the end of a 70-token context, blocks out of order.
        let (context_len, query_len) = (70usize, 7usize);
        let num_heads = kv_heads * group;
        let qd = values(query_len * num_heads * hd, 3);
        let seq = SequenceSlice {
            query_start: 0,
            query_len,
            context_len,
            block_table: vec![4, 0, 5, 2, 1],
        };
        let mut how = LayerAttention::causal(hd);
        how.softcap = Some(20.0);
        let kernel = HeadKernel {
            kc: &kc,
            vc: &vc,
            qd: &qd,
            block_stride,
            block_size: bs,
            head_dim: hd,
            num_heads,
            group,
            how,
        };
        for g in 0..kv_heads {
            // SAFETY: both instruction sets are present; 16-token blocks, head_dim 4 x 16.
            let (a, b) = unsafe {
                (
                    kernel.run_avx512::<4>(&seq, g),
                    kernel.run_avx2::<4>(&seq, g),
                )
            };
            assert!(crate::cpu_isa::isa_test_support::same_bits(&a, &b));
            let portable = kernel.run_generic(&seq, g);
            assert!(a.iter().zip(&portable).all(|(a, b)| (a - b).abs() <= 1e-4));
        }
    }

    #[test]
    fn avx2_attention_equals_avx512() {
        if !crate::cpu_isa::isa_test_support::both_here(true) {
            return;
        }
        compare::<f32>();
        compare::<Bf16>();
        compare::<F16>();
    }
}
