//! bf16 dot products for the CPU linear layers (`--dtype bfloat16`). With AVX-512 BF16,
//! `vdpbf16ps` multiplies 32 bf16 pairs per instruction into 16 f32 accumulators, twice the
//! work of an f32 FMA, which is what bounds batched decode and prefill here; AVX2 emulates it
//! with the same results, more slowly (two FMAs per pair). Activations and
//! weights are rounded to bf16 (round to nearest even) at the matmul's input; products and sums
//! stay f32, and everything outside the linear layers (norms, rope, attention, residuals) stays
//! f32 — vLLM's CPU backend makes the same split.
//!
//! Each output is one dot product whose 32-element chunks are taken in `k` order by the same
//! instruction, whatever the batch size and whichever path (panel or fused) serves it, so a
//! sequence's logits do not depend on what else is in the batch.

/// How the CPU linear layers multiply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuArithmetic {
    /// f32 products (exact against an f32 reference; `--dtype float32`).
    #[default]
    F32,
    /// bf16 inputs, f32 accumulation (`--dtype bfloat16`).
    Bf16,
    /// Activations quantized to int8 per 32 values, integer dot products with GGUF block
    /// weights (`quant/int8.rs`); other weights keep f32.
    Int8,
}

/// Whether the bf16 kernels can run: natively ([`native`]) or emulated with AVX2, which gives
/// the same results more slowly (each bf16 widened to f32 for an FMA).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        native() || crate::cpu_isa::avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has the bf16 dot-product instructions (AVX-512 BF16) and may use them.
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu_isa::avx512() && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether a matrix `k` wide can take the bf16 kernels (whole 32-element chunks).
pub fn fits(k: usize) -> bool {
    k > 0 && k.is_multiple_of(32)
}

/// Round to bf16 as `vcvtne2ps2bf16` does (nearest, ties to even; a NaN stays a quiet NaN).
/// The scalar reference for tests and the portable fallback.
pub fn round_to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// The f32 a bf16 stands for (exact).
pub fn bf16_to_f32(v: u16) -> f32 {
    f32::from_bits((v as u32) << 16)
}

/// `src` rounded to bf16 into `dst` (same length, a multiple of 32).
///
/// # Safety
/// [`supported`] must have returned true.
pub(crate) unsafe fn convert(src: &[f32], dst: &mut [u16]) {
    debug_assert_eq!(src.len(), dst.len());
    debug_assert!(src.len().is_multiple_of(32));
    #[cfg(target_arch = "x86_64")]
    if native() {
        avx512::convert(src, dst)
    } else {
        avx2::convert(src, dst)
    }
    #[cfg(not(target_arch = "x86_64"))]
    for (d, s) in dst.iter_mut().zip(src) {
        *d = round_to_bf16(*s);
    }
}

/// `x` (`[m, k]` f32: activations, or weights at load) rounded to bf16, as the kernels take it.
///
/// # Safety
/// [`supported`] must have returned true; `k` must [`fit`](fits).
pub(crate) unsafe fn activations(x: &[f32]) -> Vec<u16> {
    let mut out = vec![0u16; x.len()];
    convert(x, &mut out);
    out
}

/// All `m` rows of `x` (bf16, `[m, k]`) against `rows` bf16 weight rows `w` (`[rows, k]`),
/// writing columns `0..rows` of `out` (row stride `ldo`).
///
/// # Safety
/// [`supported`] must have returned true; `k` must [`fit`](fits); `x` holds `m * k` and `w`
/// `rows * k` values; `out` is valid for `m` rows of stride `ldo` and written by no one else.
pub(crate) unsafe fn block(
    x: &[u16],
    m: usize,
    k: usize,
    w: &[u16],
    rows: usize,
    out: *mut f32,
    ldo: usize,
) {
    debug_assert!(x.len() >= m * k && w.len() >= rows * k);
    #[cfg(target_arch = "x86_64")]
    if native() {
        avx512::block(x.as_ptr(), m, k, w.as_ptr(), rows, out, ldo)
    } else {
        avx2::block(x.as_ptr(), m, k, w.as_ptr(), rows, out, ldo)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, m, k, w, rows, out, ldo);
        unreachable!("bf16 kernels on a CPU without them");
    }
}

/// A dense `[rows, cols]` weight matrix held in bf16 (an HF checkpoint's own bf16 weights, or
/// f32/f16 ones rounded once at load), for `--dtype bfloat16` on the CPU.
pub struct Bf16Matrix {
    rows: usize,
    cols: usize,
    data: Vec<u16>,
}

impl Bf16Matrix {
    /// Round `values` (`[rows, cols]`, row-major) to bf16; `None` where the kernels cannot
    /// serve this matrix (no bf16 kernels below AVX2, or `cols` not whole 32-element chunks).
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Option<Self> {
        if !supported() || !fits(cols) || values.len() != rows * cols {
            return None;
        }
        // SAFETY: support was checked; `cols` (so the length) is a multiple of 32.
        let data = unsafe { activations(values) };
        Some(Self { rows, cols, data })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The weights as f32 (exact).
    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&v| bf16_to_f32(v)).collect()
    }

    /// Stack matrices of one width along the rows.
    pub fn concat_rows(parts: &[&Bf16Matrix]) -> Option<Self> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        Some(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
        })
    }

    /// `x · selfᵀ` for `x` `[m, cols]` in f32, as a new `[m, rows]` buffer.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        assert_eq!(x.len(), m * k);
        // SAFETY: construction checked support and width.
        let xb = unsafe { activations(x) };
        // SAFETY: the tasks below write all m * n outputs, each its own columns.
        unsafe {
            crate::cpu_matmul::filled_buffer(m * n, |out| {
                crate::cpu_tiles::par_row_ranges(n, 4, |r0, rows| {
                    let w = &self.data[r0 * k..(r0 + rows) * k];
                    let ptr = out;
                    // Shapes as checked; this task writes columns r0..r0 + rows.
                    block(&xb, m, k, w, rows, ptr.0.add(r0), n);
                });
            })
        }
    }
}

/// The kernels, written once against the AVX-512 intrinsics' names and instantiated for
/// AVX-512 BF16 and for AVX2 (`cpu_emu512` emulates `vdpbf16ps` and the rounding lane for lane:
/// identical results, at the cost of widening each bf16 to f32 first).
macro_rules! bf16_kernels {
    ($features:literal, $tile:expr) => {
        use crate::cpu_tiles::{run_tiles, store_tile, Tiles};

        /// 32 f32 (two vectors, in order) rounded to 32 bf16 in order.
        #[inline(always)]
        pub(crate) unsafe fn pack(lo: __m512, hi: __m512) -> __m512bh {
            _mm512_cvtne2ps_pbh(hi, lo)
        }

        /// 32 bf16 from memory.
        #[inline(always)]
        pub(crate) unsafe fn load(p: *const u16) -> __m512bh {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const __m512i))
        }

        /// `acc` plus the products of 32 bf16 pairs, pairwise into 16 lanes.
        #[inline(always)]
        pub(crate) unsafe fn dot(acc: __m512, a: __m512bh, b: __m512bh) -> __m512 {
            _mm512_dpbf16_ps(acc, a, b)
        }

        #[target_feature(enable = $features)]
        pub(super) unsafe fn convert(src: &[f32], dst: &mut [u16]) {
            let n = src.len().min(dst.len()) / 32;
            for i in 0..n {
                let lo = _mm512_loadu_ps(src.as_ptr().add(32 * i));
                let hi = _mm512_loadu_ps(src.as_ptr().add(32 * i + 16));
                _mm512_storeu_si512(
                    dst.as_mut_ptr().add(32 * i) as *mut __m512i,
                    std::mem::transmute::<__m512bh, __m512i>(pack(lo, hi)),
                );
            }
        }

        /// One `MI x NJ` tile, accumulators in registers.
        #[allow(clippy::needless_range_loop)]
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn tile<const MI: usize, const NJ: usize>(
            xp: *const u16,
            k: usize,
            wp: *const u16,
            out: *mut f32,
            ldo: usize,
        ) {
            let mut acc = [[_mm512_setzero_ps(); NJ]; MI];
            for kk in (0..k).step_by(32) {
                let mut wv = [load(wp.add(kk)); NJ];
                for b in 1..NJ {
                    wv[b] = load(wp.add(b * k + kk));
                }
                for a in 0..MI {
                    let xv = load(xp.add(a * k + kk));
                    for b in 0..NJ {
                        acc[a][b] = dot(acc[a][b], xv, wv[b]);
                    }
                }
            }
            store_tile(&acc, out, ldo);
        }

        /// A tile's operands: bf16 rows of `x` and of the weights (`k` apart), outputs (`ldo`
        /// apart).
        struct Bf16Tiles {
            x: *const u16,
            k: usize,
            w: *const u16,
            out: *mut f32,
            ldo: usize,
        }

        impl Tiles for Bf16Tiles {
            const TILE: (usize, usize) = $tile;
            #[inline(always)]
            unsafe fn tile<const MI: usize, const NJ: usize>(&self, i: usize, j: usize) {
                let (x, w) = (self.x.add(i * self.k), self.w.add(j * self.k));
                tile::<MI, NJ>(x, self.k, w, self.out.add(i * self.ldo + j), self.ldo)
            }
        }

        #[target_feature(enable = $features)]
        pub(super) unsafe fn block(
            x: *const u16,
            m: usize,
            k: usize,
            w: *const u16,
            rows: usize,
            out: *mut f32,
            ldo: usize,
        ) {
            run_tiles(&Bf16Tiles { x, k, w, out, ldo }, m, rows);
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;
    bf16_kernels!("avx512f,avx512bf16", (4, 4));
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use crate::cpu_emu512::*;
    bf16_kernels!("avx2,fma,f16c", (4, 1));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dot product `vdpbf16ps` computes, in scalar: per lane, the pair's two products added
    /// to the lane in order; lanes summed at the end as `_mm512_reduce_add_ps` does (a tree).
    fn reference_dot(x: &[u16], w: &[u16]) -> f32 {
        let mut lanes = [0f32; 16];
        for (xc, wc) in x.chunks(32).zip(w.chunks(32)) {
            for l in 0..16 {
                let p0 = bf16_to_f32(xc[2 * l]) as f64 * bf16_to_f32(wc[2 * l]) as f64;
                let p1 = bf16_to_f32(xc[2 * l + 1]) as f64 * bf16_to_f32(wc[2 * l + 1]) as f64;
                lanes[l] = (lanes[l] as f64 + p0 + p1) as f32;
            }
        }
        lanes.iter().map(|&v| v as f64).sum::<f64>() as f32
    }

    #[test]
    fn rounding_matches_the_instruction() {
        if !supported() {
            return;
        }
        let mut values: Vec<f32> = (0..4064)
            .map(|i| {
                let t = i as f32 * 0.618_034;
                (t.sin() * 1000.0).powi(1 + i % 3) / (1.0 + (i % 17) as f32)
            })
            .collect();
        // Ties (to even, both ways), signed zeros, the largest finite values, infinities.
        values.extend([
            1.003_906_3,
            1.011_718_8,
            -1.003_906_3,
            0.0,
            -0.0,
            1.0,
            -1.0,
            2.5,
        ]);
        values.extend([
            3.0e38,
            -3.0e38,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            7.0,
        ]);
        values.resize(4096, 0.5);
        let n = values.len() / 32 * 32;
        let mut ours = vec![0u16; n];
        // SAFETY: support was checked; lengths are equal multiples of 32.
        unsafe { convert(&values[..n], &mut ours) };
        for (v, o) in values.iter().zip(&ours) {
            assert_eq!(*o, round_to_bf16(*v), "{v}");
        }
    }

    /// Against the scalar model of the instruction: products of bf16 values are exact in f64,
    /// so the kernel may differ only by the f32 roundings of its accumulation.
    #[test]
    fn kernel_matches_a_scalar_reference() {
        if !supported() {
            return;
        }
        let (m, k, n) = (7, 96, 11);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 53) % 89) as f32 / 40.0 - 1.1)
            .collect();
        // SAFETY: support was checked; 96 is whole chunks.
        let (xb, wb) = unsafe { (activations(&x), activations(&w)) };
        let mut out = vec![f32::NAN; m * n];
        // SAFETY: shapes as documented; `out` is m x n.
        unsafe { block(&xb, m, k, &wb, n, out.as_mut_ptr(), n) };
        for i in 0..m {
            for j in 0..n {
                let want = reference_dot(&xb[i * k..(i + 1) * k], &wb[j * k..(j + 1) * k]);
                let got = out[i * n + j];
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "({i}, {j}): {got} vs {want}"
                );
            }
        }
        // And a batch of one gives each row exactly what the batch gave it.
        for i in 0..m {
            let mut one = vec![f32::NAN; n];
            // SAFETY: as above, one row.
            unsafe { block(&xb[i * k..(i + 1) * k], 1, k, &wb, n, one.as_mut_ptr(), n) };
            assert_eq!(&one[..], &out[i * n..(i + 1) * n], "row {i}");
        }
    }
}

/// The AVX2 emulation against AVX-512 BF16, bit for bit (where this CPU has both).
#[cfg(all(test, target_arch = "x86_64"))]
mod isa_tests {
    use crate::cpu_isa::isa_test_support::{both_here, same_bits, values};

    #[test]
    fn avx2_rounding_and_products_equal_avx512_bf16() {
        if !both_here(super::native()) {
            return;
        }
        let (m, k, n) = (6, 128, 11);
        let x = values(m * k, 1);
        let w = values(n * k, 2);
        let (mut xa, mut xb) = (vec![0u16; m * k], vec![1u16; m * k]);
        let (mut wa, mut wb) = (vec![0u16; n * k], vec![1u16; n * k]);
        let (mut a, mut b) = (vec![f32::NAN; m * n], vec![0f32; m * n]);
        // SAFETY: both instruction sets are present; lengths are whole chunks; outputs m x n.
        unsafe {
            super::avx512::convert(&x, &mut xa);
            super::avx2::convert(&x, &mut xb);
            super::avx512::convert(&w, &mut wa);
            super::avx2::convert(&w, &mut wb);
            super::avx512::block(xa.as_ptr(), m, k, wa.as_ptr(), n, a.as_mut_ptr(), n);
            super::avx2::block(xb.as_ptr(), m, k, wb.as_ptr(), n, b.as_mut_ptr(), n);
        }
        assert_eq!(xa, xb);
        assert_eq!(wa, wb);
        assert!(same_bits(&a, &b));
    }
}
