//! Fused elementwise ops for f32 CPU tensors, where candle would make several passes and
//! intermediate tensors. Each computes exactly what the unfused candle ops compute (same
//! formula, same rounding steps), so outputs are bit-identical and the golden test holds
//! either way; other devices and dtypes take the candle ops.

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// `silu(gate) * up` for a `[m, 2 * inter]` tensor holding `gate` then `up` in each row (the
/// fused gate/up projection), as `[m, inter]`. One pass instead of two narrows, a SiLU and a
/// multiply.
pub fn silu_and_mul(gate_up: &Tensor, inter: usize) -> Result<Tensor> {
    gated(gate_up, inter, silu_mul_row, |gate, up| {
        Ok((gate.silu()? * up)?)
    })
}

fn silu_mul_row(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        // candle's SiLU, rounded to f32, then the product.
        let silu = g / (1.0 + (-g).exp());
        *o = silu * u;
    }
}

/// A gated activation over the fused `[m, 2 * inter]` gate/up output: `row` per row on f32 CPU
/// tensors (rows in parallel), otherwise `ops(gate, up)` in candle ops.
fn gated(
    gate_up: &Tensor,
    inter: usize,
    row: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
    ops: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let cpu_f32 = gate_up.device().is_cpu() && gate_up.dtype() == DType::F32;
    if cpu_f32 && gate_up.is_contiguous() {
        let (m, width) = gate_up.dims2()?;
        if width == 2 * inter {
            let (storage, layout) = gate_up.storage_and_layout();
            if let Storage::Cpu(cpu) = &*storage {
                let start = layout.start_offset();
                let data = &cpu.as_slice::<f32>()?[start..start + m * width];
                let mut out = vec![0f32; m * inter];
                out.par_chunks_mut(inter)
                    .zip(data.par_chunks(width))
                    .for_each(|(o, r)| {
                        let (gate, up) = r.split_at(inter);
                        row(o, gate, up);
                    });
                return Ok(Tensor::from_vec(out, (m, inter), gate_up.device())?);
            }
        }
    }
    ops(
        &gate_up.narrow(1, 0, inter)?,
        &gate_up.narrow(1, inter, inter)?,
    )
}

/// `gelu_tanh(gate) * up` (Gemma's GeGLU, `gelu_pytorch_tanh`) for the fused `[m, 2 * inter]`
/// gate/up output, as `[m, inter]`. On f32 CPU tensors one pass over the rows, with
/// `0.5·x·(1 + tanh(u)) = x / (1 + exp(-2u))`, `u = √(2/π)·(x + 0.044715·x³)`, the exponential
/// 16 lanes at a time under AVX-512: within 1e-6 of candle's `gelu` (test below), whose scalar
/// tanh per element cost Gemma a third of its prefill. Elsewhere candle's ops.
pub fn gelu_tanh_and_mul(gate_up: &Tensor, inter: usize) -> Result<Tensor> {
    gated(gate_up, inter, gelu_tanh_mul_row, |gate, up| {
        Ok((gate.gelu()? * up)?)
    })
}

/// gpt-oss's clamped SwiGLU over the fused `[m, 2 * inter]` gate/up output (gate first):
/// `g = min(gate, limit)`, `u = clamp(up, -limit, limit)`, `(u + 1) · g · sigmoid(alpha · g)`,
/// in f32 as transformers computes it, as `[m, inter]`.
pub fn clamped_swiglu(gate_up: &Tensor, inter: usize, alpha: f32, limit: f32) -> Result<Tensor> {
    let row = |out: &mut [f32], gate: &[f32], up: &[f32]| {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            let g = g.min(limit);
            let u = u.clamp(-limit, limit);
            let glu = g * (1.0 / (1.0 + (-(g * alpha)).exp()));
            *o = (u + 1.0) * glu;
        }
    };
    gated(gate_up, inter, row, |gate, up| {
        let dtype = gate.dtype();
        let g = gate.to_dtype(DType::F32)?.minimum(limit)?;
        let u = up.to_dtype(DType::F32)?.clamp(-limit, limit)?;
        let glu = (&g * candle_nn::ops::sigmoid(&(&g * alpha as f64)?)?)?;
        Ok(((u + 1.0)? * glu)?.to_dtype(dtype)?)
    })
}

/// Run `$f($args)` from the vectorized module of the selected instruction set (AVX-512 or
/// AVX2, the same results) and say `true`; `false` below AVX2, where the caller's portable
/// code runs. `$f`'s requirements beyond the instruction set are the caller's to hold.
macro_rules! vectorized {
    ($f:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if crate::cpu_isa::avx512() {
                // SAFETY: AVX-512F was detected (the caller holds the rest).
                unsafe { gelu_avx512::$f($($arg),*) };
                true
            } else if crate::cpu_isa::avx2() {
                // SAFETY: AVX2 with FMA and F16C was detected (the caller holds the rest).
                unsafe { gelu_avx2::$f($($arg),*) };
                true
            } else {
                false
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }};
}

/// Gemma 2's soft-capping in place, `cap · tanh(x / cap)`, with `tanh(y) = 1 - 2 / (exp(2y) + 1)`
/// 16 lanes at a time with AVX2 or AVX-512 (within 4e-7·cap of libm's tanh, test below);
/// candle's per-element tanh made the capped logits of a decode batch cost more than a layer.
pub fn soft_cap(xs: &mut [f32], cap: f32) {
    if vectorized!(soft_cap(xs, cap)) {
        return;
    }
    for x in xs.iter_mut() {
        *x = cap * (*x / cap).tanh();
    }
}

/// [`soft_cap`] over an f32 tensor (other dtypes and devices: candle's ops).
pub fn soft_cap_tensor(x: &Tensor, cap: f64) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let mut data = x.flatten_all()?.to_vec1::<f32>()?;
        data.par_chunks_mut(4096)
            .for_each(|c| soft_cap(c, cap as f32));
        return Ok(Tensor::from_vec(data, x.dims(), x.device())?);
    }
    Ok(((x / cap)?.tanh()? * cap)?)
}

/// √(2/π) and GELU's cubic coefficient.
const GELU_C: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044_715;

fn gelu_tanh_mul_row(out: &mut [f32], gate: &[f32], up: &[f32]) {
    // The kernel's other requirement holds: the three slices have the same length.
    if vectorized!(gelu_tanh_mul(out, gate, up)) {
        return;
    }
    for ((o, &x), &u) in out.iter_mut().zip(gate).zip(up) {
        let inner = GELU_C * (x + GELU_A * x * x * x);
        *o = x / (1.0 + (-2.0 * inner).exp()) * u;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    #[test]
    fn soft_cap_matches_tanh() {
        let xs: Vec<f32> = (0..4003).map(|i| (i as f32 - 2001.0) * 0.1).collect();
        for cap in [3.0f32, 30.0, 50.0] {
            let mut ours = xs.clone();
            soft_cap(&mut ours, cap);
            for (x, y) in xs.iter().zip(&ours) {
                let want = cap * (x / cap).tanh();
                assert!(
                    (y - want).abs() <= 4e-7 * cap,
                    "cap {cap}, {x}: {y} vs {want}"
                );
            }
        }
    }

    #[test]
    fn gelu_tanh_and_mul_matches_candle() {
        let (m, inter) = (3, 4003);
        let data: Vec<f32> = (0..m * 2 * inter)
            .map(|i| ((i * 7919) % 4001) as f32 * 0.02 - 40.0)
            .collect();
        let t = Tensor::from_vec(data, (m, 2 * inter), &Device::Cpu).unwrap();
        let fused: Vec<Vec<f32>> = gelu_tanh_and_mul(&t, inter).unwrap().to_vec2().unwrap();
        let reference: Vec<Vec<f32>> = (t.narrow(1, 0, inter).unwrap().gelu().unwrap()
            * t.narrow(1, inter, inter).unwrap())
        .unwrap()
        .to_vec2()
        .unwrap();
        for (a, b) in fused.iter().flatten().zip(reference.iter().flatten()) {
            assert!((a - b).abs() <= 2e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    use super::*;

    /// The row loop (f32 CPU) and the candle-ops form (other devices and dtypes) of gpt-oss's
    /// clamped SwiGLU agree, both sides of the clamps included.
    #[test]
    fn clamped_swiglu_row_and_candle_forms_agree() {
        let (m, inter) = (3, 40);
        let data: Vec<f32> = (0..m * 2 * inter)
            .map(|i| ((i * 7919) % 401) as f32 * 0.05 - 10.0)
            .collect();
        let t = Tensor::from_vec(data, (m, 2 * inter), &Device::Cpu).unwrap();
        let rows: Vec<Vec<f32>> = clamped_swiglu(&t, inter, 1.702, 7.0)
            .unwrap()
            .to_vec2()
            .unwrap();
        // A transposed view is not contiguous, so it takes the candle form.
        let strided = t.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(!strided.is_contiguous());
        let ops: Vec<Vec<f32>> = clamped_swiglu(&strided, inter, 1.702, 7.0)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (a, b) in rows.iter().flatten().zip(ops.iter().flatten()) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn silu_and_mul_is_bit_identical_to_candle() {
        let (m, inter) = (5, 37);
        let data: Vec<f32> = (0..m * 2 * inter)
            .map(|i| ((i * 7919) % 2001) as f32 / 200.0 - 5.0)
            .collect();
        let t = Tensor::from_vec(data, (m, 2 * inter), &Device::Cpu).unwrap();
        let fused: Vec<Vec<f32>> = silu_and_mul(&t, inter).unwrap().to_vec2().unwrap();
        let reference = (t.narrow(1, 0, inter).unwrap().silu().unwrap()
            * t.narrow(1, inter, inter).unwrap())
        .unwrap();
        assert_eq!(fused, reference.to_vec2::<f32>().unwrap());
    }
}

/// Exact (erf-based) GELU, `0.5·x·(1 + erf(x/√2))`, BERT's `gelu`: with AVX2 or AVX-512 on f32
/// CPU tensors 16 lanes at a time, erf from Abramowitz–Stegun 7.1.26 (|error| ≤ 1.5e-7) and the
/// vectorized `exp`; elsewhere candle's `gelu_erf`. Not bit-identical to candle's libm erf,
/// within 1e-6 of it (test below); the embedding reference test bounds the effect end to end.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    #[cfg(target_arch = "x86_64")]
    {
        let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
        if cpu_f32 && crate::cpu_isa::avx2() {
            let mut data = x.flatten_all()?.to_vec1::<f32>()?;
            data.par_chunks_mut(4096).for_each(|chunk| {
                vectorized!(apply(chunk));
            });
            return Ok(Tensor::from_vec(data, x.dims(), x.device())?);
        }
    }
    Ok(x.gelu_erf()?)
}

/// The vectorized ops, written once against the AVX-512 intrinsics' names and instantiated for
/// AVX-512 and for AVX2 (`cpu_emu512`: identical results).
macro_rules! gelu_kernels {
    ($features:literal, $exp:ident) => {
        use crate::attention::cpu::$exp::exp;

        /// The lane mask of a 16-lane step with `left` elements remaining.
        #[inline(always)]
        fn lanes(left: usize) -> u16 {
            if left >= 16 {
                u16::MAX
            } else {
                (1u16 << left) - 1
            }
        }

        /// In place: `cap · (1 - 2 / (exp(2x / cap) + 1))`.
        ///
        /// # Safety
        /// The CPU has `$features`.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn soft_cap(xs: &mut [f32], cap: f32) {
            let n = xs.len();
            let p = xs.as_mut_ptr();
            let (one, two) = (_mm512_set1_ps(1.0), _mm512_set1_ps(2.0));
            let scale = _mm512_set1_ps(2.0 / cap);
            let capv = _mm512_set1_ps(cap);
            for i in (0..n).step_by(16) {
                let m = lanes(n - i);
                let x = _mm512_maskz_loadu_ps(m, p.add(i));
                let e = exp(_mm512_mul_ps(scale, x));
                let t = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(e, one)));
                _mm512_mask_storeu_ps(p.add(i), m, _mm512_mul_ps(capv, t));
            }
        }

        /// `out = x / (1 + exp(-2u)) * up` over the gate `xs` (see `gelu_tanh_and_mul`).
        ///
        /// # Safety
        /// The CPU has `$features`; the slices must have equal lengths.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn gelu_tanh_mul(out: &mut [f32], xs: &[f32], up: &[f32]) {
            let n = out.len().min(xs.len()).min(up.len());
            let (o, x, u) = (out.as_mut_ptr(), xs.as_ptr(), up.as_ptr());
            let one = _mm512_set1_ps(1.0);
            let c = _mm512_set1_ps(-2.0 * super::GELU_C);
            let a = _mm512_set1_ps(super::GELU_A);
            for i in (0..n).step_by(16) {
                let m = lanes(n - i);
                let xv = _mm512_maskz_loadu_ps(m, x.add(i));
                let cube = _mm512_mul_ps(_mm512_mul_ps(xv, xv), xv);
                let inner = _mm512_fmadd_ps(a, cube, xv);
                let e = exp(_mm512_mul_ps(c, inner));
                let g = _mm512_div_ps(xv, _mm512_add_ps(one, e));
                let y = _mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, u.add(i)));
                _mm512_mask_storeu_ps(o.add(i), m, y);
            }
        }

        /// In place over `xs`.
        ///
        /// # Safety
        /// The CPU has `$features`.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn apply(xs: &mut [f32]) {
            let n = xs.len();
            let p = xs.as_mut_ptr();
            let half = _mm512_set1_ps(0.5);
            let one = _mm512_set1_ps(1.0);
            let inv_sqrt2 = _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2);
            let sign_mask = _mm512_set1_epi32(i32::MIN);
            for i in (0..n).step_by(16) {
                let m = lanes(n - i);
                let x = _mm512_maskz_loadu_ps(m, p.add(i));
                let z = _mm512_mul_ps(x, inv_sqrt2);
                // erf(|z|) = 1 - poly(t)·exp(-z²), t = 1 / (1 + p·|z|); erf is odd.
                let sign = _mm512_and_si512(_mm512_castps_si512(z), sign_mask);
                let a = _mm512_castsi512_ps(_mm512_andnot_si512(sign_mask, _mm512_castps_si512(z)));
                let t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.327_591_1), a, one));
                let mut poly = _mm512_set1_ps(1.061_405_4);
                for c in [-1.453_152_1, 1.421_413_8, -0.284_496_74, 0.254_829_6] {
                    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(c));
                }
                poly = _mm512_mul_ps(poly, t);
                let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
                let erf_abs = _mm512_fnmadd_ps(poly, e, one);
                let erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs), sign));
                let y = _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, erf));
                _mm512_mask_storeu_ps(p.add(i), m, y);
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod gelu_avx512 {
    use std::arch::x86_64::*;
    gelu_kernels!("avx512f", avx512);
}

#[cfg(target_arch = "x86_64")]
mod gelu_avx2 {
    use crate::cpu_emu512::*;
    gelu_kernels!("avx2,fma,f16c", avx2);
}

#[cfg(test)]
mod gelu_tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gelu_erf_matches_candle() {
        let xs: Vec<f32> = (0..4003).map(|i| (i as f32 - 2001.0) * 0.005).collect();
        let t = Tensor::from_vec(xs.clone(), (4003,), &Device::Cpu).unwrap();
        let ours = gelu_erf(&t).unwrap().to_vec1::<f32>().unwrap();
        let theirs = t.gelu_erf().unwrap().to_vec1::<f32>().unwrap();
        for ((x, a), b) in xs.iter().zip(&ours).zip(&theirs) {
            assert!((a - b).abs() <= 1e-6, "gelu({x}): {a} vs {b}");
        }
    }
}

/// The AVX2 instantiation against the AVX-512 one, bit for bit (where this CPU has both).
#[cfg(all(test, target_arch = "x86_64"))]
mod isa_tests {
    use crate::cpu_isa::isa_test_support::{both_here, same_bits};

    #[test]
    fn avx2_ops_equal_avx512() {
        if !both_here(true) {
            return;
        }
        let n = 1001;
        let xs: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) * 0.013).collect();
        let up: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let (mut a, mut b) = (xs.clone(), xs.clone());
        // SAFETY: both instruction sets are present; slices have equal lengths.
        unsafe {
            super::gelu_avx512::apply(&mut a);
            super::gelu_avx2::apply(&mut b);
            assert!(same_bits(&a, &b), "gelu_erf");
            let (mut a, mut b) = (xs.clone(), xs.clone());
            super::gelu_avx512::soft_cap(&mut a, 30.0);
            super::gelu_avx2::soft_cap(&mut b, 30.0);
            assert!(same_bits(&a, &b), "soft_cap");
            let (mut a, mut b) = (vec![0f32; n], vec![1f32; n]);
            super::gelu_avx512::gelu_tanh_mul(&mut a, &xs, &up);
            super::gelu_avx2::gelu_tanh_mul(&mut b, &xs, &up);
            assert!(same_bits(&a, &b), "gelu_tanh_mul");
        }
    }
}
