//! Integer dot products for GGUF block weights (`--cpu-arithmetic int8`): activations are
//! quantized per 32 values to int8 with one f32 scale (as llama.cpp's Q8_0), weight blocks are
//! expanded to their small unsigned integers, and `vpdpbusd` (AVX-512 VNNI) multiplies 64
//! weight/activation pairs per instruction into 16 exact int32 lanes; block scales and minimums
//! are applied in f32 per 64 weights. Expanding a block to bytes is a few integer operations,
//! against a conversion and a multiply per 16 weights to expand it to f32 — which is what bounds
//! single-stream decode on quantized models here.
//!
//! Each row of `x` is quantized by itself and every output accumulates its 64-weight pieces in
//! `k` order, so results do not depend on the batch. Types without an expansion here (Q2_K,
//! Q3_K) and widths that are not whole 64-weight pieces keep the f32 kernels.

use candle_core::quantized::GgmlDType;

/// Run `$body` with `$P` bound to the expansion type of `$dtype` (a type [`supported`] admits)
/// in `$module` (`avx512` or `avx2`).
#[cfg(target_arch = "x86_64")]
macro_rules! with_pair_type {
    ($module:ident, $dtype:expr, $P:ident => $body:expr) => {
        dispatch_block_type!($dtype, $module, $P => $body;
            Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4K, Q5K, Q6K)
    };
}

/// Whether this CPU and type have the integer kernels for a matrix `k` wide.
pub(super) fn supported(dtype: GgmlDType, k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(
            dtype,
            GgmlDType::Q4_0
                | GgmlDType::Q4_1
                | GgmlDType::Q5_0
                | GgmlDType::Q5_1
                | GgmlDType::Q8_0
                | GgmlDType::Q4K
                | GgmlDType::Q5K
                | GgmlDType::Q6K
        ) && k > 0
            && k.is_multiple_of(64)
            && available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dtype, k);
        false
    }
}

/// Whether int8 arithmetic is available: natively ([`native`]) or through AVX2's
/// `vpmaddubsw` (exact: weights below 64 offset, Q8_0 as signed bytes with the sign moved
/// onto the activations, so no pair of products passes 32767).
pub fn available() -> bool {
    native() || crate::cpu_isa::avx2()
}

/// AVX-512 F/BW/VL/VNNI and F16C: `vpdpbusd` runs natively.
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu_isa::avx512()
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` (`[m, k]`) quantized for one weight type: per 32 values an int8 scale `d` and
/// `q = round(x / d)`; per 4 values (one int32 lane of the dot product) the lane's scale, the
/// weight offset's correction `-offset * Σq`, and `d * Σq` (for types with a minimum).
pub(super) struct QuantizedActivations {
    k: usize,
    q: Vec<i8>,
    lane_scale: Vec<f32>,
    lane_init: Vec<i32>,
    lane_sum: Vec<f32>,
}

impl QuantizedActivations {
    /// Quantize `x` for weights whose integers carry `offset` (value = scale · (q − offset)).
    pub(super) fn new(x: &[f32], k: usize, offset: i32) -> Self {
        debug_assert!(k.is_multiple_of(64) && x.len().is_multiple_of(k));
        let lanes = x.len() / 4;
        let mut out = Self {
            k,
            q: vec![0; x.len()],
            lane_scale: vec![0.0; lanes],
            lane_init: vec![0; lanes],
            lane_sum: vec![0.0; lanes],
        };
        for (c, chunk) in x.chunks_exact(32).enumerate() {
            let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let q = &mut out.q[c * 32..(c + 1) * 32];
            for (q, &v) in q.iter_mut().zip(chunk) {
                *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
            }
            for l in 0..8 {
                let sum: i32 = q[4 * l..4 * l + 4].iter().map(|&v| v as i32).sum();
                let lane = c * 8 + l;
                out.lane_scale[lane] = d;
                out.lane_init[lane] = -offset * sum;
                out.lane_sum[lane] = d * sum as f32;
            }
        }
        out
    }
}

/// Rows `0..m` of `x` against weight rows `0..rows` of `w` (blocks, `row_bytes` apart),
/// writing columns `0..rows` of `out` (row stride `ldo`).
///
/// # Safety
/// [`supported`] must have returned true for `dtype` and `k`; `x` was quantized with
/// [`offset`]`(dtype)` from `m` rows of `k`; `w` holds `rows` rows; `out` is valid for `m` rows
/// of stride `ldo` and written by no one else.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn block(
    dtype: GgmlDType,
    x: &QuantizedActivations,
    m: usize,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    out: *mut f32,
    ldo: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if native() {
        with_pair_type!(avx512, dtype, P => avx512::run::<P>(x, m, w, row_bytes, rows, out, ldo))
    } else {
        with_pair_type!(avx2, dtype, P => avx2::run::<P>(x, m, w, row_bytes, rows, out, ldo))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dtype, x, m, w, row_bytes, rows, out, ldo);
        unreachable!("integer kernels on a CPU without them");
    }
}

/// The integer offset of `dtype`'s expanded weights (value = scale · (q − offset) [+ min]), for
/// a type [`supported`] admits.
pub(super) fn offset(dtype: GgmlDType) -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        offset_in(native(), dtype)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = dtype;
        0
    }
}

/// [`offset`] for the AVX-512 (`native`) or the AVX2 kernels (they differ for Q8_0).
#[cfg(target_arch = "x86_64")]
fn offset_in(native: bool, dtype: GgmlDType) -> i32 {
    if native {
        use avx512::Pair;
        with_pair_type!(avx512, dtype, P => P::OFFSET)
    } else {
        use avx2::Pair;
        with_pair_type!(avx2, dtype, P => P::OFFSET)
    }
}

/// The kernels, written once against the AVX-512 intrinsics' names and instantiated for
/// AVX-512 VNNI and for AVX2 (`cpu_emu512`: `vpdpbusd` as `vpmaddubsw` + `vpmaddwd`, exact for
/// the unsigned weights below 128 every type but Q8_0 has; identical results).
macro_rules! int8_kernels {
    ($features:literal, $tile:expr, $q8_signed:literal) => {
        use std::marker::PhantomData;

        use super::QuantizedActivations;
        use crate::cpu_tiles::{run_tiles, store_tile, Tiles};

        /// 64 weights (two 32-weight chunks, in order) of a row as unsigned bytes, with the f32
        /// scale (and minimum) of each int32 lane: lanes 0..8 cover the first chunk, 8..16 the
        /// second; types with one scale per 16 weights give each 4-lane group its own.
        pub(super) trait Pair {
            const BYTES: usize;
            /// Bytes of a row one pair covers (for prefetching).
            const PAIR_BYTES: usize;
            /// Whether weights carry a minimum (value = scale · q + min).
            const HAS_MIN: bool;
            /// The offset of the expanded integers (value = scale · (q − offset)).
            const OFFSET: i32 = 0;
            /// Whether the expanded integers are signed bytes (multiplied through
            /// `dpbusd_signed`) rather than unsigned ones.
            const SIGNED: bool = false;
            /// # Safety
            /// `row` points at a weight row; pair `p` lies within it; the CPU has the features.
            unsafe fn expand(row: *const u8, p: usize) -> (__m512i, __m512, __m512);
        }

        #[inline(always)]
        unsafe fn f16_at(p: *const u8) -> f32 {
            let h = std::ptr::read_unaligned(p as *const u16);
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
        }

        /// 16 lanes: `a` in lanes 0..8, `b` in 8..16.
        #[inline(always)]
        unsafe fn halves(a: f32, b: f32) -> __m512 {
            _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(a), _mm512_set1_ps(b))
        }

        /// 16 lanes, each of `v`'s four values in four consecutive lanes.
        #[inline(always)]
        unsafe fn quarters(v: __m128) -> __m512 {
            let idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
            _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v))
        }

        /// The nibbles of two 16-byte runs `a` and `b` in weight order: a's low nibbles, a's high,
        /// b's low, b's high (the 32-weight legacy blocks' layout, two blocks).
        #[inline(always)]
        unsafe fn legacy_nibbles(a: *const u8, b: *const u8) -> __m512i {
            let ab = _mm256_set_m128i(
                _mm_loadu_si128(b as *const __m128i),
                _mm_loadu_si128(a as *const __m128i),
            );
            let mask = _mm256_set1_epi8(0x0f);
            let lo = _mm256_and_si256(ab, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(ab), mask);
            // [a_lo, b_lo, a_hi, b_hi] -> [a_lo, a_hi, b_lo, b_hi]
            let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            _mm512_shuffle_i64x2::<0b11_01_10_00>(z, z)
        }

        /// The two 32-weight blocks pair `p` of a legacy-type row spans.
        #[inline(always)]
        unsafe fn legacy_pair<P: Pair>(row: *const u8, p: usize) -> (*const u8, *const u8) {
            (row.add(2 * p * P::BYTES), row.add((2 * p + 1) * P::BYTES))
        }

        /// The f16 scale and minimum that start Q4_1/Q5_1 blocks `a` and `b`, as lane halves.
        #[inline(always)]
        unsafe fn scale_and_min(a: *const u8, b: *const u8) -> (__m512, __m512) {
            (
                halves(f16_at(a), f16_at(b)),
                halves(f16_at(a.add(2)), f16_at(b.add(2))),
            )
        }

        /// Q5_0/Q5_1 blocks `a` and `b`: `qh: u32` at `qh_at`, the 16 nibble bytes right after it.
        #[inline(always)]
        unsafe fn five_bit_pair(a: *const u8, b: *const u8, qh_at: usize) -> __m512i {
            let qh_a = std::ptr::read_unaligned(a.add(qh_at) as *const u32) as u64;
            let qh_b = std::ptr::read_unaligned(b.add(qh_at) as *const u32) as u64;
            let nibbles = legacy_nibbles(a.add(qh_at + 4), b.add(qh_at + 4));
            fifth_bit(nibbles, qh_a | (qh_b << 32))
        }

        /// The low (`HIGH` false) or high nibbles of 64 bytes.
        #[inline(always)]
        unsafe fn nibbles64<const HIGH: bool>(v: __m512i) -> __m512i {
            let v = if HIGH { _mm512_srli_epi16::<4>(v) } else { v };
            _mm512_and_si512(v, _mm512_set1_epi8(0x0f))
        }

        /// Bit 4 set in the bytes whose bit in `mask` is set.
        #[inline(always)]
        unsafe fn fifth_bit(v: __m512i, mask: u64) -> __m512i {
            _mm512_or_si512(v, _mm512_maskz_mov_epi8(mask, _mm512_set1_epi8(16)))
        }

        pub(super) struct Q4_0;
        pub(super) struct Q4_1;
        pub(super) struct Q5_0;
        pub(super) struct Q5_1;
        pub(super) struct Q8_0;
        pub(super) struct Q4K;
        pub(super) struct Q5K;
        pub(super) struct Q6K;

        impl Pair for Q4_0 {
            const BYTES: usize = 18;
            const PAIR_BYTES: usize = 2 * 18;
            const HAS_MIN: bool = false;
            const OFFSET: i32 = 8;
            #[inline(always)]
            unsafe fn expand(row: *const u8, p: usize) -> (__m512i, __m512, __m512) {
                let (a, b) = legacy_pair::<Self>(row, p);
                let q = legacy_nibbles(a.add(2), b.add(2));
                (q, halves(f16_at(a), f16_at(b)), _mm512_setzero_ps())
            }
        }

        impl Pair for Q4_1 {
            const BYTES: usize = 20;
            const PAIR_BYTES: usize = 2 * 20;
            const HAS_MIN: bool = true;
            #[inline(always)]
            unsafe fn expand(row: *const u8, p: usize) -> (__m512i, __m512, __m512) {
                let (a, b) = legacy_pair::<Self>(row, p);
                let (s, m) = scale_and_min(a, b);
                (legacy_nibbles(a.add(4), b.add(4)), s, m)
            }
        }

        impl Pair for Q5_0 {
            const BYTES: usize = 22;
            const PAIR_BYTES: usize = 2 * 22;
            const HAS_MIN: bool = false;
            const OFFSET: i32 = 16;
            #[inline(always)]
            unsafe fn expand(row: *const u8, p: usize) -> (__m512i, __m512, __m512) {
                let (a, b) = legacy_pair::<Self>(row, p);
                let q = five_bit_pair(a, b, 2);
                (q, halves(f16_at(a), f16_at(b)), _mm512_setzero_ps())
            }
        }

        impl Pair for Q5_1 {
            const BYTES: usize = 24;
            const PAIR_BYTES: usize = 2 * 24;
            const HAS_MIN: bool = true;
            #[inline(always)]
            unsafe fn expand(row: *const u8, p: usize) -> (__m512i, __m512, __m512) {
                let (a, b) = legacy_pair::<Self>(row, p);
                let (s, m) = scale_and_min(a, b);
                (five_bit_pair(a, b, 4), s, m)
            }
        }

        impl Pair for Q8_0 {
            const BYTES: usize = 34;
            const PAIR_BYTES: usize = 2 * 34;
            const HAS_MIN: bool = false;
            const OFFSET: i32 = if $q8_signed { 0 } else { 128 };
            const SIGNED: bool = $q8_signed;
            /// Signed weights as they are (`$q8_signed`), or made unsigned by flipping the sign
            /// bit (q + 128; offset 128).
            #[inline(always)]
            unsafe fn expand(row: *const u8, p: usize) -> (__m512i, __m512, __m512) {
                let (a, b) = legacy_pair::<Self>(row, p);
                let z = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_loadu_si256(a.add(2) as *const __m256i)),
                    _mm256_loadu_si256(b.add(2) as *const __m256i),
                );
                let q = if $q8_signed {
                    z
                } else {
                    _mm512_xor_si512(z, _mm512_set1_epi8(-128))
                };
                (q, halves(f16_at(a), f16_at(b)), _mm512_setzero_ps())
            }
        }

        /// Scale and minimum `j` of a Q4K/Q5K block's packed 6-bit table.
        #[inline(always)]
        unsafe fn scale_min_k4(q: *const u8, j: usize) -> (f32, f32) {
            let (s, m) = if j < 4 {
                (*q.add(j) & 63, *q.add(j + 4) & 63)
            } else {
                (
                    (*q.add(j + 4) & 0xf) | ((*q.add(j - 4) >> 6) << 4),
                    (*q.add(j + 4) >> 4) | ((*q.add(j) >> 6) << 4),
                )
            };
            (s as f32, m as f32)
        }

        /// Q4K/Q5K pair `p` of a block: chunks `2p` and `2p + 1` are the low and high nibbles of
        /// `qs[32p..32p + 32]`, each with its scale and minimum (value = d·s·q − dmin·m).
        #[inline(always)]
        unsafe fn k4_pair(block: *const u8, qs: *const u8, p: usize) -> (__m512i, __m512, __m512) {
            let v = _mm256_loadu_si256(qs.add(32 * p) as *const __m256i);
            let mask = _mm256_set1_epi8(0x0f);
            let lo = _mm256_and_si256(v, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
            let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            let (d, dmin) = (f16_at(block), f16_at(block.add(2)));
            let (s1, m1) = scale_min_k4(block.add(4), 2 * p);
            let (s2, m2) = scale_min_k4(block.add(4), 2 * p + 1);
            (q, halves(d * s1, d * s2), halves(-dmin * m1, -dmin * m2))
        }

        impl Pair for Q4K {
            const BYTES: usize = 144;
            const PAIR_BYTES: usize = 144 / 4;
            const HAS_MIN: bool = true;
            #[inline(always)]
            unsafe fn expand(row: *const u8, p: usize) -> (__m512i, __m512, __m512) {
                let block = row.add(p / 4 * Self::BYTES);
                k4_pair(block, block.add(16), p % 4)
            }
        }

        impl Pair for Q5K {
            const BYTES: usize = 176;
            const PAIR_BYTES: usize = 176 / 4;
            const HAS_MIN: bool = true;
            /// Q4K's pair with bit `2p` (first chunk) and `2p + 1` (second) of `qh[l]` as bit 4.
            #[inline(always)]
            unsafe fn expand(row: *const u8, p: usize) -> (__m512i, __m512, __m512) {
                let block = row.add(p / 4 * Self::BYTES);
                let local = p % 4;
                let (q, s, m) = k4_pair(block, block.add(48), local);
                let qh = _mm256_loadu_si256(block.add(16) as *const __m256i);
                let lo =
                    _mm256_test_epi8_mask(qh, _mm256_set1_epi8((1u8 << (2 * local)) as i8)) as u64;
                let hi = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((1u8 << (2 * local + 1)) as i8))
                    as u64;
                (fifth_bit(q, lo | (hi << 32)), s, m)
            }
        }

        impl Pair for Q6K {
            const BYTES: usize = 210;
            const PAIR_BYTES: usize = 210 / 4;
            const HAS_MIN: bool = false;
            const OFFSET: i32 = 32;
            /// Pair `p` = chunks `2p`, `2p + 1`: half `p / 2` of the block, parts `2 (p % 2)` and
            /// `2 (p % 2) + 1`; low 4 bits from the low (p even) or high nibbles of
            /// `ql[64 half..][..64]`, 2 high bits from bits `2 part` of `qh[32 half..][..32]`, one
            /// scale per 16 weights (offset 32).
            #[inline(always)]
            unsafe fn expand(row: *const u8, p: usize) -> (__m512i, __m512, __m512) {
                let block = row.add(p / 4 * Self::BYTES);
                let local = p % 4;
                let (half, first_part) = (local / 2, 2 * (local % 2));
                let ql = _mm512_loadu_si512(block.add(64 * half) as *const __m512i);
                let low = if first_part == 0 {
                    nibbles64::<false>(ql)
                } else {
                    nibbles64::<true>(ql)
                };
                let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                    block.add(128 + 32 * half) as *const __m256i
                ));
                // Words of the first 32 bytes shift by 2·first_part, of the next 32 by 2 more.
                let shift = 2 * first_part as i16;
                let counts = _mm512_mask_blend_epi16(
                    0xffff_0000,
                    _mm512_set1_epi16(shift),
                    _mm512_set1_epi16(shift + 2),
                );
                let high = _mm512_and_si512(_mm512_srlv_epi16(qh, counts), _mm512_set1_epi8(3));
                let q = _mm512_or_si512(low, _mm512_slli_epi16::<4>(high));
                let scales = block.add(192 + 8 * half + 2 * first_part);
                let sc = _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(
                    std::ptr::read_unaligned(scales as *const i32),
                )));
                let d = _mm_set1_ps(f16_at(block.add(208)));
                (q, quarters(_mm_mul_ps(sc, d)), _mm512_setzero_ps())
            }
        }

        /// One `MI x NJ` tile over the whole width.
        #[allow(clippy::needless_range_loop)]
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn tile<P: Pair, const MI: usize, const NJ: usize>(
            x: &QuantizedActivations,
            i0: usize,
            wp: *const u8,
            row_bytes: usize,
            out: *mut f32,
            ldo: usize,
        ) {
            let k = x.k;
            let mut acc = [[_mm512_setzero_ps(); NJ]; MI];
            for p in 0..k / 64 {
                let mut q = [_mm512_setzero_si512(); NJ];
                let mut s = [_mm512_setzero_ps(); NJ];
                let mut mn = [_mm512_setzero_ps(); NJ];
                for b in 0..NJ {
                    // The hardware prefetchers do not keep NJ interleaved row streams ahead of
                    // these loads (measured: half the memory bandwidth without this).
                    _mm_prefetch::<_MM_HINT_T0>(
                        wp.wrapping_add((b + PREFETCH_ROWS) * row_bytes + p * P::PAIR_BYTES)
                            as *const i8,
                    );
                    (q[b], s[b], mn[b]) = P::expand(wp.add(b * row_bytes), p);
                }
                for a in 0..MI {
                    let row = i0 + a;
                    let xq =
                        _mm512_loadu_si512(x.q.as_ptr().add(row * k + 64 * p) as *const __m512i);
                    let lane = row * (k / 4) + 16 * p;
                    let init = _mm512_loadu_si512(x.lane_init.as_ptr().add(lane) as *const __m512i);
                    let xd = _mm512_loadu_ps(x.lane_scale.as_ptr().add(lane));
                    let xs = if P::HAS_MIN {
                        _mm512_loadu_ps(x.lane_sum.as_ptr().add(lane))
                    } else {
                        _mm512_setzero_ps()
                    };
                    for b in 0..NJ {
                        let dot = if P::SIGNED {
                            dpbusd_signed(init, q[b], xq)
                        } else {
                            _mm512_dpbusd_epi32(init, q[b], xq)
                        };
                        let scale = _mm512_mul_ps(s[b], xd);
                        acc[a][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[a][b]);
                        if P::HAS_MIN {
                            acc[a][b] = _mm512_fmadd_ps(mn[b], xs, acc[a][b]);
                        }
                    }
                }
            }
            store_tile(&acc, out, ldo);
        }

        /// Rows ahead that are prefetched: the same columns of a later tile's rows (past the
        /// matrix's end the address is only a hint: prefetches do not fault).
        const PREFETCH_ROWS: usize = 8;

        /// A tile's operands: the quantized `x`, weight rows (`row_bytes` apart), outputs (`ldo`
        /// apart).
        struct Int8Tiles<'a, P> {
            x: &'a QuantizedActivations,
            w: *const u8,
            row_bytes: usize,
            out: *mut f32,
            ldo: usize,
            pair: PhantomData<P>,
        }

        impl<P: Pair> Tiles for Int8Tiles<'_, P> {
            const TILE: (usize, usize) = $tile;
            #[inline(always)]
            unsafe fn tile<const MI: usize, const NJ: usize>(&self, i: usize, j: usize) {
                let (w, out) = (
                    self.w.add(j * self.row_bytes),
                    self.out.add(i * self.ldo + j),
                );
                tile::<P, MI, NJ>(self.x, i, w, self.row_bytes, out, self.ldo)
            }
        }

        #[target_feature(enable = $features)]
        pub(super) unsafe fn run<P: Pair>(
            x: &QuantizedActivations,
            m: usize,
            w: &[u8],
            row_bytes: usize,
            rows: usize,
            out: *mut f32,
            ldo: usize,
        ) {
            let operands = Int8Tiles::<P> {
                x,
                w: w.as_ptr(),
                row_bytes,
                out,
                ldo,
                pair: PhantomData,
            };
            run_tiles(&operands, m, rows);
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `src` plus, per 32-bit lane, the four products of the signed bytes `w` and `x`: `|w|`
    /// times `x` negated where `w` is negative. (Q8_0 is offset to unsigned bytes here, where
    /// `vpdpbusd` is native and exact: this form serves the shared source.)
    #[inline(always)]
    pub(super) unsafe fn dpbusd_signed(src: __m512i, w: __m512i, x: __m512i) -> __m512i {
        let negative = _mm512_movepi8_mask(w);
        let x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
        _mm512_dpbusd_epi32(src, _mm512_abs_epi8(w), x)
    }

    int8_kernels!("avx512f,avx512bw,avx512vl,avx512vnni,f16c", (4, 4), false);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::cpu_emu512::*;
    // Q8_0 as signed bytes: its offset form (0..255) would saturate `vpmaddubsw`'s pair sums.
    int8_kernels!("avx2,fma,f16c", (4, 4), true);
}

/// The AVX2 instantiation against the AVX-512 VNNI one, bit for bit, on random blocks of every
/// type the AVX2 form serves (where this CPU has AVX-512 VNNI to compare with).
#[cfg(all(test, target_arch = "x86_64"))]
mod isa_tests {
    use super::super::test_blocks::{random_rows, ALL_BLOCK_TYPES};
    use super::*;
    use crate::cpu_isa::isa_test_support::{both_here, same_bits, values};

    #[test]
    fn avx2_integer_products_equal_avx512_vnni() {
        if !both_here(native()) {
            return;
        }
        let (rows, k) = (9, 512);
        for (t, dtype) in ALL_BLOCK_TYPES.into_iter().enumerate() {
            if matches!(dtype, GgmlDType::Q2K | GgmlDType::Q3K) {
                continue;
            }
            let w = random_rows(dtype, rows, k, 11 + t as u64);
            let row_bytes = w.len() / rows;
            for m in [1usize, 3, 6] {
                let x = values(m * k, 1);
                // Each form with the activations quantized for its own offset.
                let xq5 = QuantizedActivations::new(&x, k, offset_in(true, dtype));
                let xq2 = QuantizedActivations::new(&x, k, offset_in(false, dtype));
                let (mut a, mut b) = (vec![f32::NAN; m * rows], vec![0f32; m * rows]);
                // SAFETY: both instruction sets are present; outputs are m x rows.
                unsafe {
                    with_pair_type!(avx512, dtype, P => avx512::run::<P>(&xq5, m, &w, row_bytes, rows, a.as_mut_ptr(), rows));
                    with_pair_type!(avx2, dtype, P => avx2::run::<P>(&xq2, m, &w, row_bytes, rows, b.as_mut_ptr(), rows));
                }
                assert!(same_bits(&a, &b), "{dtype:?} m={m}");
            }
        }
    }

    /// The signed-bytes dot product both forms define (the AVX2 kernels use it for Q8_0; the
    /// AVX-512 one serves the shared source), against plain integer sums over every extreme.
    #[test]
    fn signed_byte_dot_products_are_exact() {
        if !both_here(native()) {
            return;
        }
        let mut w = [0i8; 64];
        let mut x = [0i8; 64];
        for i in 0..64 {
            // The extremes (-128 weights, ±127 activations), zeros and mixed signs.
            w[i] = [-128, 127, -1, 0, 5, -77, 100, -128][i % 8];
            x[i] = [127, -127, 127, -127, 0, 33, -5, 127][(i / 8) % 8];
        }
        let want: Vec<i32> = (0..16)
            .map(|l| {
                7 + (0..4)
                    .map(|j| w[4 * l + j] as i32 * x[4 * l + j] as i32)
                    .sum::<i32>()
            })
            .collect();
        // SAFETY: both instruction sets are present; the arrays are 64 bytes.
        let (a, b) = unsafe {
            let (w5, x5) = (
                std::mem::transmute::<[i8; 64], std::arch::x86_64::__m512i>(w),
                std::mem::transmute::<[i8; 64], std::arch::x86_64::__m512i>(x),
            );
            let (w2, x2) = (
                std::mem::transmute::<[i8; 64], crate::cpu_emu512::__m512i>(w),
                std::mem::transmute::<[i8; 64], crate::cpu_emu512::__m512i>(x),
            );
            (
                std::mem::transmute::<std::arch::x86_64::__m512i, [i32; 16]>(
                    avx512::dpbusd_signed(std::arch::x86_64::_mm512_set1_epi32(7), w5, x5),
                ),
                std::mem::transmute::<crate::cpu_emu512::__m512i, [i32; 16]>(
                    crate::cpu_emu512::dpbusd_signed(
                        crate::cpu_emu512::_mm512_set1_epi32(7),
                        w2,
                        x2,
                    ),
                ),
            )
        };
        assert_eq!(a.to_vec(), want);
        assert_eq!(b.to_vec(), want);
    }
}
