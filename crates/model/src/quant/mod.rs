//! GGUF block-quantized weight matrices kept quantized in memory and dequantized a few rows at a
//! time inside the matmul. Decode on a CPU is limited by how many weight bytes stream from
//! memory per token; Q4_1 moves 5x fewer than f32. Rows are dequantized with the same routine
//! (candle's `to_float`) that a full dequantization at load would use, and then multiplied by
//! the same f32 kernel, so results are bit-identical to the dequantized-f32 path — the golden
//! test holds for both.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

use crate::cpu_bf16::{self, CpuArithmetic};
use crate::cpu_matmul::{block_f32, OutPtr};
use crate::cpu_tiles::par_row_ranges;
use crate::error::{ModelError, Result};

/// Run `$body` with `$T` bound to `$module::<Type>` for the block type `$dtype`, one of
/// `$types` (the `GgmlDType` variants, which the kernel modules name their types after).
#[cfg(target_arch = "x86_64")]
macro_rules! dispatch_block_type {
    ($dtype:expr, $module:ident, $T:ident => $body:expr; $($t:ident),+) => {
        match $dtype {
            $(GgmlDType::$t => {
                type $T = $module::$t;
                $body
            })+
            _ => unreachable!("no kernel for this block type"),
        }
    };
}

mod fused;
pub mod int8;
pub mod mxfp4;
mod pages;

use pages::WeightBytes;

/// Weight rows dequantized together for decode-sized batches (up to 64 rows of `x`): 8 rows of
/// a 576-wide matrix (18 KiB of f32) stay in L1 while the batch passes over them (measured:
/// +8 % batch-32 decode throughput over 32-row panels, which spill to L2).
const PANEL_ROWS_DECODE: usize = 8;
/// Panel rows for prefill-sized batches, where re-streaming `x` for every panel costs more
/// (measured: 32-row panels prefill 1400 tokens ~6 % faster than 8-row ones).
const PANEL_ROWS_PREFILL: usize = 32;

/// A `[rows, cols]` weight matrix stored as GGUF blocks, row-major.
#[derive(Clone)]
pub struct QuantMatrix {
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: WeightBytes,
    /// f32 products (exact) or bf16 products; see [`QuantMatrix::with_arithmetic`].
    arithmetic: CpuArithmetic,
}

/// Whether rows of this type can be dequantized here (block types only; plain float types are
/// simply loaded as f32).
pub fn is_block_quantized(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q4_0
            | GgmlDType::Q4_1
            | GgmlDType::Q5_0
            | GgmlDType::Q5_1
            | GgmlDType::Q8_0
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
    )
}

/// Dequantize whole blocks from `bytes` into `out` (whose length is a multiple of the block size).
fn dequant_as<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    let n = bytes.len() / std::mem::size_of::<T>();
    debug_assert_eq!(n * T::BLCK_SIZE, out.len());
    debug_assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0);
    // SAFETY: `bytes` holds `n` blocks of `T` written by the GGUF reader (plain-old-data structs
    // of integers and halfs), and rows start at multiples of the block size from an allocation
    // aligned for `T` (checked when the matrix is built).
    let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, n) };
    T::to_float(blocks, out);
}

impl QuantMatrix {
    /// Wrap raw GGUF tensor bytes of shape `[rows, cols]`.
    pub fn new(dtype: GgmlDType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        if !is_block_quantized(dtype) {
            return Err(ModelError::Unsupported(format!(
                "{dtype:?} is not a block-quantized type"
            )));
        }
        let block = dtype.block_size();
        if cols % block != 0 {
            return Err(ModelError::Config(format!(
                "{cols} columns are not whole {dtype:?} blocks"
            )));
        }
        let row_bytes = cols / block * dtype.type_size();
        if data.len() != rows * row_bytes {
            return Err(ModelError::Config(format!(
                "{dtype:?} matrix [{rows}, {cols}] needs {} bytes, got {}",
                rows * row_bytes,
                data.len()
            )));
        }
        // Rows must start aligned for the block structs, whose widest field is an f16.
        let align = 2;
        if data.as_ptr() as usize % align != 0 || row_bytes % align != 0 {
            return Err(ModelError::Config(
                "misaligned quantized weight data".into(),
            ));
        }
        Ok(Self {
            dtype,
            rows,
            cols,
            row_bytes,
            data: WeightBytes::new(data),
            arithmetic: CpuArithmetic::F32,
        })
    }

    /// Multiply with `arithmetic` where this CPU, type and shape allow it (bf16 needs the bf16
    /// kernels, the fused expansion and whole 32-column chunks; int8 a type with an integer
    /// expansion and whole 64-column pieces; both AVX2 at least); f32 otherwise. Decided per
    /// matrix, never per batch, so a sequence's results do not depend on the batch.
    pub fn with_arithmetic(mut self, arithmetic: CpuArithmetic) -> Self {
        self.arithmetic = match arithmetic {
            CpuArithmetic::Bf16
                if cpu_bf16::supported()
                    && fused::supported(self.dtype)
                    && cpu_bf16::fits(self.cols) =>
            {
                CpuArithmetic::Bf16
            }
            CpuArithmetic::Int8 if int8::supported(self.dtype, self.cols) => CpuArithmetic::Int8,
            _ => CpuArithmetic::F32,
        };
        self
    }

    /// How this matrix multiplies.
    pub fn arithmetic(&self) -> CpuArithmetic {
        self.arithmetic
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// Bytes held (for the load summary).
    pub fn size_in_bytes(&self) -> usize {
        self.data.len()
    }

    /// Dequantize rows `r0..r0 + count` into `out` (`count * cols` floats).
    pub fn dequantize_rows(&self, r0: usize, count: usize, out: &mut [f32]) {
        let bytes = &self.data[r0 * self.row_bytes..(r0 + count) * self.row_bytes];
        let out = &mut out[..count * self.cols];
        if fused::supported(self.dtype) {
            // The in-register expansion of the fused kernels where the CPU has it; it computes
            // exactly what candle's `to_float` below computes.
            // SAFETY: support was checked; `bytes` and `out` cover `count` whole rows.
            unsafe { fused::dequantize(self.dtype, bytes, out) };
            return;
        }
        match self.dtype {
            GgmlDType::Q4_0 => dequant_as::<BlockQ4_0>(bytes, out),
            GgmlDType::Q4_1 => dequant_as::<BlockQ4_1>(bytes, out),
            GgmlDType::Q5_0 => dequant_as::<BlockQ5_0>(bytes, out),
            GgmlDType::Q5_1 => dequant_as::<BlockQ5_1>(bytes, out),
            GgmlDType::Q8_0 => dequant_as::<BlockQ8_0>(bytes, out),
            GgmlDType::Q2K => dequant_as::<BlockQ2K>(bytes, out),
            GgmlDType::Q3K => dequant_as::<BlockQ3K>(bytes, out),
            GgmlDType::Q4K => dequant_as::<BlockQ4K>(bytes, out),
            GgmlDType::Q5K => dequant_as::<BlockQ5K>(bytes, out),
            GgmlDType::Q6K => dequant_as::<BlockQ6K>(bytes, out),
            // `new` admits block types only.
            _ => out.fill(f32::NAN),
        }
    }

    /// Reorder whole rows: row `i` of the result is row `order[i]` of `self`.
    pub fn permute_rows(&self, order: &[usize]) -> Result<Self> {
        if order.len() != self.rows || order.iter().any(|&r| r >= self.rows) {
            return Err(ModelError::Config("invalid row permutation".into()));
        }
        let mut data = Vec::with_capacity(self.data.len());
        for &r in order {
            data.extend_from_slice(&self.data[r * self.row_bytes..(r + 1) * self.row_bytes]);
        }
        Ok(Self::new(self.dtype, self.rows, self.cols, data)?.with_arithmetic(self.arithmetic))
    }

    /// Stack matrices of the same type and width (fused q/k/v or gate/up); `None` otherwise.
    pub fn concat_rows(parts: &[&QuantMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| {
            p.dtype != first.dtype || p.cols != first.cols || p.arithmetic != first.arithmetic
        }) {
            return None;
        }
        let data: Vec<u8> = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        let rows = parts.iter().map(|p| p.rows).sum();
        Self::new(first.dtype, rows, first.cols, data)
            .ok()
            .map(|m| m.with_arithmetic(first.arithmetic))
    }

    /// The whole matrix as f32 (for fallbacks on devices without the fused path).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &mut out);
        out
    }
}

/// `out[i][j] = Σ_k x[i][k] · w[j][k]` with `w` quantized: panels of weight rows are
/// dequantized into a per-task scratch buffer, then multiplied with the f32 kernel.
pub fn matmul_xwt_quant(x: &[f32], m: usize, k: usize, w: &QuantMatrix, out: &mut [f32]) {
    assert_eq!(out.len(), m * w.rows);
    // SAFETY: `out` holds `m * rows` floats.
    unsafe { matmul_xwt_quant_into(x, m, k, w, OutPtr(out.as_mut_ptr())) }
}

/// `x · wᵀ` as a new `[m, w.rows()]` buffer, not zeroed first (every element is written).
pub fn matmul_xwt_quant_new(x: &[f32], m: usize, k: usize, w: &QuantMatrix) -> Vec<f32> {
    // SAFETY: the kernel writes all m * rows outputs (its shapes are asserted first).
    unsafe {
        crate::cpu_matmul::filled_buffer(m * w.rows, |out| matmul_xwt_quant_into(x, m, k, w, out))
    }
}

/// [`matmul_xwt_quant`] writing through a raw pointer (all `m * rows` outputs are written).
///
/// # Safety
/// `out_ptr` must be valid for `m * w.rows()` writes and not accessed by anyone else meanwhile.
unsafe fn matmul_xwt_quant_into(x: &[f32], m: usize, k: usize, w: &QuantMatrix, out_ptr: OutPtr) {
    let n = w.rows;
    assert_eq!(w.cols, k);
    assert_eq!(x.len(), m * k);
    if m == 0 || n == 0 {
        return;
    }
    match w.arithmetic {
        CpuArithmetic::Bf16 => return matmul_bf16_into(x, m, k, w, out_ptr),
        CpuArithmetic::Int8 => return matmul_int8_into(x, m, k, w, out_ptr),
        CpuArithmetic::F32 => {}
    }
    if m <= fused::MAX_ROWS && fused::supported(w.dtype) {
        par_row_ranges(n, 2, |r0, rows| {
            let bytes = &w.data[r0 * w.row_bytes..(r0 + rows) * w.row_bytes];
            let ptr = out_ptr;
            // SAFETY: `supported` was checked; this task writes only columns r0..r0 + rows.
            unsafe { fused::block(w.dtype, x, m, k, bytes, w.row_bytes, rows, ptr.0.add(r0), n) };
        });
        return;
    }
    let panel_rows = panel_rows(m);
    let panels = n.div_ceil(panel_rows);
    (0..panels).into_par_iter().for_each_init(
        || vec![0f32; panel_rows * k],
        |scratch, p| {
            let r0 = p * panel_rows;
            let rows = panel_rows.min(n - r0);
            w.dequantize_rows(r0, rows, scratch);
            let ptr = out_ptr;
            // SAFETY: this task writes only columns r0..r0 + rows of `out`.
            unsafe { block_f32(x, m, k, &scratch[..rows * k], rows, ptr.0.add(r0), n) };
        },
    );
}

/// The bf16 arithmetic of [`matmul_xwt_quant_into`]: `x` is rounded to bf16 once; small batches
/// expand weight blocks in registers, bigger ones expand panels to bf16. Both take the same
/// 32-element chunks in the same order, so results are identical whichever serves a batch.
///
/// # Safety
/// As [`matmul_xwt_quant_into`]; `w.arithmetic` is bf16 (so the CPU has bf16 and the fused
/// expansion, and `k` fits).
unsafe fn matmul_bf16_into(x: &[f32], m: usize, k: usize, w: &QuantMatrix, out_ptr: OutPtr) {
    let n = w.rows;
    // SAFETY: bf16 arithmetic is only set where the CPU has it and `k` is whole chunks.
    let xb = unsafe { cpu_bf16::activations(x) };
    if m <= fused::MAX_ROWS {
        par_row_ranges(n, 2, |r0, rows| {
            let bytes = &w.data[r0 * w.row_bytes..(r0 + rows) * w.row_bytes];
            let ptr = out_ptr;
            // SAFETY: both supports were checked; this task writes columns r0..r0 + rows.
            unsafe {
                fused::block_bf16(
                    w.dtype,
                    &xb,
                    m,
                    k,
                    bytes,
                    w.row_bytes,
                    rows,
                    ptr.0.add(r0),
                    n,
                )
            };
        });
        return;
    }
    let panel_rows = panel_rows(m);
    (0..n.div_ceil(panel_rows)).into_par_iter().for_each_init(
        || vec![0u16; panel_rows * k],
        |panel, p| {
            let r0 = p * panel_rows;
            let rows = panel_rows.min(n - r0);
            let bytes = &w.data[r0 * w.row_bytes..(r0 + rows) * w.row_bytes];
            let panel = &mut panel[..rows * k];
            let ptr = out_ptr;
            // SAFETY: bf16 and fused support were checked; this task writes only columns
            // r0..r0 + rows.
            unsafe {
                fused::dequantize_bf16(w.dtype, bytes, panel);
                cpu_bf16::block(&xb, m, k, panel, rows, ptr.0.add(r0), n)
            };
        },
    );
}

/// Weight rows per dequantized panel for a batch of `m` rows of `x`.
fn panel_rows(m: usize) -> usize {
    if m <= 64 {
        PANEL_ROWS_DECODE
    } else {
        PANEL_ROWS_PREFILL
    }
}

/// The int8 arithmetic of [`matmul_xwt_quant_into`]: `x` is quantized once (per row, per 32
/// values), then every batch size takes the same integer kernel.
///
/// # Safety
/// As [`matmul_xwt_quant_into`]; `w.arithmetic` is int8 (so the CPU, type and width allow it).
unsafe fn matmul_int8_into(x: &[f32], m: usize, k: usize, w: &QuantMatrix, out_ptr: OutPtr) {
    let n = w.rows;
    let xq = int8::QuantizedActivations::new(x, k, int8::offset(w.dtype));
    par_row_ranges(n, 2, |r0, rows| {
        let bytes = &w.data[r0 * w.row_bytes..(r0 + rows) * w.row_bytes];
        let ptr = out_ptr;
        // SAFETY: int8 support was checked for this type and width; `xq` was quantized for
        // it; this task writes only columns r0..r0 + rows.
        unsafe { int8::block(w.dtype, &xq, m, bytes, w.row_bytes, rows, ptr.0.add(r0), n) };
    });
}

/// Random weight rows of every block type, for the kernel tests.
#[cfg(test)]
mod test_blocks {
    use candle_core::quantized::GgmlDType;

    pub(crate) const ALL_BLOCK_TYPES: [GgmlDType; 10] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    /// Byte offsets of each block type's f16 fields (scales and minimums).
    fn f16_fields(dtype: GgmlDType) -> &'static [usize] {
        match dtype {
            GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => &[0],
            GgmlDType::Q4_1 | GgmlDType::Q5_1 | GgmlDType::Q4K | GgmlDType::Q5K => &[0, 2],
            GgmlDType::Q2K => &[80, 82],
            GgmlDType::Q3K => &[108],
            GgmlDType::Q6K => &[208],
            _ => unreachable!(),
        }
    }

    /// `rows` rows of `cols` weights of random bytes, with every f16 field (scales, minimums)
    /// a finite value in ±[2^-14, 2^1): every bit pattern of the packed fields, not only what
    /// a quantizer writes.
    pub(crate) fn random_rows(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let mut data: Vec<u8> = (0..rows * row_bytes).map(|_| next() as u8).collect();
        for block in data.chunks_mut(dtype.type_size()) {
            for &off in f16_fields(dtype) {
                let h = (next() as u16 & 0x83ff) | ((1 + (next() % 15) as u16) << 10);
                block[off..off + 2].copy_from_slice(&h.to_le_bytes());
            }
        }
        data
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    use super::test_blocks::{random_rows, ALL_BLOCK_TYPES};
    use super::*;
    use crate::cpu_matmul::matmul_xwt;

    /// Rows of different ranges and signs, so scales, minimums and high bits all vary.
    fn varied_weights(rows: usize, cols: usize) -> Tensor {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let v = ((i * 7919) % 2001) as f32 / 1000.0 - 1.0;
                v * (1 + (i / cols) % 7) as f32 + ((i / cols) % 3) as f32 - 1.0
            })
            .collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
    }

    /// The quantized matmul must give exactly what dequantize-then-multiply gives.
    #[test]
    fn quantized_matmul_is_bit_identical_to_dequantized() {
        let (rows, cols) = (70, 512);
        let t = varied_weights(rows, cols);
        for dtype in ALL_BLOCK_TYPES {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let matrix =
                QuantMatrix::new(dtype, rows, cols, q.data().unwrap().into_owned()).unwrap();
            let dense: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(
                matrix.dequantize(),
                dense,
                "{dtype:?} rows differ from candle's dequantize"
            );
            for m in [1usize, 2, 3, 4, 5, 8, 33, 70] {
                let x: Vec<f32> = (0..m * cols)
                    .map(|i| ((i * 104729) % 997) as f32 / 500.0 - 1.0)
                    .collect();
                // NaN-poisoned: an output the kernel skipped would show.
                let mut a = vec![f32::NAN; m * rows];
                let mut b = vec![f32::NAN; m * rows];
                matmul_xwt_quant(&x, m, cols, &matrix, &mut a);
                matmul_xwt(&x, m, cols, &dense, rows, &mut b);
                assert_eq!(a, b, "{dtype:?} m={m}");
                assert_eq!(
                    matmul_xwt_quant_new(&x, m, cols, &matrix),
                    b,
                    "{dtype:?} m={m}"
                );
            }
        }
    }

    /// bf16 arithmetic: every batch size (fused and panel paths) gives each row exactly what
    /// it gets alone, and the result is the f32 result up to bf16 rounding of the inputs.
    #[test]
    fn bf16_matmul_is_batch_invariant_and_close_to_f32() {
        if !cpu_bf16::supported() {
            return;
        }
        let (rows, cols) = (37, 512);
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap();
        for dtype in ALL_BLOCK_TYPES {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let bytes = q.data().unwrap().into_owned();
            let exact = QuantMatrix::new(dtype, rows, cols, bytes.clone()).unwrap();
            let bf16 = exact.clone().with_arithmetic(CpuArithmetic::Bf16);
            let dense = exact.dequantize();
            assert_eq!(bf16.arithmetic(), CpuArithmetic::Bf16);
            let m = 70;
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 104729) % 997) as f32 / 500.0 - 1.0)
                .collect();
            let all = matmul_xwt_quant_new(&x, m, cols, &bf16);
            let reference = matmul_xwt_quant_new(&x, m, cols, &exact);
            for i in 0..m {
                let row = &x[i * cols..(i + 1) * cols];
                let want = &all[i * rows..(i + 1) * rows];
                for b in [1usize, 3, 8] {
                    // Row i alone and as the first of a batch of b (fused and panel paths).
                    let batch: Vec<f32> = (0..b).flat_map(|_| row.iter().copied()).collect();
                    let got = matmul_xwt_quant_new(&batch, b, cols, &bf16);
                    assert_eq!(&got[..rows], want, "{dtype:?} row {i} batch {b}");
                }
                for (j, (g, r)) in want.iter().zip(&reference[i * rows..]).enumerate() {
                    // Both inputs rounded to 8 significant bits: each product is off by at most
                    // ~2^-8 of its size, so the sum by at most ~2^-8 of the sum of their sizes.
                    let size: f32 = row
                        .iter()
                        .zip(&dense[j * cols..(j + 1) * cols])
                        .map(|(a, b)| (a * b).abs())
                        .sum();
                    assert!((g - r).abs() <= size / 128.0, "{dtype:?}: {g} vs {r}");
                }
            }
        }
    }

    /// int8 arithmetic: batch-invariant, and the f32 result up to the activations' int8
    /// rounding (per 32 values, a step of max|x|/127) — checked per output against the bound
    /// that rounding implies.
    #[test]
    fn int8_matmul_is_batch_invariant_and_close_to_f32() {
        if !int8::available() {
            return;
        }
        let (rows, cols) = (37, 512);
        let t = varied_weights(rows, cols);
        let mut covered = 0;
        for dtype in ALL_BLOCK_TYPES {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let exact =
                QuantMatrix::new(dtype, rows, cols, q.data().unwrap().into_owned()).unwrap();
            let fast = exact.clone().with_arithmetic(CpuArithmetic::Int8);
            if fast.arithmetic() != CpuArithmetic::Int8 {
                continue;
            }
            covered += 1;
            let dense = exact.dequantize();
            let m = 9;
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 104729) % 997) as f32 / 500.0 - 1.0 + (i % 7) as f32 * 0.1)
                .collect();
            let all = matmul_xwt_quant_new(&x, m, cols, &fast);
            let reference = matmul_xwt_quant_new(&x, m, cols, &exact);
            for i in 0..m {
                let row = &x[i * cols..(i + 1) * cols];
                let alone = matmul_xwt_quant_new(row, 1, cols, &fast);
                assert_eq!(
                    &alone[..],
                    &all[i * rows..(i + 1) * rows],
                    "{dtype:?} row {i}"
                );
                for j in 0..rows {
                    let w = &dense[j * cols..(j + 1) * cols];
                    // |Σ w (x - x̂)| ≤ Σ |w| · step/2 per 32-value chunk, plus f32 rounding.
                    let bound: f32 = row
                        .chunks(32)
                        .zip(w.chunks(32))
                        .map(|(xc, wc)| {
                            let step = xc.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                            wc.iter().map(|v| v.abs()).sum::<f32>() * step * 0.5
                        })
                        .sum::<f32>()
                        * 1.01
                        + 1e-3;
                    let (g, r) = (all[i * rows + j], reference[i * rows + j]);
                    assert!(
                        (g - r).abs() <= bound,
                        "{dtype:?} ({i}, {j}): {g} vs {r} (bound {bound})"
                    );
                }
            }
        }
        assert_eq!(
            covered, 8,
            "every type but Q2_K and Q3_K has an integer kernel"
        );
    }

    /// Every bit pattern of the packed fields, not only what the quantizer writes: random
    /// blocks (with finite f16 scales) expand exactly as candle's `to_float` expands them.
    #[test]
    fn expansion_of_random_blocks_is_bit_identical_to_candle() {
        for dtype in ALL_BLOCK_TYPES {
            let (rows, cols) = (8, 1024);
            let data = random_rows(dtype, rows, cols, 0x9e3779b97f4a7c15);
            let matrix = QuantMatrix::new(dtype, rows, cols, data.clone()).unwrap();
            let mut reference = vec![0f32; rows * cols];
            match dtype {
                GgmlDType::Q4_0 => dequant_as::<BlockQ4_0>(&data, &mut reference),
                GgmlDType::Q4_1 => dequant_as::<BlockQ4_1>(&data, &mut reference),
                GgmlDType::Q5_0 => dequant_as::<BlockQ5_0>(&data, &mut reference),
                GgmlDType::Q5_1 => dequant_as::<BlockQ5_1>(&data, &mut reference),
                GgmlDType::Q8_0 => dequant_as::<BlockQ8_0>(&data, &mut reference),
                GgmlDType::Q2K => dequant_as::<BlockQ2K>(&data, &mut reference),
                GgmlDType::Q3K => dequant_as::<BlockQ3K>(&data, &mut reference),
                GgmlDType::Q4K => dequant_as::<BlockQ4K>(&data, &mut reference),
                GgmlDType::Q5K => dequant_as::<BlockQ5K>(&data, &mut reference),
                GgmlDType::Q6K => dequant_as::<BlockQ6K>(&data, &mut reference),
                _ => unreachable!(),
            }
            let ours = matrix.dequantize();
            let same = ours
                .iter()
                .zip(&reference)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{dtype:?}: expansion differs from candle's to_float");
        }
    }

    #[test]
    fn permute_and_concat_move_whole_rows() {
        let (rows, cols) = (4, 64);
        let data: Vec<f32> = (0..rows * cols).map(|i| (i / cols) as f32).collect();
        let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let m =
            QuantMatrix::new(GgmlDType::Q8_0, rows, cols, q.data().unwrap().into_owned()).unwrap();
        let p = m.permute_rows(&[2, 0, 3, 1]).unwrap();
        let d = p.dequantize();
        let firsts: Vec<f32> = (0..rows).map(|r| d[r * cols].round()).collect();
        assert_eq!(firsts, vec![2.0, 0.0, 3.0, 1.0]);
        let c = QuantMatrix::concat_rows(&[&m, &p]).unwrap();
        assert_eq!(c.rows(), 8);
        assert!(QuantMatrix::new(GgmlDType::Q8_0, rows, cols, vec![0; 3]).is_err());
    }
}
