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

/// Whether this CPU and type have a fused kernel (every GGUF block type the matrices hold).
pub(super) fn supported(dtype: GgmlDType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::is_block_quantized(dtype) && crate::cpu_isa::avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = dtype;
        false
    }
}

/// Call `$f::<B>($args)` from the AVX-512 module where `$native`, else from the AVX2 one, `B`
/// the expansion type of `$dtype` (a block type [`supported`] admits).
#[cfg(target_arch = "x86_64")]
macro_rules! with_block_type {
    ($native:expr, $dtype:expr, $f:ident($($arg:expr),*)) => {
        if $native {
            dispatch_block_type!($dtype, avx512, B => avx512::$f::<B>($($arg),*);
                Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K)
        } else {
            dispatch_block_type!($dtype, avx2, B => avx2::$f::<B>($($arg),*);
                Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K)
        }
    };
}

/// Rows `0..m` of `x` against weight rows `0..rows` of `w` (GGUF blocks,
/// `row_bytes` apart), writing columns `0..rows` of `out` (row stride `ldo`).
///
/// # Safety
/// [`supported`] must have returned true for `dtype`; `w` must hold `rows` rows of `k` weights
/// in whole blocks; `out` must be valid for `m` rows of stride `ldo` and written by no one else.
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
    with_block_type!(
        crate::cpu_isa::avx512(),
        dtype,
        block(x, m, k, w, row_bytes, rows, out, ldo)
    );
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dtype, x, m, k, w, row_bytes, rows, out, ldo);
        unreachable!("fused kernel on a CPU without one");
    }
}

/// [`block`] with bf16 products: each 32-weight chunk is expanded as above, rounded to bf16 and
/// dotted with `x` already in bf16 (`[m, k]`), in the order of the bf16 panel kernel
/// (`cpu_bf16::block`), so both paths give identical results.
///
/// # Safety
/// As [`block`], and `cpu_bf16::supported()` must have returned true.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn block_bf16(
    dtype: GgmlDType,
    x: &[u16],
    m: usize,
    k: usize,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    out: *mut f32,
    ldo: usize,
) {
    #[cfg(target_arch = "x86_64")]
    with_block_type!(
        crate::cpu_bf16::native(),
        dtype,
        block_bf16(x, m, k, w, row_bytes, rows, out, ldo)
    );
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
/// [`supported`] must have returned true for `dtype`; `bytes` holds whole blocks and `out` has
/// room for all their weights.
pub(super) unsafe fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    with_block_type!(crate::cpu_isa::avx512(), dtype, dequantize(bytes, out));
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dtype, bytes, out);
        unreachable!("fused dequantization on a CPU without it");
    }
}

/// The largest batch the fused path serves; bigger batches amortize the panel's dequantization
/// over more rows and take the panel path (measured: see `benches/RESULTS.md`).
pub(super) const MAX_ROWS: usize = 4;

/// Dequantize whole blocks straight to bf16 (the bf16 panel path): the same expansion, rounded
/// by the same instruction as [`block_bf16`]'s operands, so panel and fused results agree.
///
/// # Safety
/// [`supported`] must have returned true for `dtype` and `cpu_bf16::supported()` too; `bytes`
/// holds whole blocks and `out` has room for all their weights.
pub(super) unsafe fn dequantize_bf16(dtype: GgmlDType, bytes: &[u8], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    with_block_type!(
        crate::cpu_bf16::native(),
        dtype,
        dequantize_bf16(bytes, out)
    );
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dtype, bytes, out);
        unreachable!("fused dequantization on a CPU without it");
    }
}

/// The kernels, written once against the AVX-512 intrinsics' names and instantiated for
/// AVX-512 and for AVX2 (`cpu_emu512`: the same lanes in the same order, identical results).
/// `$f32` and `$bf16` are the features of the f32 and bf16 kernels, `$bf16mod` the module of
/// `cpu_bf16` with the same instruction set.
macro_rules! fused_kernels {
    ($f32:literal, $bf16:literal, $bf16mod:ident, $tile:expr, $native_permutes:literal) => {
        /// Whether lane permutes and mask registers are single instructions (AVX-512), so
        /// 4-bit types expand through a 16-entry table and a permute and Q5's fifth bits go in
        /// through a mask; on AVX2, where those are emulated, convert-multiply-add and
        /// variable shifts are cheaper. Both forms give the same values.
        const NATIVE_PERMUTES: bool = $native_permutes;

        use std::marker::PhantomData;

        use crate::cpu_tiles::{run_tiles, store_tile, Tiles};

        /// How a GGUF block expands, 32 weights at a time, into pairs of 16-lane vectors. Each
        /// expansion computes exactly what candle's `to_float` computes for those weights (the same
        /// f32 operations in the same order), so the results are bit-identical to a load-time
        /// dequantization.
        pub(super) trait Block {
            /// Bytes per block.
            const BYTES: usize;
            /// 32-weight chunks per block (1 for the legacy types, 8 for the 256-weight K-quants).
            const CHUNKS: usize;
            /// Weights `32 * chunk .. 32 * chunk + 32` of the block at `p`.
            ///
            /// # Safety
            /// `p` points at a whole block; `chunk < CHUNKS`; the CPU has the kernels' features.
            unsafe fn expand(p: *const u8, chunk: usize) -> (__m512, __m512);
        }

        /// The f16 at `p` as f32 (exact, as `half`'s `to_f32`).
        #[inline(always)]
        unsafe fn f16_at(p: *const u8) -> f32 {
            let h = std::ptr::read_unaligned(p as *const u16);
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
        }

        /// 16 bytes at `p`, zero-extended to 32-bit lanes.
        #[inline(always)]
        unsafe fn bytes16(p: *const u8) -> __m512i {
            _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))
        }

        /// The low nibble (`shift` 0) or high nibble (`shift` 4) of 16 zero-extended bytes.
        #[inline(always)]
        unsafe fn nibbles(b: __m512i, shift: u32) -> __m512i {
            _mm512_and_si512(
                _mm512_srl_epi32(b, _mm_cvtsi32_si128(shift as i32)),
                _mm512_set1_epi32(15),
            )
        }

        /// Bits `shift..shift + bits` of each lane.
        #[inline(always)]
        unsafe fn bit_field(b: __m512i, shift: u32, bits: u32) -> __m512i {
            _mm512_and_si512(
                _mm512_srl_epi32(b, _mm_cvtsi32_si128(shift as i32)),
                _mm512_set1_epi32((1 << bits) - 1),
            )
        }

        /// 0.0, 1.0, ..., 15.0: the levels of a 4-bit weight.
        #[inline(always)]
        unsafe fn levels() -> __m512 {
            _mm512_setr_ps(
                0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0,
                15.0,
            )
        }

        /// `q as f32 * d`.
        #[inline(always)]
        unsafe fn scaled(q: __m512i, d: f32) -> __m512 {
            _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(d))
        }

        /// `q as f32 * d + m` (candle's Q4_1/Q5_1 form).
        #[inline(always)]
        unsafe fn scaled_plus(q: __m512i, d: __m512, m: __m512) -> __m512 {
            _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q), d), m)
        }

        /// `d * q as f32 - m` (candle's K-quant form: scale first, then subtract the minimum).
        #[inline(always)]
        unsafe fn scaled_minus(q: __m512i, d: f32, m: f32) -> __m512 {
            _mm512_sub_ps(
                _mm512_mul_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(q)),
                _mm512_set1_ps(m),
            )
        }

        /// `d: f16, qs: [u8; 16]`; weight `j` is `((qs[j] & 15) - 8) * d`, weight `j + 16` is
        /// `((qs[j] >> 4) - 8) * d`.
        pub(super) struct Q4_0;
        /// `d: f16, m: f16, qs: [u8; 16]`; weight `j` is `(qs[j] & 15) * d + m`, weight `j + 16` is
        /// `(qs[j] >> 4) * d + m`.
        pub(super) struct Q4_1;
        /// `d: f16, qh: u32, qs: [u8; 16]`: Q4_0's nibbles with a fifth bit from `qh` (bit `j` for
        /// weight `j`), offset 16.
        pub(super) struct Q5_0;
        /// `d: f16, m: f16, qh: u32, qs: [u8; 16]`: Q4_1 with Q5_0's fifth bit.
        pub(super) struct Q5_1;
        /// `d: f16, qs: [i8; 32]`; weight `j` is `qs[j] * d`.
        pub(super) struct Q8_0;
        /// `scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16`: 2-bit weights, a 4-bit scale and
        /// minimum per 16.
        pub(super) struct Q2K;
        /// `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`: 2 low bits plus a high bit
        /// (weights -4..3), a packed 6-bit scale per 16.
        pub(super) struct Q3K;
        /// `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`: nibbles, a packed 6-bit scale and
        /// minimum per 32.
        pub(super) struct Q4K;
        /// Q4K with a fifth bit per weight: `d, dmin, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`.
        pub(super) struct Q5K;
        /// `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`: 6-bit weights offset 32, an
        /// 8-bit scale per 16.
        pub(super) struct Q6K;

        impl Block for Q4_0 {
            const BYTES: usize = 18;
            const CHUNKS: usize = 1;
            #[inline(always)]
            unsafe fn expand(p: *const u8, _chunk: usize) -> (__m512, __m512) {
                let d = f16_at(p);
                let b = bytes16(p.add(2));
                let eight = _mm512_set1_epi32(8);
                (
                    scaled(_mm512_sub_epi32(nibbles(b, 0), eight), d),
                    scaled(_mm512_sub_epi32(nibbles(b, 4), eight), d),
                )
            }
        }

        impl Block for Q4_1 {
            const BYTES: usize = 20;
            const CHUNKS: usize = 1;
            /// A block has only 16 distinct weights, `q * d + m` for `q` in 0..16: compute those
            /// once (the same multiply-then-add as candle), then pick each weight with a lane
            /// permute, which reads only the low 4 bits of each index — the nibble — so the bytes
            /// need no masking.
            #[inline(always)]
            unsafe fn expand(p: *const u8, _chunk: usize) -> (__m512, __m512) {
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
                let d = _mm512_broadcastss_ps(dm);
                let m = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
                let bytes = bytes16(p.add(4));
                if !NATIVE_PERMUTES {
                    return (
                        scaled_plus(nibbles(bytes, 0), d, m),
                        scaled_plus(nibbles(bytes, 4), d, m),
                    );
                }
                let table = _mm512_add_ps(_mm512_mul_ps(levels(), d), m);
                (
                    _mm512_permutexvar_ps(bytes, table),
                    _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), table),
                )
            }
        }

        /// Bit `at[j]` of `bits[j]` moved to bit 4 of lane `j`.
        #[inline(always)]
        unsafe fn fifth_bit_at(bits: __m512i, at: __m512i) -> __m512i {
            let bit = _mm512_and_si512(_mm512_srlv_epi32(bits, at), _mm512_set1_epi32(1));
            _mm512_slli_epi32::<4>(bit)
        }

        /// Q5_0/Q5_1's 5-bit values: the nibbles of `qs` with bit 4 set from `qh` (bits 0..16 for
        /// the low nibbles, 16..32 for the high ones).
        #[inline(always)]
        unsafe fn five_bit(qh: u32, qs: *const u8) -> (__m512i, __m512i) {
            let b = bytes16(qs);
            let sixteen = _mm512_set1_epi32(16);
            let lo = nibbles(b, 0);
            let hi = nibbles(b, 4);
            if !NATIVE_PERMUTES {
                // Bit j of qh, shifted down to bit 0 of lane j, then up to bit 4.
                let bits = _mm512_set1_epi32(qh as i32);
                let first = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
                let second = _mm512_add_epi32(first, sixteen);
                return (
                    _mm512_or_si512(lo, fifth_bit_at(bits, first)),
                    _mm512_or_si512(hi, fifth_bit_at(bits, second)),
                );
            }
            (
                _mm512_mask_or_epi32(lo, qh as u16, lo, sixteen),
                _mm512_mask_or_epi32(hi, (qh >> 16) as u16, hi, sixteen),
            )
        }

        impl Block for Q5_0 {
            const BYTES: usize = 22;
            const CHUNKS: usize = 1;
            #[inline(always)]
            unsafe fn expand(p: *const u8, _chunk: usize) -> (__m512, __m512) {
                let d = f16_at(p);
                let qh = std::ptr::read_unaligned(p.add(2) as *const u32);
                let (lo, hi) = five_bit(qh, p.add(6));
                let sixteen = _mm512_set1_epi32(16);
                (
                    scaled(_mm512_sub_epi32(lo, sixteen), d),
                    scaled(_mm512_sub_epi32(hi, sixteen), d),
                )
            }
        }

        impl Block for Q5_1 {
            const BYTES: usize = 24;
            const CHUNKS: usize = 1;
            #[inline(always)]
            unsafe fn expand(p: *const u8, _chunk: usize) -> (__m512, __m512) {
                let d = f16_at(p);
                let m = _mm512_set1_ps(f16_at(p.add(2)));
                let qh = std::ptr::read_unaligned(p.add(4) as *const u32);
                let (lo, hi) = five_bit(qh, p.add(8));
                (
                    _mm512_add_ps(scaled(lo, d), m),
                    _mm512_add_ps(scaled(hi, d), m),
                )
            }
        }

        impl Block for Q8_0 {
            const BYTES: usize = 34;
            const CHUNKS: usize = 1;
            #[inline(always)]
            unsafe fn expand(p: *const u8, _chunk: usize) -> (__m512, __m512) {
                let d = _mm512_set1_ps(f16_at(p));
                let a = _mm_loadu_si128(p.add(2) as *const __m128i);
                let b = _mm_loadu_si128(p.add(18) as *const __m128i);
                (
                    _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), d),
                    _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), d),
                )
            }
        }

        impl Block for Q2K {
            const BYTES: usize = 84;
            const CHUNKS: usize = 8;
            /// Chunk `c`: bits `2 * (c % 4)` of `qs[32 * (c / 4)..][..32]`; scales `2c`, `2c + 1`.
            #[inline(always)]
            unsafe fn expand(p: *const u8, c: usize) -> (__m512, __m512) {
                let d = f16_at(p.add(80));
                let min = f16_at(p.add(82));
                let qs = p.add(16 + 32 * (c / 4));
                let shift = 2 * (c % 4) as u32;
                let mut out = [_mm512_setzero_ps(); 2];
                for (i, o) in out.iter_mut().enumerate() {
                    let sc = *p.add(2 * c + i);
                    let dl = d * (sc & 0xF) as f32;
                    let ml = min * (sc >> 4) as f32;
                    *o = scaled_minus(bit_field(bytes16(qs.add(16 * i)), shift, 2), dl, ml);
                }
                (out[0], out[1])
            }
        }

        impl Block for Q3K {
            const BYTES: usize = 110;
            const CHUNKS: usize = 8;
            /// Chunk `c`: bits `2 * (c % 4)` of `qs[32 * (c / 4)..][..32]`, minus 4 where bit `c` of
            /// `hmask[..32]` is clear; scales `2c`, `2c + 1`.
            #[inline(always)]
            unsafe fn expand(p: *const u8, c: usize) -> (__m512, __m512) {
                let d = f16_at(p.add(108));
                let qs = p.add(32 + 32 * (c / 4));
                let shift = 2 * (c % 4) as u32;
                let mut out = [_mm512_setzero_ps(); 2];
                for (i, o) in out.iter_mut().enumerate() {
                    let low = bit_field(bytes16(qs.add(16 * i)), shift, 2);
                    let high = bit_field(bytes16(p.add(16 * i)), c as u32, 1);
                    // A clear high bit subtracts 4.
                    let q = _mm512_sub_epi32(
                        low,
                        _mm512_slli_epi32::<2>(_mm512_xor_si512(high, _mm512_set1_epi32(1))),
                    );
                    let dl = d * (q3k_scale(p.add(96), 2 * c + i) as f32 - 32.0);
                    *o = scaled(q, dl);
                }
                (out[0], out[1])
            }
        }

        /// Scale `j` (0..16) of a Q3K block: a low nibble from bytes 0..8 and two high bits from
        /// bytes 8..12 of the packed scales (as candle's `to_float` unpacks them).
        #[inline(always)]
        unsafe fn q3k_scale(scales: *const u8, j: usize) -> i8 {
            let low = (*scales.add(j % 8) >> (4 * (j / 8))) & 0xF;
            let high = (*scales.add(8 + j % 4) >> (2 * (j / 4))) & 3;
            (low | (high << 4)) as i8
        }

        /// Scale and minimum `j` (0..8) of a Q4K/Q5K block (llama.cpp's `get_scale_min_k4`).
        #[inline(always)]
        unsafe fn scale_min_k4(q: *const u8, j: usize) -> (u8, u8) {
            if j < 4 {
                (*q.add(j) & 63, *q.add(j + 4) & 63)
            } else {
                (
                    (*q.add(j + 4) & 0xF) | ((*q.add(j - 4) >> 6) << 4),
                    (*q.add(j + 4) >> 4) | ((*q.add(j) >> 6) << 4),
                )
            }
        }

        impl Block for Q4K {
            const BYTES: usize = 144;
            const CHUNKS: usize = 8;
            /// Chunk `c`: the low (even `c`) or high (odd `c`) nibbles of `qs[32 * (c / 2)..][..32]`,
            /// scale and minimum `c`.
            #[inline(always)]
            unsafe fn expand(p: *const u8, c: usize) -> (__m512, __m512) {
                let d = f16_at(p);
                let min = f16_at(p.add(2));
                let (sc, m) = scale_min_k4(p.add(4), c);
                let (d1, m1) = (d * sc as f32, min * m as f32);
                let qs = p.add(16 + 32 * (c / 2));
                if !NATIVE_PERMUTES {
                    let shift = 4 * (c % 2) as u32;
                    return (
                        scaled_minus(nibbles(bytes16(qs), shift), d1, m1),
                        scaled_minus(nibbles(bytes16(qs.add(16)), shift), d1, m1),
                    );
                }
                // The chunk's 16 distinct values `d1 · q − m1` (as `scaled_minus` computes each),
                // then a lane permute per 16 weights, which reads only the index's low 4 bits.
                let table = _mm512_sub_ps(
                    _mm512_mul_ps(_mm512_set1_ps(d1), levels()),
                    _mm512_set1_ps(m1),
                );
                let shift = _mm_cvtsi32_si128(4 * (c % 2) as i32);
                (
                    _mm512_permutexvar_ps(_mm512_srl_epi32(bytes16(qs), shift), table),
                    _mm512_permutexvar_ps(_mm512_srl_epi32(bytes16(qs.add(16)), shift), table),
                )
            }
        }

        impl Block for Q5K {
            const BYTES: usize = 176;
            const CHUNKS: usize = 8;
            /// Q4K's chunk `c` with bit `c` of `qh[..32]` as a fifth bit.
            #[inline(always)]
            unsafe fn expand(p: *const u8, c: usize) -> (__m512, __m512) {
                let d = f16_at(p);
                let min = f16_at(p.add(2));
                let (sc, m) = scale_min_k4(p.add(4), c);
                let (d1, m1) = (d * sc as f32, min * m as f32);
                let qh = p.add(16);
                let qs = p.add(48 + 32 * (c / 2));
                let shift = 4 * (c % 2) as u32;
                let mut out = [_mm512_setzero_ps(); 2];
                for (i, o) in out.iter_mut().enumerate() {
                    let low = nibbles(bytes16(qs.add(16 * i)), shift);
                    let high = bit_field(bytes16(qh.add(16 * i)), c as u32, 1);
                    let q = _mm512_or_si512(low, _mm512_slli_epi32::<4>(high));
                    *o = scaled_minus(q, d1, m1);
                }
                (out[0], out[1])
            }
        }

        impl Block for Q6K {
            const BYTES: usize = 210;
            const CHUNKS: usize = 8;
            /// Chunk `c` = 4 * half + part: low bits from the low (parts 0, 1) or high (2, 3)
            /// nibbles of `ql[64 * half + 32 * (part % 2)..][..32]`, two high bits from bits
            /// `2 * part` of `qh[32 * half..][..32]`; scales `8 * half + 2 * part (+1)`.
            #[inline(always)]
            unsafe fn expand(p: *const u8, c: usize) -> (__m512, __m512) {
                let d = f16_at(p.add(208));
                let (half, part) = (c / 4, c % 4);
                let ql = p.add(64 * half + 32 * (part % 2));
                let qh = p.add(128 + 32 * half);
                let scales = p.add(192 + 8 * half + 2 * part) as *const i8;
                let nib_shift = 4 * (part / 2) as u32;
                let mut out = [_mm512_setzero_ps(); 2];
                for (i, o) in out.iter_mut().enumerate() {
                    let low = nibbles(bytes16(ql.add(16 * i)), nib_shift);
                    let high = bit_field(bytes16(qh.add(16 * i)), 2 * part as u32, 2);
                    let q = _mm512_sub_epi32(
                        _mm512_or_si512(low, _mm512_slli_epi32::<4>(high)),
                        _mm512_set1_epi32(32),
                    );
                    *o = scaled(q, d * *scales.add(i) as f32);
                }
                (out[0], out[1])
            }
        }

        #[target_feature(enable = $f32)]
        pub(super) unsafe fn dequantize<B: Block>(bytes: &[u8], out: &mut [f32]) {
            let blocks = (bytes.len() / B::BYTES).min(out.len() / (32 * B::CHUNKS));
            for i in 0..blocks {
                let p = bytes.as_ptr().add(i * B::BYTES);
                for c in 0..B::CHUNKS {
                    let (lo, hi) = B::expand(p, c);
                    let o = out.as_mut_ptr().add((i * B::CHUNKS + c) * 32);
                    _mm512_storeu_ps(o, lo);
                    _mm512_storeu_ps(o.add(16), hi);
                }
            }
        }

        /// Rows ahead that are prefetched: the same columns of a later tile's rows. The hardware
        /// prefetchers do not keep several interleaved row streams ahead of the loads (measured:
        /// about half the memory bandwidth without this).
        const PREFETCH_ROWS: usize = 8;

        /// Prefetch, for row `b` of a tile, the bytes `PREFETCH_ROWS` rows further down at the
        /// position of chunk `c` of block `blk` (a few cache lines per block; one per chunk is
        /// enough).
        #[inline(always)]
        unsafe fn prefetch_next_tile<B: Block>(
            wp: *const u8,
            b: usize,
            row_bytes: usize,
            blk: usize,
            c: usize,
        ) {
            let offset = blk * B::BYTES + c * B::BYTES / B::CHUNKS;
            _mm_prefetch::<_MM_HINT_T0>(
                wp.wrapping_add((b + PREFETCH_ROWS) * row_bytes + offset) as *const i8
            );
        }

        #[target_feature(enable = $bf16)]
        pub(super) unsafe fn dequantize_bf16<B: Block>(bytes: &[u8], out: &mut [u16]) {
            use crate::cpu_bf16::$bf16mod::pack;
            let blocks = (bytes.len() / B::BYTES).min(out.len() / (32 * B::CHUNKS));
            for i in 0..blocks {
                let p = bytes.as_ptr().add(i * B::BYTES);
                for c in 0..B::CHUNKS {
                    let (lo, hi) = B::expand(p, c);
                    let o = out.as_mut_ptr().add((i * B::CHUNKS + c) * 32);
                    _mm512_storeu_si512(
                        o as *mut __m512i,
                        std::mem::transmute::<__m512bh, __m512i>(pack(lo, hi)),
                    );
                }
            }
        }

        /// One `MI x NJ` tile; accumulators stay in registers. (Indexed loops: several arrays are
        /// walked in step, which reads more plainly than zipped iterators here.)
        #[allow(clippy::needless_range_loop)]
        #[inline]
        #[target_feature(enable = $f32)]
        unsafe fn tile<B: Block, const MI: usize, const NJ: usize>(
            xp: *const f32,
            k: usize,
            wp: *const u8,
            row_bytes: usize,
            out: *mut f32,
            ldo: usize,
        ) {
            let mut acc = [[_mm512_setzero_ps(); NJ]; MI];
            for blk in 0..k / (32 * B::CHUNKS) {
                for c in 0..B::CHUNKS {
                    let mut lo = [_mm512_setzero_ps(); NJ];
                    let mut hi = [_mm512_setzero_ps(); NJ];
                    for b in 0..NJ {
                        prefetch_next_tile::<B>(wp, b, row_bytes, blk, c);
                        (lo[b], hi[b]) = B::expand(wp.add(b * row_bytes + blk * B::BYTES), c);
                    }
                    let col = (blk * B::CHUNKS + c) * 32;
                    for a in 0..MI {
                        let x0 = _mm512_loadu_ps(xp.add(a * k + col));
                        let x1 = _mm512_loadu_ps(xp.add(a * k + col + 16));
                        for b in 0..NJ {
                            acc[a][b] = _mm512_fmadd_ps(x0, lo[b], acc[a][b]);
                            acc[a][b] = _mm512_fmadd_ps(x1, hi[b], acc[a][b]);
                        }
                    }
                }
            }
            store_tile(&acc, out, ldo);
        }

        /// A tile's operands: rows of `x` (elements `X`, `k` apart), weight rows of blocks `B`
        /// (`row_bytes` apart), outputs (`ldo` apart).
        struct Fused<X, B> {
            x: *const X,
            k: usize,
            w: *const u8,
            row_bytes: usize,
            out: *mut f32,
            ldo: usize,
            block: PhantomData<B>,
        }

        impl<X, B> Fused<X, B> {
            /// Where the tile at (`i`, `j`) starts in `x`, the weights and the output.
            #[inline(always)]
            unsafe fn at(&self, i: usize, j: usize) -> (*const X, *const u8, *mut f32) {
                (
                    self.x.add(i * self.k),
                    self.w.add(j * self.row_bytes),
                    self.out.add(i * self.ldo + j),
                )
            }
        }

        impl<B: Block> Tiles for Fused<f32, B> {
            const TILE: (usize, usize) = $tile;
            #[inline(always)]
            unsafe fn tile<const MI: usize, const NJ: usize>(&self, i: usize, j: usize) {
                let (x, w, out) = self.at(i, j);
                tile::<B, MI, NJ>(x, self.k, w, self.row_bytes, out, self.ldo)
            }
        }

        impl<B: Block> Tiles for Fused<u16, B> {
            const TILE: (usize, usize) = $tile;
            #[inline(always)]
            unsafe fn tile<const MI: usize, const NJ: usize>(&self, i: usize, j: usize) {
                let (x, w, out) = self.at(i, j);
                tile_bf16::<B, MI, NJ>(x, self.k, w, self.row_bytes, out, self.ldo)
            }
        }

        impl<X, B> Fused<X, B> {
            #[allow(clippy::too_many_arguments)]
            #[inline(always)]
            fn new(
                x: &[X],
                k: usize,
                w: &[u8],
                row_bytes: usize,
                out: *mut f32,
                ldo: usize,
            ) -> Self {
                Self {
                    x: x.as_ptr(),
                    k,
                    w: w.as_ptr(),
                    row_bytes,
                    out,
                    ldo,
                    block: PhantomData,
                }
            }
        }

        /// Every tile of `x` (`[m, k]`) against `rows` weight rows, f32 products.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $f32)]
        pub(super) unsafe fn block<B: Block>(
            x: &[f32],
            m: usize,
            k: usize,
            w: &[u8],
            row_bytes: usize,
            rows: usize,
            out: *mut f32,
            ldo: usize,
        ) {
            run_tiles(&Fused::<f32, B>::new(x, k, w, row_bytes, out, ldo), m, rows);
        }

        /// [`block`] with bf16 products (`x` in bf16).
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $bf16)]
        pub(super) unsafe fn block_bf16<B: Block>(
            x: &[u16],
            m: usize,
            k: usize,
            w: &[u8],
            row_bytes: usize,
            rows: usize,
            out: *mut f32,
            ldo: usize,
        ) {
            run_tiles(&Fused::<u16, B>::new(x, k, w, row_bytes, out, ldo), m, rows);
        }

        /// [`tile`] with bf16 products (see [`super::block_bf16`]).
        #[allow(clippy::needless_range_loop)]
        #[inline]
        #[target_feature(enable = $bf16)]
        unsafe fn tile_bf16<B: Block, const MI: usize, const NJ: usize>(
            xp: *const u16,
            k: usize,
            wp: *const u8,
            row_bytes: usize,
            out: *mut f32,
            ldo: usize,
        ) {
            use crate::cpu_bf16::$bf16mod::{dot, load, pack};
            let mut acc = [[_mm512_setzero_ps(); NJ]; MI];
            for blk in 0..k / (32 * B::CHUNKS) {
                for c in 0..B::CHUNKS {
                    prefetch_next_tile::<B>(wp, 0, row_bytes, blk, c);
                    let (lo, hi) = B::expand(wp.add(blk * B::BYTES), c);
                    let mut wv = [pack(lo, hi); NJ];
                    for b in 1..NJ {
                        prefetch_next_tile::<B>(wp, b, row_bytes, blk, c);
                        let (lo, hi) = B::expand(wp.add(b * row_bytes + blk * B::BYTES), c);
                        wv[b] = pack(lo, hi);
                    }
                    let col = (blk * B::CHUNKS + c) * 32;
                    for a in 0..MI {
                        let xv = load(xp.add(a * k + col));
                        for b in 0..NJ {
                            acc[a][b] = dot(acc[a][b], xv, wv[b]);
                        }
                    }
                }
            }
            store_tile(&acc, out, ldo);
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    fused_kernels!(
        "avx512f,f16c",
        "avx512f,f16c,avx512bf16",
        avx512,
        (4, 4),
        true
    );
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::cpu_emu512::*;
    // One weight row per tile: the expanded row's two 16-lane vectors and four rows'
    // accumulators fit AVX2's 16 registers (measured: 4 x 4 tiles spill, 1.4x slower at m = 4).
    fused_kernels!("avx2,fma,f16c", "avx2,fma,f16c", avx2, (4, 1), false);
}

/// The AVX2 instantiation against the AVX-512 one, bit for bit, on random blocks of every type
/// (where this CPU has AVX-512 to compare with).
#[cfg(all(test, target_arch = "x86_64"))]
mod isa_tests {
    use super::super::test_blocks::{random_rows, ALL_BLOCK_TYPES};
    use super::*;
    use crate::cpu_isa::isa_test_support::{both_here, same_bits, values};

    #[test]
    fn avx2_expansion_and_products_equal_avx512() {
        if !both_here(true) {
            return;
        }
        let (rows, k) = (9, 512);
        for (t, dtype) in ALL_BLOCK_TYPES.into_iter().enumerate() {
            let w = random_rows(dtype, rows, k, 7 + t as u64);
            let row_bytes = w.len() / rows;
            let (mut a, mut b) = (vec![0f32; rows * k], vec![1f32; rows * k]);
            // SAFETY: both instruction sets are present; buffers hold whole rows.
            unsafe {
                with_block_type!(true, dtype, dequantize(&w, &mut a));
                with_block_type!(false, dtype, dequantize(&w, &mut b));
            }
            assert!(same_bits(&a, &b), "{dtype:?} expansion");
            for m in 1..=4 {
                let x = values(m * k, 1);
                let (mut a, mut b) = (vec![f32::NAN; m * rows], vec![0f32; m * rows]);
                // SAFETY: as above; outputs are m x rows.
                unsafe {
                    with_block_type!(
                        true,
                        dtype,
                        block(&x, m, k, &w, row_bytes, rows, a.as_mut_ptr(), rows)
                    );
                    with_block_type!(
                        false,
                        dtype,
                        block(&x, m, k, &w, row_bytes, rows, b.as_mut_ptr(), rows)
                    );
                }
                assert!(same_bits(&a, &b), "{dtype:?} m={m}");
                if crate::cpu_bf16::native() {
                    // SAFETY: AVX-512 BF16 is present.
                    let xb = unsafe { crate::cpu_bf16::activations(&x) };
                    let (mut pa, mut pb) = (vec![0u16; rows * k], vec![1u16; rows * k]);
                    // SAFETY: as above.
                    unsafe {
                        with_block_type!(
                            true,
                            dtype,
                            block_bf16(&xb, m, k, &w, row_bytes, rows, a.as_mut_ptr(), rows)
                        );
                        with_block_type!(
                            false,
                            dtype,
                            block_bf16(&xb, m, k, &w, row_bytes, rows, b.as_mut_ptr(), rows)
                        );
                        with_block_type!(true, dtype, dequantize_bf16(&w, &mut pa));
                        with_block_type!(false, dtype, dequantize_bf16(&w, &mut pb));
                    }
                    assert!(same_bits(&a, &b), "{dtype:?} bf16 m={m}");
                    assert_eq!(pa, pb, "{dtype:?} bf16 expansion");
                }
            }
        }
    }
}
