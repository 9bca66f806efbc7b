//! The AVX-512 intrinsics the CPU kernels use, implemented with AVX2 (+FMA, F16C) on pairs of
//! 256-bit halves, lane for lane. Each kernel is written once (a `macro_rules!` body) and
//! instantiated twice: against `std::arch` for AVX-512 and against this module for AVX2, so the
//! AVX2 path computes the same operations in the same order — bit-identical results, the same
//! accuracy contract and batch invariance — and an AVX-512 intrinsic a kernel starts to use
//! without an emulation here fails to compile for AVX2 (the vector types are this module's,
//! not `std::arch`'s) instead of running an instruction the CPU lacks.
//!
//! Exactness limits (unit-tested against the real instructions on this machine):
//! - [`_mm512_dpbusd_epi32`] goes through `vpmaddubsw`, which saturates pairs of products at
//!   ±32767: callers keep unsigned weights below 128 (the int8 kernels: at most 63; Q8_0 goes
//!   through [`dpbusd_signed`]).
//! - [`_mm512_scalef_ps`] multiplies by `2^n` built from the exponent field: exact for results
//!   in the normal range (the kernels' `exp` keeps `n >= -126`).
//! - [`_mm512_dpbf16_ps`] does not flush denormal inputs and outputs as `vdpbf16ps` does.
//!
//! Functions take the same arguments as their `std::arch` namesakes (masks as integers,
//! immediates as const generics) and are `#[inline(always)]`: they are only ever called from
//! functions compiled with `avx2,fma,f16c`, into which they and the intrinsics they call inline.
//! No closures here: a closure does not inherit the caller's features, so the intrinsics in it
//! stay calls (measured: the bf16 kernels ran 25x slower).
#![allow(
    non_camel_case_types,
    clippy::missing_safety_doc,
    clippy::too_many_arguments
)]

pub use std::arch::x86_64::*;

/// 16 f32 lanes: lanes 0..8 and 8..16.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct __m512(pub __m256, pub __m256);

/// 64 bytes: bytes 0..32 and 32..64 (any element width).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct __m512i(pub __m256i, pub __m256i);

/// 32 bf16: elements 0..16 and 16..32.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct __m512bh(pub __m256i, pub __m256i);

// ---- masks ----

/// Bits 0..8 of `k` as eight all-ones / all-zeros 32-bit lanes.
#[inline(always)]
unsafe fn lanes8(k: u32) -> __m256i {
    let bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(k as i32), bits), bits)
}

/// A 16-lane mask as lane masks for the two halves.
#[inline(always)]
unsafe fn lanes16(k: u16) -> (__m256i, __m256i) {
    (lanes8(k as u32 & 0xff), lanes8(k as u32 >> 8))
}

/// The 32 bits of `k` as 32 all-ones / all-zeros bytes.
#[inline(always)]
unsafe fn bytes32(k: u32) -> __m256i {
    // Byte j takes byte j / 8 of k, then tests bit j % 8.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(k as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        ),
    );
    let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, bits), bits)
}

/// The 16 bits of `k` as 16 all-ones / all-zeros 16-bit words.
#[inline(always)]
unsafe fn words16(k: u32) -> __m256i {
    let bits = _mm256_setr_epi16(
        1,
        2,
        4,
        8,
        16,
        32,
        64,
        128,
        256,
        512,
        1024,
        2048,
        4096,
        8192,
        16384,
        i16::MIN,
    );
    _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16(k as i16), bits), bits)
}

// ---- f32 ----

#[inline(always)]
pub unsafe fn _mm512_setzero_ps() -> __m512 {
    __m512(_mm256_setzero_ps(), _mm256_setzero_ps())
}

#[inline(always)]
pub unsafe fn _mm512_set1_ps(a: f32) -> __m512 {
    __m512(_mm256_set1_ps(a), _mm256_set1_ps(a))
}

#[inline(always)]
pub unsafe fn _mm512_setr_ps(
    e0: f32,
    e1: f32,
    e2: f32,
    e3: f32,
    e4: f32,
    e5: f32,
    e6: f32,
    e7: f32,
    e8: f32,
    e9: f32,
    e10: f32,
    e11: f32,
    e12: f32,
    e13: f32,
    e14: f32,
    e15: f32,
) -> __m512 {
    __m512(
        _mm256_setr_ps(e0, e1, e2, e3, e4, e5, e6, e7),
        _mm256_setr_ps(e8, e9, e10, e11, e12, e13, e14, e15),
    )
}

#[inline(always)]
pub unsafe fn _mm512_loadu_ps(p: *const f32) -> __m512 {
    __m512(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
}

#[inline(always)]
pub unsafe fn _mm512_storeu_ps(p: *mut f32, a: __m512) {
    _mm256_storeu_ps(p, a.0);
    _mm256_storeu_ps(p.add(8), a.1);
}

/// Masked-off lanes are neither read nor faulted on (as the AVX-512 form).
#[inline(always)]
pub unsafe fn _mm512_maskz_loadu_ps(k: u16, p: *const f32) -> __m512 {
    let (m0, m1) = lanes16(k);
    __m512(
        _mm256_maskload_ps(p, m0),
        _mm256_maskload_ps(p.wrapping_add(8), m1),
    )
}

#[inline(always)]
pub unsafe fn _mm512_mask_storeu_ps(p: *mut f32, k: u16, a: __m512) {
    let (m0, m1) = lanes16(k);
    _mm256_maskstore_ps(p, m0, a.0);
    _mm256_maskstore_ps(p.wrapping_add(8), m1, a.1);
}

macro_rules! binary_ps {
    ($($name:ident => $half:ident),+) => {$(
        #[inline(always)]
        pub unsafe fn $name(a: __m512, b: __m512) -> __m512 {
            __m512($half(a.0, b.0), $half(a.1, b.1))
        }
    )+};
}

binary_ps!(
    _mm512_add_ps => _mm256_add_ps,
    _mm512_sub_ps => _mm256_sub_ps,
    _mm512_mul_ps => _mm256_mul_ps,
    _mm512_div_ps => _mm256_div_ps,
    _mm512_max_ps => _mm256_max_ps
);

#[inline(always)]
pub unsafe fn _mm512_fmadd_ps(a: __m512, b: __m512, c: __m512) -> __m512 {
    __m512(
        _mm256_fmadd_ps(a.0, b.0, c.0),
        _mm256_fmadd_ps(a.1, b.1, c.1),
    )
}

#[inline(always)]
pub unsafe fn _mm512_fnmadd_ps(a: __m512, b: __m512, c: __m512) -> __m512 {
    __m512(
        _mm256_fnmadd_ps(a.0, b.0, c.0),
        _mm256_fnmadd_ps(a.1, b.1, c.1),
    )
}

/// Lanes of `b` where `k` is set, of `a` elsewhere.
#[inline(always)]
pub unsafe fn _mm512_mask_blend_ps(k: u16, a: __m512, b: __m512) -> __m512 {
    let (m0, m1) = lanes16(k);
    __m512(
        _mm256_blendv_ps(a.0, b.0, _mm256_castsi256_ps(m0)),
        _mm256_blendv_ps(a.1, b.1, _mm256_castsi256_ps(m1)),
    )
}

#[inline(always)]
pub unsafe fn _mm512_mask_add_ps(src: __m512, k: u16, a: __m512, b: __m512) -> __m512 {
    _mm512_mask_blend_ps(k, src, _mm512_add_ps(a, b))
}

#[inline(always)]
pub unsafe fn _mm512_mask_max_ps(src: __m512, k: u16, a: __m512, b: __m512) -> __m512 {
    _mm512_mask_blend_ps(k, src, _mm512_max_ps(a, b))
}

/// The sum of the 16 lanes in the order `_mm512_reduce_add_ps` takes: halves, then quarters,
/// then pairs (a tree).
#[inline(always)]
pub unsafe fn _mm512_reduce_add_ps(a: __m512) -> f32 {
    let v = _mm256_add_ps(a.0, a.1);
    let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(v, _mm_shuffle_ps::<1>(v, v)))
}

#[inline(always)]
pub unsafe fn _mm512_reduce_max_ps(a: __m512) -> f32 {
    let v = _mm256_max_ps(a.0, a.1);
    let v = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let v = _mm_max_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_max_ss(v, _mm_shuffle_ps::<1>(v, v)))
}

#[inline(always)]
pub unsafe fn _mm512_broadcastss_ps(a: __m128) -> __m512 {
    let v = _mm256_broadcastss_ps(a);
    __m512(v, v)
}

/// The upper 12 lanes are zero (undefined in the AVX-512 form).
#[inline(always)]
pub unsafe fn _mm512_castps128_ps512(a: __m128) -> __m512 {
    __m512(
        _mm256_insertf128_ps::<0>(_mm256_setzero_ps(), a),
        _mm256_setzero_ps(),
    )
}

#[inline(always)]
pub unsafe fn _mm512_castps_si512(a: __m512) -> __m512i {
    __m512i(_mm256_castps_si256(a.0), _mm256_castps_si256(a.1))
}

#[inline(always)]
pub unsafe fn _mm512_castsi512_ps(a: __m512i) -> __m512 {
    __m512(_mm256_castsi256_ps(a.0), _mm256_castsi256_ps(a.1))
}

#[inline(always)]
pub unsafe fn _mm512_cvtepi32_ps(a: __m512i) -> __m512 {
    __m512(_mm256_cvtepi32_ps(a.0), _mm256_cvtepi32_ps(a.1))
}

/// 16 halfs to f32 (exact).
#[inline(always)]
pub unsafe fn _mm512_cvtph_ps(a: __m256i) -> __m512 {
    __m512(
        _mm256_cvtph_ps(_mm256_castsi256_si128(a)),
        _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(a)),
    )
}

/// Lane `idx[i] & 15` of `a` into lane `i`.
#[inline(always)]
pub unsafe fn _mm512_permutexvar_ps(idx: __m512i, a: __m512) -> __m512 {
    __m512(permute16(a, idx.0), permute16(a, idx.1))
}

/// Eight lanes picked from the 16 of `a` by the low 4 bits of `i`.
#[inline(always)]
unsafe fn permute16(a: __m512, i: __m256i) -> __m256 {
    let lo = _mm256_permutevar8x32_ps(a.0, i);
    let hi = _mm256_permutevar8x32_ps(a.1, i);
    // Bit 3 of the index picks the upper half.
    _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32::<28>(i)))
}

/// Lane `idx[i] & 31` of the 32 lanes `a`, `b` into lane `i`.
#[inline(always)]
pub unsafe fn _mm512_permutex2var_ps(a: __m512, idx: __m512i, b: __m512) -> __m512 {
    let from_a = _mm512_permutexvar_ps(idx, a);
    let from_b = _mm512_permutexvar_ps(idx, b);
    // Bit 4 of the index picks `b`.
    __m512(
        _mm256_blendv_ps(
            from_a.0,
            from_b.0,
            _mm256_castsi256_ps(_mm256_slli_epi32::<27>(idx.0)),
        ),
        _mm256_blendv_ps(
            from_a.1,
            from_b.1,
            _mm256_castsi256_ps(_mm256_slli_epi32::<27>(idx.1)),
        ),
    )
}

/// Rounding to an integer value; `IMM` is a rounding mode without a scale (upper bits zero).
#[inline(always)]
pub unsafe fn _mm512_roundscale_ps<const IMM: i32>(a: __m512) -> __m512 {
    const { assert!(IMM >> 4 == 0, "no scaled rounding in the AVX2 form") };
    __m512(_mm256_round_ps::<IMM>(a.0), _mm256_round_ps::<IMM>(a.1))
}

/// `a · 2^floor(b)`, for results in the normal range (see the module notes).
#[inline(always)]
pub unsafe fn _mm512_scalef_ps(a: __m512, b: __m512) -> __m512 {
    __m512(_mm256_mul_ps(a.0, pow2(b.0)), _mm256_mul_ps(a.1, pow2(b.1)))
}

/// `2^floor(n)` for `n` in -126..=127.
#[inline(always)]
unsafe fn pow2(n: __m256) -> __m256 {
    let n = _mm256_cvtps_epi32(_mm256_floor_ps(n));
    let n = _mm256_max_epi32(n, _mm256_set1_epi32(-126));
    let n = _mm256_min_epi32(n, _mm256_set1_epi32(127));
    _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        n,
        _mm256_set1_epi32(127),
    )))
}

// ---- integers ----

#[inline(always)]
pub unsafe fn _mm512_setzero_si512() -> __m512i {
    __m512i(_mm256_setzero_si256(), _mm256_setzero_si256())
}

#[inline(always)]
pub unsafe fn _mm512_set1_epi32(a: i32) -> __m512i {
    __m512i(_mm256_set1_epi32(a), _mm256_set1_epi32(a))
}

#[inline(always)]
pub unsafe fn _mm512_set1_epi16(a: i16) -> __m512i {
    __m512i(_mm256_set1_epi16(a), _mm256_set1_epi16(a))
}

#[inline(always)]
pub unsafe fn _mm512_set1_epi8(a: i8) -> __m512i {
    __m512i(_mm256_set1_epi8(a), _mm256_set1_epi8(a))
}

#[inline(always)]
pub unsafe fn _mm512_setr_epi32(
    e0: i32,
    e1: i32,
    e2: i32,
    e3: i32,
    e4: i32,
    e5: i32,
    e6: i32,
    e7: i32,
    e8: i32,
    e9: i32,
    e10: i32,
    e11: i32,
    e12: i32,
    e13: i32,
    e14: i32,
    e15: i32,
) -> __m512i {
    __m512i(
        _mm256_setr_epi32(e0, e1, e2, e3, e4, e5, e6, e7),
        _mm256_setr_epi32(e8, e9, e10, e11, e12, e13, e14, e15),
    )
}

#[inline(always)]
pub unsafe fn _mm512_loadu_si512(p: *const __m512i) -> __m512i {
    let p = p as *const __m256i;
    __m512i(_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)))
}

#[inline(always)]
pub unsafe fn _mm512_storeu_si512(p: *mut __m512i, a: __m512i) {
    let p = p as *mut __m256i;
    _mm256_storeu_si256(p, a.0);
    _mm256_storeu_si256(p.add(1), a.1);
}

macro_rules! binary_si {
    ($($name:ident => $half:ident),+) => {$(
        #[inline(always)]
        pub unsafe fn $name(a: __m512i, b: __m512i) -> __m512i {
            __m512i($half(a.0, b.0), $half(a.1, b.1))
        }
    )+};
}

binary_si!(
    _mm512_and_si512 => _mm256_and_si256,
    _mm512_andnot_si512 => _mm256_andnot_si256,
    _mm512_or_si512 => _mm256_or_si256,
    _mm512_xor_si512 => _mm256_xor_si256,
    _mm512_sub_epi32 => _mm256_sub_epi32,
    _mm512_add_epi32 => _mm256_add_epi32,
    _mm512_srlv_epi32 => _mm256_srlv_epi32
);

/// Shifts by an immediate, through the shift-by-register forms (same results).
macro_rules! shift_imm {
    ($($name:ident => $half:ident),+) => {$(
        #[inline(always)]
        pub unsafe fn $name<const IMM8: u32>(a: __m512i) -> __m512i {
            let count = _mm_cvtsi32_si128(IMM8 as i32);
            __m512i($half(a.0, count), $half(a.1, count))
        }
    )+};
}

shift_imm!(
    _mm512_srli_epi32 => _mm256_srl_epi32,
    _mm512_slli_epi32 => _mm256_sll_epi32,
    _mm512_srli_epi16 => _mm256_srl_epi16,
    _mm512_slli_epi16 => _mm256_sll_epi16
);

#[inline(always)]
pub unsafe fn _mm512_srl_epi32(a: __m512i, count: __m128i) -> __m512i {
    __m512i(_mm256_srl_epi32(a.0, count), _mm256_srl_epi32(a.1, count))
}

/// Each 16-bit word shifted right by its own count (AVX2 has 32-bit variable shifts only:
/// the low and high words of each dword go separately).
#[inline(always)]
pub unsafe fn _mm512_srlv_epi16(a: __m512i, count: __m512i) -> __m512i {
    __m512i(srlv16(a.0, count.0), srlv16(a.1, count.1))
}

#[inline(always)]
unsafe fn srlv16(a: __m256i, c: __m256i) -> __m256i {
    let low = _mm256_set1_epi32(0xffff);
    let lo = _mm256_srlv_epi32(_mm256_and_si256(a, low), _mm256_and_si256(c, low));
    let hi = _mm256_andnot_si256(low, _mm256_srlv_epi32(a, _mm256_srli_epi32::<16>(c)));
    _mm256_or_si256(lo, hi)
}

#[inline(always)]
pub unsafe fn _mm512_cvtepu8_epi32(a: __m128i) -> __m512i {
    __m512i(
        _mm256_cvtepu8_epi32(a),
        _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(a)),
    )
}

#[inline(always)]
pub unsafe fn _mm512_cvtepi8_epi32(a: __m128i) -> __m512i {
    __m512i(
        _mm256_cvtepi8_epi32(a),
        _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(a)),
    )
}

#[inline(always)]
pub unsafe fn _mm512_cvtepu16_epi32(a: __m256i) -> __m512i {
    __m512i(
        _mm256_cvtepu16_epi32(_mm256_castsi256_si128(a)),
        _mm256_cvtepu16_epi32(_mm256_extracti128_si256::<1>(a)),
    )
}

/// The upper half is zero (undefined in the AVX-512 form).
#[inline(always)]
pub unsafe fn _mm512_castsi256_si512(a: __m256i) -> __m512i {
    __m512i(a, _mm256_setzero_si256())
}

#[inline(always)]
pub unsafe fn _mm512_inserti64x4<const IMM8: i32>(a: __m512i, b: __m256i) -> __m512i {
    if IMM8 & 1 == 0 {
        __m512i(b, a.1)
    } else {
        __m512i(a.0, b)
    }
}

#[inline(always)]
pub unsafe fn _mm512_broadcast_i64x4(a: __m256i) -> __m512i {
    __m512i(a, a)
}

/// 128-bit lanes 0, 1 of the result from `a`, 2, 3 from `b`, each picked by two bits of `MASK`.
#[inline(always)]
pub unsafe fn _mm512_shuffle_i64x2<const MASK: i32>(a: __m512i, b: __m512i) -> __m512i {
    __m512i(
        _mm256_set_m128i(lane128(a, MASK >> 2), lane128(a, MASK)),
        _mm256_set_m128i(lane128(b, MASK >> 6), lane128(b, MASK >> 4)),
    )
}

/// 128-bit lane `sel & 3` of `v`.
#[inline(always)]
unsafe fn lane128(v: __m512i, sel: i32) -> __m128i {
    match sel & 3 {
        0 => _mm256_castsi256_si128(v.0),
        1 => _mm256_extracti128_si256::<1>(v.0),
        2 => _mm256_castsi256_si128(v.1),
        _ => _mm256_extracti128_si256::<1>(v.1),
    }
}

/// `a | b` in the 32-bit lanes where `k` is set, `src` elsewhere.
#[inline(always)]
pub unsafe fn _mm512_mask_or_epi32(src: __m512i, k: u16, a: __m512i, b: __m512i) -> __m512i {
    let (m0, m1) = lanes16(k);
    let or = _mm512_or_si512(a, b);
    __m512i(
        _mm256_blendv_epi8(src.0, or.0, m0),
        _mm256_blendv_epi8(src.1, or.1, m1),
    )
}

/// The bytes of `a` where `k` is set, zero elsewhere.
#[inline(always)]
pub unsafe fn _mm512_maskz_mov_epi8(k: u64, a: __m512i) -> __m512i {
    __m512i(
        _mm256_and_si256(a.0, bytes32(k as u32)),
        _mm256_and_si256(a.1, bytes32((k >> 32) as u32)),
    )
}

/// 16-bit words of `b` where `k` is set, of `a` elsewhere.
#[inline(always)]
pub unsafe fn _mm512_mask_blend_epi16(k: u32, a: __m512i, b: __m512i) -> __m512i {
    __m512i(
        _mm256_blendv_epi8(a.0, b.0, words16(k & 0xffff)),
        _mm256_blendv_epi8(a.1, b.1, words16(k >> 16)),
    )
}

/// A mask of the bytes where `a & b` is not zero (AVX-512 BW/VL's 256-bit form).
#[inline(always)]
pub unsafe fn _mm256_test_epi8_mask(a: __m256i, b: __m256i) -> u32 {
    let zero = _mm256_cmpeq_epi8(_mm256_and_si256(a, b), _mm256_setzero_si256());
    !(_mm256_movemask_epi8(zero) as u32)
}

/// `src` plus, per 32-bit lane, the four products of unsigned bytes of `a` and signed bytes of
/// `b`: exact while every pair of products stays within ±32767 (`vpmaddubsw` saturates).
#[inline(always)]
pub unsafe fn _mm512_dpbusd_epi32(src: __m512i, a: __m512i, b: __m512i) -> __m512i {
    __m512i(dpbusd8(src.0, a.0, b.0), dpbusd8(src.1, a.1, b.1))
}

#[inline(always)]
unsafe fn dpbusd8(s: __m256i, a: __m256i, b: __m256i) -> __m256i {
    let pairs = _mm256_maddubs_epi16(a, b);
    _mm256_add_epi32(s, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

/// `src` plus, per 32-bit lane, the four products of the signed bytes `w` and `x`, as
/// `vpmaddubsw(|w|, sign(x, w))`: exact (a pair of products is at most 2 · 128 · 127).
#[inline(always)]
pub unsafe fn dpbusd_signed(src: __m512i, w: __m512i, x: __m512i) -> __m512i {
    __m512i(
        dpbusd8(src.0, _mm256_abs_epi8(w.0), _mm256_sign_epi8(x.0, w.0)),
        dpbusd8(src.1, _mm256_abs_epi8(w.1), _mm256_sign_epi8(x.1, w.1)),
    )
}

// ---- bf16 ----

/// 8 f32 rounded to bf16 (nearest, ties to even; NaN stays a quiet NaN), in the low 16 bits
/// of each lane.
#[inline(always)]
unsafe fn round_bf16(v: __m256) -> __m256i {
    let bits = _mm256_castps_si256(v);
    let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(
        bits,
        _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)),
    ));
    let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(0x40));
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    _mm256_blendv_epi8(rounded, quiet, nan)
}

/// 32 f32 rounded to bf16: `b`'s 16 first, then `a`'s.
#[inline(always)]
pub unsafe fn _mm512_cvtne2ps_pbh(a: __m512, b: __m512) -> __m512bh {
    __m512bh(pack_bf16(b.0, b.1), pack_bf16(a.0, a.1))
}

/// 16 f32 (`x` then `y`) rounded to 16 bf16 in order.
#[inline(always)]
unsafe fn pack_bf16(x: __m256, y: __m256) -> __m256i {
    // packus interleaves 128-bit lanes: [x0..4, y0..4, x4..8, y4..8] -> reorder.
    let p = _mm256_packus_epi32(round_bf16(x), round_bf16(y));
    _mm256_permute4x64_epi64::<0b11_01_10_00>(p)
}

/// Per lane: `src` plus the products of the bf16 pair (elements `2i`, `2i + 1`) of `a` and
/// `b`, the odd element's product added first (the instruction's order); bf16 products are
/// exact in f32, so each step is an FMA.
#[inline(always)]
pub unsafe fn _mm512_dpbf16_ps(src: __m512, a: __m512bh, b: __m512bh) -> __m512 {
    __m512(dpbf16_8(src.0, a.0, b.0), dpbf16_8(src.1, a.1, b.1))
}

#[inline(always)]
unsafe fn dpbf16_8(s: __m256, a: __m256i, b: __m256i) -> __m256 {
    let s = _mm256_fmadd_ps(bf16_odd(a), bf16_odd(b), s);
    _mm256_fmadd_ps(bf16_even(a), bf16_even(b), s)
}

/// The odd bf16 of each pair as f32 (exact).
#[inline(always)]
unsafe fn bf16_odd(v: __m256i) -> __m256 {
    _mm256_castsi256_ps(_mm256_and_si256(
        v,
        _mm256_set1_epi32(0xffff_0000u32 as i32),
    ))
}

/// The even bf16 of each pair as f32 (exact).
#[inline(always)]
unsafe fn bf16_even(v: __m256i) -> __m256 {
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v))
}

#[cfg(test)]
mod tests {
    //! Each emulation against the AVX-512 instruction it stands for, on random operands (run
    //! where the CPU has AVX-512; the AVX2 kernels' tests then compare whole kernels).
    use std::arch::x86_64 as real;

    use super::*;

    fn have_avx512() -> bool {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx512bf16")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Finite f32 of varied magnitude (no denormals).
        fn f32(&mut self) -> f32 {
            let m = (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            m * (2f32).powi((self.next() % 40) as i32 - 20)
        }
        fn bytes(&mut self) -> [u8; 64] {
            let mut b = [0u8; 64];
            b.iter_mut().for_each(|v| *v = self.next() as u8);
            b
        }
    }

    fn floats(r: &mut Rng) -> [f32; 16] {
        let mut a = [0f32; 16];
        a.iter_mut().for_each(|v| *v = r.f32());
        a
    }

    unsafe fn emu_ps(a: &[f32; 16]) -> __m512 {
        _mm512_loadu_ps(a.as_ptr())
    }
    unsafe fn real_ps(a: &[f32; 16]) -> real::__m512 {
        real::_mm512_loadu_ps(a.as_ptr())
    }
    unsafe fn emu_out(v: __m512) -> [u32; 16] {
        std::mem::transmute::<__m512, [u32; 16]>(v)
    }
    unsafe fn real_out(v: real::__m512) -> [u32; 16] {
        std::mem::transmute::<real::__m512, [u32; 16]>(v)
    }
    unsafe fn emu_i(b: &[u8; 64]) -> __m512i {
        std::mem::transmute::<[u8; 64], __m512i>(*b)
    }
    unsafe fn real_i(b: &[u8; 64]) -> real::__m512i {
        std::mem::transmute::<[u8; 64], real::__m512i>(*b)
    }
    unsafe fn emu_iout(v: __m512i) -> [u8; 64] {
        std::mem::transmute::<__m512i, [u8; 64]>(v)
    }
    unsafe fn real_iout(v: real::__m512i) -> [u8; 64] {
        std::mem::transmute::<real::__m512i, [u8; 64]>(v)
    }

    #[test]
    fn float_operations_match_avx512_bit_for_bit() {
        if !have_avx512() {
            eprintln!("skipped: no AVX-512 to compare with");
            return;
        }
        let mut r = Rng(0x1234_5678_9abc_def1);
        for _ in 0..2000 {
            let (a, b, c) = (floats(&mut r), floats(&mut r), floats(&mut r));
            let k = r.next() as u16;
            // SAFETY: the features were detected.
            unsafe {
                let (ea, eb, ec) = (emu_ps(&a), emu_ps(&b), emu_ps(&c));
                let (ra, rb, rc) = (real_ps(&a), real_ps(&b), real_ps(&c));
                macro_rules! same {
                    ($e:expr, $r:expr) => {
                        assert_eq!(emu_out($e), real_out($r), "{}", stringify!($e))
                    };
                }
                same!(_mm512_add_ps(ea, eb), real::_mm512_add_ps(ra, rb));
                same!(
                    _mm512_fmadd_ps(ea, eb, ec),
                    real::_mm512_fmadd_ps(ra, rb, rc)
                );
                same!(
                    _mm512_fnmadd_ps(ea, eb, ec),
                    real::_mm512_fnmadd_ps(ra, rb, rc)
                );
                same!(_mm512_div_ps(ea, eb), real::_mm512_div_ps(ra, rb));
                same!(
                    _mm512_mask_add_ps(ec, k, ea, eb),
                    real::_mm512_mask_add_ps(rc, k, ra, rb)
                );
                same!(
                    _mm512_mask_max_ps(ec, k, ea, eb),
                    real::_mm512_mask_max_ps(rc, k, ra, rb)
                );
                same!(
                    _mm512_mask_blend_ps(k, ea, eb),
                    real::_mm512_mask_blend_ps(k, ra, rb)
                );
                assert_eq!(
                    _mm512_reduce_add_ps(ea).to_bits(),
                    real::_mm512_reduce_add_ps(ra).to_bits()
                );
                assert_eq!(_mm512_reduce_max_ps(ea), real::_mm512_reduce_max_ps(ra));
                let idx = r.bytes();
                same!(
                    _mm512_permutexvar_ps(emu_i(&idx), ea),
                    real::_mm512_permutexvar_ps(real_i(&idx), ra)
                );
                same!(
                    _mm512_permutex2var_ps(ea, emu_i(&idx), eb),
                    real::_mm512_permutex2var_ps(ra, real_i(&idx), rb)
                );
                const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
                let big = _mm512_mul_ps(ea, _mm512_set1_ps(1e6));
                let rbig = real::_mm512_mul_ps(ra, real::_mm512_set1_ps(1e6));
                same!(
                    _mm512_roundscale_ps::<NEAREST>(big),
                    real::_mm512_roundscale_ps::<NEAREST>(rbig)
                );
                // scalef with the exponents the kernels' exp produces (-126..=0).
                let n: [f32; 16] = std::array::from_fn(|_| -((r.next() % 127) as f32));
                same!(
                    _mm512_scalef_ps(ea, emu_ps(&n)),
                    real::_mm512_scalef_ps(ra, real_ps(&n))
                );
                let mut got = [f32::NAN; 16];
                let mut want = [f32::NAN; 16];
                _mm512_mask_storeu_ps(got.as_mut_ptr(), k, _mm512_maskz_loadu_ps(k, a.as_ptr()));
                real::_mm512_mask_storeu_ps(
                    want.as_mut_ptr(),
                    k,
                    real::_mm512_maskz_loadu_ps(k, a.as_ptr()),
                );
                assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits));
            }
        }
    }

    #[test]
    fn integer_operations_match_avx512_bit_for_bit() {
        if !have_avx512() {
            eprintln!("skipped: no AVX-512 to compare with");
            return;
        }
        let mut r = Rng(0x0fed_cba9_8765_4321);
        for _ in 0..2000 {
            let (a, b) = (r.bytes(), r.bytes());
            let k = r.next();
            // SAFETY: the features were detected.
            unsafe {
                let (ea, eb, ra, rb) = (emu_i(&a), emu_i(&b), real_i(&a), real_i(&b));
                macro_rules! same {
                    ($e:expr, $r:expr) => {
                        assert_eq!(emu_iout($e), real_iout($r), "{}", stringify!($e))
                    };
                }
                same!(
                    _mm512_mask_or_epi32(ea, k as u16, eb, ea),
                    real::_mm512_mask_or_epi32(ra, k as u16, rb, ra)
                );
                same!(
                    _mm512_maskz_mov_epi8(k, ea),
                    real::_mm512_maskz_mov_epi8(k, ra)
                );
                same!(
                    _mm512_mask_blend_epi16(k as u32, ea, eb),
                    real::_mm512_mask_blend_epi16(k as u32, ra, rb)
                );
                let counts = _mm512_and_si512(eb, _mm512_set1_epi16(15));
                let rcounts = real::_mm512_and_si512(rb, real::_mm512_set1_epi16(15));
                same!(
                    _mm512_srlv_epi16(ea, counts),
                    real::_mm512_srlv_epi16(ra, rcounts)
                );
                same!(
                    _mm512_shuffle_i64x2::<0b11_01_10_00>(ea, eb),
                    real::_mm512_shuffle_i64x2::<0b11_01_10_00>(ra, rb)
                );
                same!(
                    _mm512_shuffle_i64x2::<0b01_10_00_11>(ea, eb),
                    real::_mm512_shuffle_i64x2::<0b01_10_00_11>(ra, rb)
                );
                same!(_mm512_srli_epi16::<4>(ea), real::_mm512_srli_epi16::<4>(ra));
                same!(_mm512_slli_epi32::<2>(ea), real::_mm512_slli_epi32::<2>(ra));
                let lo = _mm256_loadu_si256(a.as_ptr() as *const __m256i);
                let h = _mm256_loadu_si256(b.as_ptr() as *const __m256i);
                same!(_mm512_cvtepu16_epi32(lo), real::_mm512_cvtepu16_epi32(lo));
                let l128 = _mm256_castsi256_si128(lo);
                same!(_mm512_cvtepi8_epi32(l128), real::_mm512_cvtepi8_epi32(l128));
                same!(_mm512_cvtepu8_epi32(l128), real::_mm512_cvtepu8_epi32(l128));
                assert_eq!(
                    _mm256_test_epi8_mask(lo, h),
                    real::_mm256_test_epi8_mask(lo, h)
                );
                // Unsigned bytes below 64 (the int8 kernels' widest weights, Q6_K).
                let small = _mm512_and_si512(ea, _mm512_set1_epi8(63));
                let rsmall = real::_mm512_and_si512(ra, real::_mm512_set1_epi8(63));
                let src = _mm512_set1_epi32(-12345);
                let rsrc = real::_mm512_set1_epi32(-12345);
                same!(
                    _mm512_dpbusd_epi32(src, small, eb),
                    real::_mm512_dpbusd_epi32(rsrc, rsmall, rb)
                );
            }
        }
    }

    #[test]
    fn bf16_operations_match_avx512_bit_for_bit() {
        if !have_avx512() {
            eprintln!("skipped: no AVX-512 to compare with");
            return;
        }
        let mut r = Rng(0x5555_aaaa_1234_4321);
        for _ in 0..2000 {
            let (a, b, c, d) = (
                floats(&mut r),
                floats(&mut r),
                floats(&mut r),
                floats(&mut r),
            );
            let acc = floats(&mut r);
            // SAFETY: the features were detected.
            unsafe {
                let e1 = _mm512_cvtne2ps_pbh(emu_ps(&a), emu_ps(&b));
                let r1 = real::_mm512_cvtne2ps_pbh(real_ps(&a), real_ps(&b));
                assert_eq!(
                    std::mem::transmute::<__m512bh, [u16; 32]>(e1),
                    std::mem::transmute::<real::__m512bh, [u16; 32]>(r1)
                );
                let e2 = _mm512_cvtne2ps_pbh(emu_ps(&c), emu_ps(&d));
                let r2 = real::_mm512_cvtne2ps_pbh(real_ps(&c), real_ps(&d));
                assert_eq!(
                    emu_out(_mm512_dpbf16_ps(emu_ps(&acc), e1, e2)),
                    real_out(real::_mm512_dpbf16_ps(real_ps(&acc), r1, r2))
                );
            }
        }
    }
}
