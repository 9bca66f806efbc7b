//! `y = x · Wᵀ` on the CPU for the linear layers, with `W` in its natural `[out, in]` row-major
//! layout. Generic GEMM libraries re-pack the whole weight matrix on every call, which for
//! decode batches (a few rows of `x` against hundreds of MB of weights) costs more than the
//! arithmetic. Here each weight row is streamed from memory once per call and dotted against
//! a block of `x` rows held in cache, with AVX-512 FMAs where the CPU has them.
//!
//! Every output element is one dot product accumulated in the same order whatever the batch
//! size, so a sequence's logits do not depend on what else is in the batch.

use rayon::prelude::*;

use crate::cpu_tiles::MAX_TILE;

/// Rows of `x` kept hot in cache while the weights stream past (bounds the working set).
const X_CHUNK: usize = 64;

/// Pointer wrapper so parallel tasks can write disjoint columns of the output.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: tasks write disjoint output elements (distinct column ranges).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[i][j] = Σ_k x[i][k] · w[j][k]`; `x` is `[m, k]`, `w` is `[n, k]`, `out` is `[m, n]`.
pub fn matmul_xwt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert_eq!(out.len(), m * n);
    // SAFETY: `out` holds `m * n` floats.
    unsafe { matmul_xwt_into(x, m, k, w, n, OutPtr(out.as_mut_ptr())) }
}

/// Run `fill` on a fresh buffer of `len` floats and return it, without zeroing it first
/// (zeroing every matmul output was ~3 % of a batched decode step).
///
/// # Safety
/// `fill` must write all `len` elements through the pointer before returning.
pub(crate) unsafe fn filled_buffer(len: usize, fill: impl FnOnce(OutPtr)) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(len);
    fill(OutPtr(out.as_mut_ptr()));
    // SAFETY: the caller guarantees every element was written.
    unsafe { out.set_len(len) };
    out
}

/// [`matmul_xwt`] writing through a raw pointer (every one of the `m * n` outputs is written).
///
/// # Safety
/// `out` must be valid for `m * n` writes and not accessed by anyone else meanwhile.
pub(crate) unsafe fn matmul_xwt_into(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out_ptr: OutPtr,
) {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    if m == 0 || n == 0 {
        return;
    }
    // Split the weight rows across threads in blocks big enough to amortize scheduling.
    let tasks = rayon::current_num_threads().max(1) * 4;
    let rows_per_task = n.div_ceil(tasks).next_multiple_of(MAX_TILE).max(MAX_TILE);
    (0..n.div_ceil(rows_per_task))
        .into_par_iter()
        .for_each(|t| {
            let n0 = t * rows_per_task;
            let n1 = (n0 + rows_per_task).min(n);
            let ptr = out_ptr;
            for m0 in (0..m).step_by(X_CHUNK) {
                let m1 = (m0 + X_CHUNK).min(m);
                // SAFETY: this task writes only columns n0..n1 of `out`.
                unsafe { block(x, k, w, n, m0, m1, n0, n1, ptr.0) };
            }
        });
}

/// All rows of `x` against the `rows` weight rows in `w`, writing columns `0..rows` of `out`
/// (row stride `ldo`).
///
/// # Safety
/// `out` must be valid for `m` rows of stride `ldo` and `rows` columns, written by no one else.
pub(crate) unsafe fn block_f32(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    rows: usize,
    out: *mut f32,
    ldo: usize,
) {
    for m0 in (0..m).step_by(X_CHUNK) {
        block(x, k, w, ldo, m0, (m0 + X_CHUNK).min(m), 0, rows, out);
    }
}

/// Compute rows `m0..m1` × columns `n0..n1` of the output.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    x: &[f32],
    k: usize,
    w: &[f32],
    n: usize,
    m0: usize,
    m1: usize,
    n0: usize,
    n1: usize,
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu_isa::avx512() {
            return avx512::block(x, k, w, n, m0, m1, n0, n1, out);
        }
        if crate::cpu_isa::avx2() {
            return avx2::block(x, k, w, n, m0, m1, n0, n1, out);
        }
    }
    portable_block(x, k, w, n, m0, m1, n0, n1, out)
}

#[allow(clippy::too_many_arguments)]
unsafe fn portable_block(
    x: &[f32],
    k: usize,
    w: &[f32],
    n: usize,
    m0: usize,
    m1: usize,
    n0: usize,
    n1: usize,
    out: *mut f32,
) {
    for j in n0..n1 {
        let wr = &w[j * k..(j + 1) * k];
        for i in m0..m1 {
            let xr = &x[i * k..(i + 1) * k];
            *out.add(i * n + j) = dot(xr, wr);
        }
    }
}

/// A dot product with 16 independent accumulators (vectorizes on any SIMD width), summed in a
/// fixed order.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = a.len() / 16;
    for c in 0..chunks {
        for l in 0..16 {
            acc[l] += a[c * 16 + l] * b[c * 16 + l];
        }
    }
    let mut s = 0f32;
    for v in acc {
        s += v;
    }
    for i in chunks * 16..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// The tiled kernels, written once against the AVX-512 intrinsics' names and instantiated for
/// AVX-512 and for AVX2 (whose `cpu_emu512` versions compute the same lanes in the same order:
/// the two paths give identical results).
macro_rules! f32_kernels {
    ($features:literal, $tile:expr) => {
        use crate::cpu_tiles::{run_tiles, store_tile, Tiles};

        /// Load 16 floats, or the first `rem` of them with the rest zero.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn load(p: *const f32, rem: usize) -> __m512 {
            if rem >= 16 {
                _mm512_loadu_ps(p)
            } else {
                _mm512_maskz_loadu_ps(((1u32 << rem) - 1) as u16, p)
            }
        }

        /// One `MI x NJ` tile: rows `x[0..MI]` (stride `k`) against weight rows `w[0..NJ]`.
        /// Const sizes let the accumulators live in registers.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn tile<const MI: usize, const NJ: usize>(
            xp: *const f32,
            wp: *const f32,
            k: usize,
            out: *mut f32,
            ldo: usize,
        ) {
            let mut acc = [[_mm512_setzero_ps(); NJ]; MI];
            let full = k / 16 * 16;
            let mut kk = 0;
            while kk < full {
                let mut wv = [_mm512_setzero_ps(); NJ];
                for b in 0..NJ {
                    wv[b] = _mm512_loadu_ps(wp.add(b * k + kk));
                }
                for a in 0..MI {
                    let xv = _mm512_loadu_ps(xp.add(a * k + kk));
                    for b in 0..NJ {
                        acc[a][b] = _mm512_fmadd_ps(xv, wv[b], acc[a][b]);
                    }
                }
                kk += 16;
            }
            if kk < k {
                let rem = k - kk;
                let mut wv = [_mm512_setzero_ps(); NJ];
                for b in 0..NJ {
                    wv[b] = load(wp.add(b * k + kk), rem);
                }
                for a in 0..MI {
                    let xv = load(xp.add(a * k + kk), rem);
                    for b in 0..NJ {
                        acc[a][b] = _mm512_fmadd_ps(xv, wv[b], acc[a][b]);
                    }
                }
            }
            store_tile(&acc, out, ldo);
        }

        /// A tile's operands: rows of `x` and of the weights (`k` apart), outputs (`ldo` apart).
        struct F32Tiles {
            x: *const f32,
            w: *const f32,
            k: usize,
            out: *mut f32,
            ldo: usize,
        }

        impl Tiles for F32Tiles {
            const TILE: (usize, usize) = $tile;
            #[inline(always)]
            unsafe fn tile<const MI: usize, const NJ: usize>(&self, i: usize, j: usize) {
                let (x, w) = (self.x.add(i * self.k), self.w.add(j * self.k));
                tile::<MI, NJ>(x, w, self.k, self.out.add(i * self.ldo + j), self.ldo)
            }
        }

        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $features)]
        pub(super) unsafe fn block(
            x: &[f32],
            k: usize,
            w: &[f32],
            n: usize,
            m0: usize,
            m1: usize,
            n0: usize,
            n1: usize,
            out: *mut f32,
        ) {
            let tiles = F32Tiles {
                x: x.as_ptr().add(m0 * k),
                w: w.as_ptr().add(n0 * k),
                k,
                out: out.add(m0 * n + n0),
                ldo: n,
            };
            run_tiles(&tiles, m1 - m0, n1 - n0);
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    f32_kernels!("avx512f", (4, 4));
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::cpu_emu512::*;
    // 2 x 2 tiles: eight accumulator registers of AVX2's 16 (4 x 4 spill; measured 1.45x
    // slower at m = 64, and 4 x 1 or 1 x 4 1.15-1.5x slower).
    f32_kernels!("avx2,fma,f16c", (2, 2));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn matches_reference_on_awkward_shapes() {
        let mut seed = 1u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for &(m, k, n) in &[
            (1, 576, 960),
            (3, 17, 5),
            (7, 64, 9),
            (33, 100, 130),
            (65, 576, 67),
            (130, 31, 4),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let mut out = vec![f32::NAN; m * n];
            matmul_xwt(&x, m, k, &w, n, &mut out);
            let want = reference(&x, m, k, &w, n);
            for (a, b) in out.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{m}x{k}x{n}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let k = 300;
        let n = 37;
        let x: Vec<f32> = (0..20 * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let mut full = vec![0f32; 20 * n];
        matmul_xwt(&x, 20, k, &w, n, &mut full);
        for i in 0..20 {
            let mut one = vec![0f32; n];
            matmul_xwt(&x[i * k..(i + 1) * k], 1, k, &w, n, &mut one);
            assert_eq!(&full[i * n..(i + 1) * n], &one[..], "row {i}");
        }
    }
}

/// `x @ wᵀ` for a 2-D `x` and a `[out, in]` weight: the kernel above for f32 CPU tensors,
/// candle's matmul otherwise (other dtypes, CUDA).
pub fn linear(
    x: &candle_core::Tensor,
    w: &candle_core::Tensor,
) -> crate::error::Result<candle_core::Tensor> {
    linear_impl(x, w, None)
}

/// `x @ wᵀ + b` (encoder layers): the bias is added to the kernel's output buffer in the same
/// parallel pass over its rows, instead of a separate broadcast over a new tensor.
pub fn linear_bias(
    x: &candle_core::Tensor,
    w: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> crate::error::Result<candle_core::Tensor> {
    let fast = b.device().is_cpu() && b.dtype() == candle_core::DType::F32 && b.rank() == 1;
    if !fast {
        return Ok(linear(x, w)?.broadcast_add(b)?);
    }
    let bias = b.to_vec1::<f32>()?;
    linear_impl(x, w, Some(&bias))
}

/// `bias` added to every row of `out` (rows of `bias.len()` values), rows in parallel.
pub(crate) fn add_bias(out: &mut [f32], bias: &[f32]) {
    out.par_chunks_mut(bias.len().max(1)).for_each(|row| {
        for (o, &b) in row.iter_mut().zip(bias) {
            *o += b;
        }
    });
}

fn linear_impl(
    x: &candle_core::Tensor,
    w: &candle_core::Tensor,
    bias: Option<&[f32]>,
) -> crate::error::Result<candle_core::Tensor> {
    use candle_core::{DType, Storage, Tensor};
    let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32;
    if !cpu_f32 || !w.is_contiguous() {
        let y = x.matmul(&w.t()?)?;
        return match bias {
            Some(b) => Ok(y.broadcast_add(&Tensor::new(b, x.device())?)?),
            None => Ok(y),
        };
    }
    let x = x.contiguous()?;
    let (m, k) = x.dims2()?;
    let (n, wk) = w.dims2()?;
    if k != wk {
        return Err(crate::error::ModelError::InvalidBatch(format!(
            "matmul shapes [{m}, {k}] x [{n}, {wk}]^T do not match"
        )));
    }
    let out = {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ws)) = (&*xs, &*ws) else {
            return Ok(x.matmul(&w.t()?)?);
        };
        let xs = &xs.as_slice::<f32>()?[xl.start_offset()..xl.start_offset() + m * k];
        let ws = &ws.as_slice::<f32>()?[wl.start_offset()..wl.start_offset() + n * k];
        if bias.is_some_and(|b| b.len() != n) {
            return Err(crate::error::ModelError::InvalidBatch(format!(
                "a bias of {} for {n} outputs",
                bias.map_or(0, <[f32]>::len)
            )));
        }
        // SAFETY: the kernel writes all m * n outputs (its shapes are asserted first).
        let mut out = unsafe { filled_buffer(m * n, |out| matmul_xwt_into(xs, m, k, ws, n, out)) };
        if let Some(b) = bias {
            add_bias(&mut out, b);
        }
        out
    };
    Ok(Tensor::from_vec(out, (m, n), x.device())?)
}

/// The AVX2 instantiation against the AVX-512 one, bit for bit (where this CPU has both).
#[cfg(all(test, target_arch = "x86_64"))]
mod isa_tests {
    use crate::cpu_isa::isa_test_support::{both_here, same_bits, values};

    #[test]
    fn avx2_products_equal_avx512() {
        if !both_here(true) {
            return;
        }
        for &(m, k, n) in &[(1, 576, 37), (5, 100, 9), (9, 33, 13)] {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            let (mut a, mut b) = (vec![f32::NAN; m * n], vec![0f32; m * n]);
            // SAFETY: both instruction sets are present; outputs are m x n.
            unsafe {
                super::avx512::block(&x, k, &w, n, 0, m, 0, n, a.as_mut_ptr());
                super::avx2::block(&x, k, &w, n, 0, m, 0, n, b.as_mut_ptr());
            }
            assert!(same_bits(&a, &b), "{m}x{k}x{n}");
        }
    }
}
