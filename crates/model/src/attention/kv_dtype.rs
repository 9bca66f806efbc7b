//! Element types of the CPU KV cache (`--kv-cache-dtype`): f32, or bf16/f16 at half the bytes.
//! Values are rounded to nearest-even when written and widened exactly when read.

use std::fmt;
use std::str::FromStr;

/// What the CPU cache stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl KvDtype {
    pub fn size_in_bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 | KvDtype::F16 => 2,
        }
    }
}

/// `--kv-cache-dtype` (vLLM's flag): `auto` stores the model's dtype (on the CPU: bf16 under
/// bf16 arithmetic, the default where the CPU has it; f32 otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtypeChoice {
    #[default]
    Auto,
    BFloat16,
    Float16,
    Float32,
}

impl FromStr for KvCacheDtypeChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "bfloat16" | "bf16" => Ok(Self::BFloat16),
            "float16" | "half" | "fp16" | "f16" => Ok(Self::Float16),
            "float32" | "fp32" | "f32" => Ok(Self::Float32),
            f if f.starts_with("fp8") => Err(format!(
                "kv-cache dtype '{f}' is not supported (fp8 caches are not implemented; use auto, bfloat16, float16 or float32)"
            )),
            other => Err(format!(
                "unsupported kv-cache dtype '{other}' (expected auto, bfloat16, float16 or float32)"
            )),
        }
    }
}

impl fmt::Display for KvCacheDtypeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::BFloat16 => "bfloat16",
            Self::Float16 => "float16",
            Self::Float32 => "float32",
        })
    }
}

/// bf16 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

/// IEEE binary16 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16(pub u16);

/// A cache element: rounded from f32 on write, widened to f32 on read.
///
/// # Safety
/// Implementors are plain data whose all-zero bit pattern is the value 0.0: the cache is
/// allocated zeroed and never written before use.
pub unsafe trait KvElem: Copy + Send + Sync + 'static {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    /// 16 consecutive elements at `p` as f32.
    ///
    /// # Safety
    /// `p` is valid for 16 reads; AVX-512F is available.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// [`Self::load16`] for the AVX2 kernels (the same values in `cpu_emu512`'s vector).
    ///
    /// # Safety
    /// `p` is valid for 16 reads; AVX2 and F16C are available.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_avx2(p: *const Self) -> crate::cpu_emu512::__m512;
}

// SAFETY: all-zero bits are 0.0.
unsafe impl KvElem for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_avx2(p: *const Self) -> crate::cpu_emu512::__m512 {
        crate::cpu_emu512::_mm512_loadu_ps(p)
    }
}

// SAFETY: all-zero bits are 0.0.
unsafe impl KvElem for Bf16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        Bf16(crate::cpu_bf16::round_to_bf16(v))
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        crate::cpu_bf16::bf16_to_f32(self.0)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_avx2(p: *const Self) -> crate::cpu_emu512::__m512 {
        use crate::cpu_emu512::*;
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

// SAFETY: all-zero bits are 0.0.
unsafe impl KvElem for F16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        F16(f32_to_f16(v))
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_to_f32(self.0)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_avx2(p: *const Self) -> crate::cpu_emu512::__m512 {
        use crate::cpu_emu512::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// f32 to IEEE half, round to nearest even; overflow gives infinity, NaN stays NaN.
pub fn f32_to_f16(v: f32) -> u16 {
    let x = v.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let exp = ((x >> 23) & 0xff) as i32;
    let man = x & 0x7f_ffff;
    if exp == 0xff {
        let nan = if man != 0 {
            0x200 | (man >> 13) as u16
        } else {
            0
        };
        return sign | 0x7c00 | nan;
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // A subnormal half (or zero): units of 2^-24.
        let shift = (14 - e) as u32; // bits of the 24-bit significand that fall off
        if shift > 24 {
            return sign;
        }
        let m = man | 0x80_0000;
        let q = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        let round = rem > half || (rem == half && q & 1 == 1);
        return sign | (q + round as u32) as u16;
    }
    let q = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    let round = rem > 0x1000 || (rem == 0x1000 && q & 1 == 1);
    // A carry out of the significand correctly bumps the exponent (up to infinity).
    sign | (q + round as u32) as u16
}

/// IEEE half to f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m · 2^-24, normalized for f32.
            let lead = 31 - m.leading_zeros(); // position of the top set bit (0..=9)
            let e = lead + 127 - 24;
            sign | (e << 23) | ((m << (23 - lead)) & 0x7f_ffff)
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<f32> {
        let mut v: Vec<f32> = (0..20000i32)
            .map(|i| {
                let t = i as f32 * 0.7133;
                t.sin() * 10f32.powi(i % 13 - 8)
            })
            .collect();
        v.extend([
            0.0,
            -0.0,
            1.0,
            -1.0,
            65504.0,
            65520.0,
            1e6,
            -1e6,
            6.1e-5,
            5.96e-8,
            2.98e-8,
            1e-9,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ]);
        v
    }

    #[test]
    fn half_round_trips_and_rounds_to_nearest() {
        // Every half widens and narrows back to itself (NaNs aside).
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            if f.is_nan() {
                assert!(f16_to_f32(f32_to_f16(f)).is_nan());
                continue;
            }
            assert_eq!(f32_to_f16(f), h, "{h:#06x} ({f})");
        }
        // Narrowing picks a nearest half.
        for v in samples() {
            let h = f32_to_f16(v);
            let back = f16_to_f32(h) as f64;
            if back.is_infinite() {
                assert!(v.abs() >= 65520.0);
                continue;
            }
            let step = |h: u16| (f16_to_f32(h.wrapping_add(1)) as f64 - back).abs();
            let err = (back - v as f64).abs();
            assert!(err <= step(h) / 2.0 + 1e-30, "{v} -> {back}");
        }
    }

    /// Software rounding matches the CPU's own conversions (F16C and AVX-512 BF16).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn conversions_match_the_instructions() {
        use std::arch::x86_64::*;
        if !std::is_x86_feature_detected!("f16c") {
            return;
        }
        for v in samples() {
            // SAFETY: F16C was detected.
            let hw = unsafe {
                _mm_extract_epi16::<0>(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set1_ps(v)))
                    as u16
            };
            assert_eq!(f32_to_f16(v), hw, "{v}");
            // SAFETY: as above.
            let wide = unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(hw as i16))) };
            assert_eq!(f16_to_f32(hw).to_bits(), wide.to_bits(), "{hw:#06x}");
        }
    }

    #[test]
    fn elements_round_trip_through_the_cache_types() {
        for v in samples() {
            let b = Bf16::from_f32(v).to_f32();
            let h = F16::from_f32(v).to_f32();
            if v.is_finite() {
                assert!(
                    (b as f64 - v as f64).abs() <= (v.abs() as f64) / 256.0,
                    "{v} bf16 {b}"
                );
                if v.abs() < 65504.0 && v.abs() > 6.2e-5 {
                    assert!(
                        (h as f64 - v as f64).abs() <= (v.abs() as f64) / 2048.0,
                        "{v} f16 {h}"
                    );
                }
            }
            assert_eq!(f32::from_f32(v).to_bits(), v.to_bits());
        }
    }
}
