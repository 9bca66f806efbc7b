//! MXFP4 weights (OCP microscaling FP4, gpt-oss's expert format): blocks of 32 e2m1 values
//! (sign, 2-bit exponent, 1-bit mantissa: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}) sharing one e8m0
//! scale byte (`2^(e - 127)`). Kept as the checkpoint stores them, `*_blocks` (16 bytes per
//! block: byte `j` holds value `2j` in its low nibble and `2j + 1` in its high one) and
//! `*_scales`, a quarter of bf16's bytes. Rows are expanded to f32 a panel at a time inside the
//! matmul (AVX-512: a 16-entry table lookup per nibble vector) and multiplied by the dense f32
//! kernel; every expansion is exactly `lut[nibble] · 2^(e - 127)`, the value transformers'
//! `convert_moe_packed_tensors` produces, so results equal a load-time dequantization's.

use rayon::prelude::*;

use crate::cpu_matmul::{block_f32, OutPtr};
use crate::error::{ModelError, Result};

/// Values per block (and per scale byte).
pub const BLOCK: usize = 32;
/// Bytes of nibbles per block.
const BLOCK_BYTES: usize = BLOCK / 2;

/// e2m1 values by nibble.
const LUT: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// `2^(e - 127)` as f32 (e8m0; 255 is NaN).
fn scale(e: u8) -> f32 {
    match e {
        0 => f32::from_bits(0x0040_0000),
        255 => f32::NAN,
        e => f32::from_bits((e as u32) << 23),
    }
}

/// A `[rows, cols]` MXFP4 matrix, row-major blocks.
#[derive(Clone)]
pub struct Mxfp4Matrix {
    rows: usize,
    cols: usize,
    /// `rows * cols / 2` bytes of nibbles.
    blocks: Vec<u8>,
    /// `rows * cols / 32` e8m0 scales.
    scales: Vec<u8>,
}

impl Mxfp4Matrix {
    /// From a checkpoint's `*_blocks` (`[rows, cols / 32, 16]`) and `*_scales`
    /// (`[rows, cols / 32]`) bytes.
    pub fn new(rows: usize, cols: usize, blocks: Vec<u8>, scales: Vec<u8>) -> Result<Self> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(ModelError::Config(format!(
                "{cols} columns are not whole MXFP4 blocks of {BLOCK}"
            )));
        }
        let n_blocks = rows * cols / BLOCK;
        if blocks.len() != n_blocks * BLOCK_BYTES || scales.len() != n_blocks {
            return Err(ModelError::Config(format!(
                "MXFP4 matrix [{rows}, {cols}] needs {} block bytes and {n_blocks} scales, got {} and {}",
                n_blocks * BLOCK_BYTES,
                blocks.len(),
                scales.len()
            )));
        }
        Ok(Self {
            rows,
            cols,
            blocks,
            scales,
        })
    }

    /// From ggml's `block_mxfp4` rows (a GGUF's type 39: per block one e8m0 byte, then 16
    /// bytes whose low nibbles are values 0..16 and high nibbles values 16..32). The values are
    /// the same (ggml halves the scale and doubles the table); only the nibbles move.
    pub fn from_ggml(rows: usize, cols: usize, ggml: &[u8]) -> Result<Self> {
        const GGML_BLOCK: usize = 1 + BLOCK_BYTES;
        let n_blocks = rows * cols / BLOCK;
        if !cols.is_multiple_of(BLOCK) || ggml.len() != n_blocks * GGML_BLOCK {
            return Err(ModelError::Config(format!(
                "ggml MXFP4 matrix [{rows}, {cols}] needs {} bytes, got {}",
                n_blocks * GGML_BLOCK,
                ggml.len()
            )));
        }
        let mut blocks = Vec::with_capacity(n_blocks * BLOCK_BYTES);
        let mut scales = Vec::with_capacity(n_blocks);
        for b in ggml.chunks_exact(GGML_BLOCK) {
            scales.push(b[0]);
            let qs = &b[1..];
            let value = |i: usize| match i < BLOCK_BYTES {
                true => qs[i] & 0x0F,
                false => qs[i - BLOCK_BYTES] >> 4,
            };
            blocks.extend((0..BLOCK_BYTES).map(|j| value(2 * j) | (value(2 * j + 1) << 4)));
        }
        Self::new(rows, cols, blocks, scales)
    }

    /// Matrices with the same columns stacked along the rows (gate over up); `None` when the
    /// columns differ.
    pub fn concat_rows(parts: &[&Self]) -> Option<Self> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        Some(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            blocks: parts
                .iter()
                .flat_map(|p| p.blocks.iter().copied())
                .collect(),
            scales: parts
                .iter()
                .flat_map(|p| p.scales.iter().copied())
                .collect(),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (what a decode step streams).
    pub fn bytes(&self) -> usize {
        self.blocks.len() + self.scales.len()
    }

    /// The matrix with its rows reordered: row `i` of the result is row `order[i]`.
    pub fn permute_rows(&self, order: &[usize]) -> Result<Self> {
        if order.len() != self.rows || order.iter().any(|&r| r >= self.rows) {
            return Err(ModelError::Config("bad MXFP4 row order".into()));
        }
        let (rb, rs) = (self.cols / 2, self.cols / BLOCK);
        let mut blocks = Vec::with_capacity(self.blocks.len());
        let mut scales = Vec::with_capacity(self.scales.len());
        for &r in order {
            blocks.extend_from_slice(&self.blocks[r * rb..(r + 1) * rb]);
            scales.extend_from_slice(&self.scales[r * rs..(r + 1) * rs]);
        }
        Self::new(self.rows, self.cols, blocks, scales)
    }

    /// Rows `r0 .. r0 + n` as f32 into `out` (`n * cols` values).
    pub fn dequantize_rows(&self, r0: usize, n: usize, out: &mut [f32]) {
        let per_row = self.cols / BLOCK;
        let first = r0 * per_row;
        let blocks = &self.blocks[first * BLOCK_BYTES..(first + n * per_row) * BLOCK_BYTES];
        let scales = &self.scales[first..first + n * per_row];
        let out = &mut out[..n * self.cols];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::cpu_isa::avx512() {
                // SAFETY: the feature was detected; the slices hold whole blocks.
                unsafe { avx512::dequantize(blocks, scales, out) };
                return;
            }
            if crate::cpu_isa::avx2() {
                // SAFETY: as above, for AVX2.
                unsafe { avx2::dequantize(blocks, scales, out) };
                return;
            }
        }
        dequantize_scalar(blocks, scales, out);
    }

    /// The whole matrix as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &mut out);
        out
    }

    /// `x @ selfᵀ` for `x` `[m, cols]`: panels of rows expanded to f32 (8 rows for decode-sized
    /// batches, 32 for prefill, as the other block types) and multiplied by the dense kernel.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        assert_eq!(x.len(), m * k);
        let panel_rows = if m <= 64 { 8 } else { 32 };
        // SAFETY: every panel writes its own columns of all `m` rows, and the panels cover `n`.
        unsafe {
            crate::cpu_matmul::filled_buffer(m * n, |out: OutPtr| {
                (0..n.div_ceil(panel_rows)).into_par_iter().for_each_init(
                    || vec![0f32; panel_rows * k],
                    |scratch, p| {
                        let r0 = p * panel_rows;
                        let rows = panel_rows.min(n - r0);
                        self.dequantize_rows(r0, rows, scratch);
                        let ptr = out;
                        block_f32(x, m, k, &scratch[..rows * k], rows, ptr.0.add(r0), n);
                    },
                )
            })
        }
    }
}

/// The reference expansion, one value at a time.
fn dequantize_scalar(blocks: &[u8], scales: &[u8], out: &mut [f32]) {
    for ((b, &e), o) in blocks
        .chunks_exact(BLOCK_BYTES)
        .zip(scales)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        let s = scale(e);
        for (j, &byte) in b.iter().enumerate() {
            o[2 * j] = LUT[(byte & 15) as usize] * s;
            o[2 * j + 1] = LUT[(byte >> 4) as usize] * s;
        }
    }
}

/// The expansion, written once against the AVX-512 intrinsics' names and instantiated for
/// AVX-512 and for AVX2 (`cpu_emu512`: identical results).
macro_rules! mxfp4_kernels {
    ($features:literal) => {
        use super::{scale, BLOCK, BLOCK_BYTES, LUT};

        /// [`super::dequantize_scalar`] 32 values at a time: nibbles widened to lane indices, looked
        /// up in the table held in one register, scaled, and interleaved back (low nibble first).
        ///
        /// # Safety
        /// The CPU has `$features`; `blocks`, `scales` and `out` hold the same whole blocks.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn dequantize(blocks: &[u8], scales: &[u8], out: &mut [f32]) {
            let lut = _mm512_loadu_ps(LUT.as_ptr());
            let low = _mm512_set1_epi32(15);
            // Output lanes 0..16 take lo[0], hi[0], lo[1], ...; lanes 16..32 continue from 8.
            let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let second =
                _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            for ((b, &e), o) in blocks
                .chunks_exact(BLOCK_BYTES)
                .zip(scales)
                .zip(out.chunks_exact_mut(BLOCK))
            {
                let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.as_ptr() as *const __m128i));
                let s = _mm512_set1_ps(scale(e));
                let lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, low), lut), s);
                let hi =
                    _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32::<4>(bytes), lut), s);
                _mm512_storeu_ps(o.as_mut_ptr(), _mm512_permutex2var_ps(lo, first, hi));
                _mm512_storeu_ps(
                    o.as_mut_ptr().add(16),
                    _mm512_permutex2var_ps(lo, second, hi),
                );
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    mxfp4_kernels!("avx512f");
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::cpu_emu512::*;
    mxfp4_kernels!("avx2,fma,f16c");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_matrix(rows: usize, cols: usize, seed: u64) -> Mxfp4Matrix {
        let mut state = seed;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        };
        let blocks = (0..rows * cols / 2).map(|_| next()).collect();
        // Scales over the whole e8m0 range but NaN, subnormal results included.
        let scales = (0..rows * cols / BLOCK).map(|_| next() % 255).collect();
        Mxfp4Matrix::new(rows, cols, blocks, scales).expect("matrix")
    }

    #[test]
    fn vector_expansion_equals_the_reference_bit_for_bit() {
        let m = random_matrix(7, 96, 3);
        let mut scalar = vec![0f32; 7 * 96];
        dequantize_scalar(&m.blocks, &m.scales, &mut scalar);
        let fast = m.dequantize();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fast), bits(&scalar));
        // Spot values: low nibble first, scale 2^(e - 127).
        let (byte, e) = (m.blocks[0], m.scales[0]);
        let want = LUT[(byte & 15) as usize] * 2f32.powi(e as i32 - 127);
        assert_eq!(scalar[0].to_bits(), want.to_bits());
        assert_eq!(
            scalar[1],
            LUT[(byte >> 4) as usize] * 2f32.powi(e as i32 - 127)
        );
    }

    /// ggml's own `dequantize_row_mxfp4`: doubled integer table, halved e8m0 scale, low
    /// nibbles first.
    fn ggml_reference(ggml: &[u8]) -> Vec<f32> {
        const KVALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];
        let half = |x: u8| match x < 2 {
            true => f32::from_bits(0x0020_0000 << x),
            false => f32::from_bits(((x as u32) - 1) << 23),
        };
        let mut out = Vec::new();
        for b in ggml.chunks_exact(17) {
            let d = half(b[0]);
            let mut y = [0f32; 32];
            for j in 0..16 {
                y[j] = KVALUES[(b[1 + j] & 15) as usize] as f32 * d;
                y[j + 16] = KVALUES[(b[1 + j] >> 4) as usize] as f32 * d;
            }
            out.extend_from_slice(&y);
        }
        out
    }

    #[test]
    fn ggml_blocks_expand_to_ggml_values() {
        let (rows, cols) = (5, 96);
        let mut state = 11u64;
        let ggml: Vec<u8> = (0..rows * cols / 32 * 17)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let b = (state >> 33) as u8;
                // Scale bytes over the whole range but 255 (NaN for OCP, finite for ggml).
                if i % 17 == 0 {
                    b % 255
                } else {
                    b
                }
            })
            .collect();
        let m = Mxfp4Matrix::from_ggml(rows, cols, &ggml).expect("matrix");
        let got = m.dequantize();
        let want = ggml_reference(&ggml);
        // Equal values (ggml's table has +0 where OCP's has -0 for the nibble 8).
        assert!(got.iter().zip(&want).all(|(a, b)| a == b));
        assert!(Mxfp4Matrix::from_ggml(rows, cols, &ggml[1..]).is_err());
        let two = Mxfp4Matrix::concat_rows(&[&m, &m]).expect("same columns");
        assert_eq!(two.rows(), 2 * rows);
        assert_eq!(&two.dequantize()[rows * cols..], got.as_slice());
    }

    #[test]
    fn matmul_equals_the_dense_product_of_the_expansion() {
        let w = random_matrix(40, 64, 5);
        let dense = w.dequantize();
        // Keep the products finite: only moderate scales.
        let w = Mxfp4Matrix::new(
            40,
            64,
            w.blocks.clone(),
            w.scales.iter().map(|s| 120 + s % 10).collect(),
        )
        .expect("matrix");
        let dense_ok = w.dequantize();
        assert_eq!(dense.len(), dense_ok.len());
        for m in [1usize, 3, 70] {
            let x: Vec<f32> = (0..m * 64)
                .map(|i| ((i * 37) % 19) as f32 / 7.0 - 1.2)
                .collect();
            let got = w.matmul(&x, m);
            let mut want = vec![0f32; m * 40];
            crate::cpu_matmul::matmul_xwt(&x, m, 64, &dense_ok, 40, &mut want);
            assert_eq!(got, want, "m = {m}");
        }
        let permuted = w
            .permute_rows(&(0..40).rev().collect::<Vec<_>>())
            .expect("perm");
        assert_eq!(permuted.dequantize()[..64], dense_ok[39 * 64..]);
    }

    #[test]
    fn shapes_that_are_not_whole_blocks_are_refused() {
        assert!(Mxfp4Matrix::new(2, 48, vec![0; 48], vec![0; 3]).is_err());
        assert!(Mxfp4Matrix::new(2, 64, vec![0; 63], vec![0; 4]).is_err());
    }
}

/// The AVX2 instantiation against the AVX-512 one, bit for bit (where this CPU has both).
#[cfg(all(test, target_arch = "x86_64"))]
mod isa_tests {
    use super::*;

    #[test]
    fn avx2_expansion_equals_avx512() {
        if !crate::cpu_isa::isa_test_support::both_here(true) {
            return;
        }
        let n = 40;
        let blocks: Vec<u8> = (0..n * BLOCK_BYTES).map(|i| (i * 73 % 256) as u8).collect();
        let scales: Vec<u8> = (0..n).map(|i| (110 + i % 30) as u8).collect();
        let (mut a, mut b) = (vec![0f32; n * BLOCK], vec![1f32; n * BLOCK]);
        // SAFETY: both instruction sets are present; the slices hold whole blocks.
        unsafe {
            avx512::dequantize(&blocks, &scales, &mut a);
            avx2::dequantize(&blocks, &scales, &mut b);
        }
        assert!(crate::cpu_isa::isa_test_support::same_bits(&a, &b));
    }
}
