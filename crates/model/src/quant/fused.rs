//! Small-batch matmul that dequantizes weight blocks in registers instead of into a scratch
//! panel. At decode batch sizes every weight is used by one or a few rows of `x`, so writing the
//! dequantized panel out and reading it back costs more than the arithmetic; here each block is
//! expanded straight into the FMA operands.
//!
//! The values and the accumulation order are exactly those of the panel path (dequantize with
//! a multiply then an add, as candle does; then 16-lane FMAs in `k` order and one fixed
//! horizontal sum), so results are bit-identical whichever path a batch size takes and a
//! sequence's logits do not depend on what else is in the batch.

use candle_core::quantized::GgmlDType;

/// Whether this CPU and type have a fused kernel.
pub(super) fn supported(dtype: GgmlDType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0)
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = dtype;
        false
    }
}

/// Rows `0..m` of `x` against weight rows `0..rows` of `w` (GGUF blocks,
/// `row_bytes` apart), writing columns `0..rows` of `out` (row stride `ldo`).
///
/// # Safety
/// [`supported`] must have returned true for `dtype`; `w` must hold `rows` rows of `k / 32`
/// blocks; `out` must be valid for `m` rows of stride `ldo` and written by no one else.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn block(
    dtype: GgmlDType,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    out: *mut f32,
    ldo: usize,
) {
    #[cfg(target_arch = "x86_64")]
    match dtype {
        GgmlDType::Q4_1 => avx512::block::<avx512::Q4_1>(x, m, k, w, row_bytes, rows, out, ldo),
        GgmlDType::Q8_0 => avx512::block::<avx512::Q8_0>(x, m, k, w, row_bytes, rows, out, ldo),
        _ => unreachable!("fused kernel for an unsupported type"),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dtype, x, m, k, w, row_bytes, rows, out, ldo);
        unreachable!("fused kernel on a CPU without one");
    }
}

/// Dequantize whole blocks into `out` with the same in-register expansion (the panel path for
/// bigger batches).
///
/// # Safety
/// [`supported`] must have returned true for `dtype`; `bytes` holds whole blocks and `out` is
/// 32 floats per block.
pub(super) unsafe fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match dtype {
        GgmlDType::Q4_1 => avx512::dequantize::<avx512::Q4_1>(bytes, out),
        GgmlDType::Q8_0 => avx512::dequantize::<avx512::Q8_0>(bytes, out),
        _ => unreachable!("fused dequantization for an unsupported type"),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dtype, bytes, out);
        unreachable!("fused dequantization on a CPU without it");
    }
}

/// The largest batch the fused path serves; bigger batches amortize the panel's dequantization
/// over more rows and take the panel path (measured: see `benches/RESULTS.md`).
pub(super) const MAX_ROWS: usize = 4;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// How one 32-weight GGUF block expands into two 16-lane vectors.
    pub(super) trait Block32 {
        const BYTES: usize;
        /// # Safety
        /// `p` points at a whole block; AVX-512F and F16C are available.
        unsafe fn expand(p: *const u8) -> (__m512, __m512);
    }

    /// `d: f16, m: f16, qs: [u8; 16]`; weight `j` is `(qs[j] & 15) * d + m`, weight `j + 16` is
    /// `(qs[j] >> 4) * d + m`.
    pub(super) struct Q4_1;
    /// `d: f16, qs: [i8; 32]`; weight `j` is `qs[j] * d`.
    pub(super) struct Q8_0;

    impl Block32 for Q4_1 {
        const BYTES: usize = 20;
        /// A block has only 16 distinct weights, `q * d + m` for `q` in 0..16: compute those
        /// once (the same multiply-then-add as candle), then pick each weight with a lane
        /// permute, which reads only the low 4 bits of each index — the nibble — so the bytes
        /// need no masking.
        #[inline(always)]
        unsafe fn expand(p: *const u8) -> (__m512, __m512) {
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
            let d = _mm512_broadcastss_ps(dm);
            let m = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
            let levels = _mm512_setr_ps(
                0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0,
                15.0,
            );
            let table = _mm512_add_ps(_mm512_mul_ps(levels, d), m);
            let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(4) as *const __m128i));
            (
                _mm512_permutexvar_ps(bytes, table),
                _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), table),
            )
        }
    }

    impl Block32 for Q8_0 {
        const BYTES: usize = 34;
        #[inline(always)]
        unsafe fn expand(p: *const u8) -> (__m512, __m512) {
            let half = std::ptr::read_unaligned(p as *const u16);
            let d = _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(half as i32)));
            let a = _mm_loadu_si128(p.add(2) as *const __m128i);
            let b = _mm_loadu_si128(p.add(18) as *const __m128i);
            (
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), d),
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), d),
            )
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn dequantize<B: Block32>(bytes: &[u8], out: &mut [f32]) {
        let blocks = (bytes.len() / B::BYTES).min(out.len() / 32);
        for i in 0..blocks {
            let (lo, hi) = B::expand(bytes.as_ptr().add(i * B::BYTES));
            _mm512_storeu_ps(out.as_mut_ptr().add(i * 32), lo);
            _mm512_storeu_ps(out.as_mut_ptr().add(i * 32 + 16), hi);
        }
    }

    /// One `MI x NJ` tile; accumulators stay in registers. (Indexed loops: several arrays are
    /// walked in step, which reads more plainly than zipped iterators here.)
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn tile<B: Block32, const MI: usize, const NJ: usize>(
        xp: *const f32,
        k: usize,
        wp: *const u8,
        row_bytes: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NJ]; MI];
        for blk in 0..k / 32 {
            let mut lo = [_mm512_setzero_ps(); NJ];
            let mut hi = [_mm512_setzero_ps(); NJ];
            for b in 0..NJ {
                (lo[b], hi[b]) = B::expand(wp.add(b * row_bytes + blk * B::BYTES));
            }
            for a in 0..MI {
                let x0 = _mm512_loadu_ps(xp.add(a * k + blk * 32));
                let x1 = _mm512_loadu_ps(xp.add(a * k + blk * 32 + 16));
                for b in 0..NJ {
                    acc[a][b] = _mm512_fmadd_ps(x0, lo[b], acc[a][b]);
                    acc[a][b] = _mm512_fmadd_ps(x1, hi[b], acc[a][b]);
                }
            }
        }
        for a in 0..MI {
            for b in 0..NJ {
                *out.add(a * ldo + b) = _mm512_reduce_add_ps(acc[a][b]);
            }
        }
    }

    /// Weight rows taken together per tile: enough accumulators to hide FMA latency at `m = 1`.
    const NJ: usize = 4;

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn block<B: Block32>(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[u8],
        row_bytes: usize,
        rows: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut j = 0;
        while j < rows {
            let nj = (rows - j).min(NJ);
            let ws = wp.add(j * row_bytes);
            let mut i = 0;
            while i < m {
                let mi = (m - i).min(4);
                let (xs, o) = (xp.add(i * k), out.add(i * ldo + j));
                macro_rules! go {
                    ($mi:literal) => {
                        match nj {
                            NJ => tile::<B, $mi, NJ>(xs, k, ws, row_bytes, o, ldo),
                            3 => tile::<B, $mi, 3>(xs, k, ws, row_bytes, o, ldo),
                            2 => tile::<B, $mi, 2>(xs, k, ws, row_bytes, o, ldo),
                            _ => tile::<B, $mi, 1>(xs, k, ws, row_bytes, o, ldo),
                        }
                    };
                }
                match mi {
                    1 => go!(1),
                    2 => go!(2),
                    3 => go!(3),
                    _ => go!(4),
                }
                i += mi;
            }
            j += nj;
        }
    }
}
