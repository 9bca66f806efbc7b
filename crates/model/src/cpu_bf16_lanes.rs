//! A bf16 matmul for encoders with 16 output columns in the lanes of each accumulator: the
//! weights are repacked once, at load, in blocks of 16 rows with pairs of input columns
//! interleaved (the pairs `vdpbf16ps` multiplies), and each row of `x` is broadcast two values
//! at a time. Unlike [`crate::cpu_bf16`]'s tiles it needs no horizontal sums, whose cost is
//! close to the products' at a small encoder's short widths (MiniLM: k = 384). Every batch size
//! runs the same kernel with the same per-output order, so an input's vector does not depend on
//! what it is batched with.

use rayon::prelude::*;

use crate::cpu_bf16::{activations, fits, round_to_bf16, supported};
use crate::cpu_matmul::{filled_buffer, OutPtr};

/// Output columns per accumulator.
const LANES: usize = 16;
/// Blocks of 16 weight rows per parallel task and tile (2 blocks x 8 rows of `x` = 16
/// accumulators).
const BLOCKS: usize = 2;
const ROWS: usize = 8;

/// A `[rows, cols]` weight matrix in bf16, repacked for [`Bf16Lanes::matmul`].
pub struct Bf16Lanes {
    rows: usize,
    cols: usize,
    data: Vec<u16>,
}

impl Bf16Lanes {
    /// Round `values` (`[rows, cols]`, row-major) to bf16 and repack them; `None` where the
    /// kernel cannot serve the matrix (no bf16 kernels, `rows` not whole blocks of 16, `cols`
    /// not whole 32-element chunks).
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Option<Self> {
        if !supported() || !rows.is_multiple_of(LANES) || !fits(cols) || values.len() != rows * cols
        {
            return None;
        }
        let pairs = cols / 2;
        let mut data = vec![0u16; rows * cols];
        for (i, v) in data.iter_mut().enumerate() {
            let (t, lane, kp, block) = (
                i % 2,
                (i / 2) % LANES,
                (i / (2 * LANES)) % pairs,
                i / (2 * LANES * pairs),
            );
            *v = round_to_bf16(values[(block * LANES + lane) * cols + 2 * kp + t]);
        }
        Some(Self { rows, cols, data })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x · selfᵀ` for `x` `[m, cols]` in f32 (rounded to bf16 once), as a new `[m, rows]`
    /// buffer; f32 sums.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        assert_eq!(x.len(), m * k);
        // SAFETY: construction checked support and width.
        let xb = unsafe { activations(x) };
        let group = BLOCKS * LANES * k;
        // SAFETY: each task writes the columns of its own blocks of every row: all m * n.
        unsafe {
            filled_buffer(m * n, |out| {
                self.data.par_chunks(group).enumerate().for_each(|(g, w)| {
                    let ptr = out;
                    let blocks = w.len() / (LANES * k);
                    #[cfg(target_arch = "x86_64")]
                    {
                        let out = OutPtr(ptr.0.add(g * BLOCKS * LANES));
                        if crate::cpu_bf16::native() {
                            avx512::group(&xb, m, k, w, blocks, out, n)
                        } else {
                            avx2::group(&xb, m, k, w, blocks, out, n)
                        }
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    {
                        let _ = (ptr, blocks, w, &xb);
                        unreachable!("bf16 kernels on a CPU without them");
                    }
                });
            })
        }
    }
}

/// `$tile::<MI, NB>$args` with `MI = $mi` (one of `$rows`) and `NB` one block or [`BLOCKS`]:
/// the run-time tile shape as constants.
macro_rules! tile_for_rows {
    ($mi:expr, $one_block:expr, $tile:ident $args:tt; $($rows:literal)*) => {
        match ($mi, $one_block) {
            $(($rows, true) => $tile::<$rows, 1> $args,)*
            $(($rows, false) => $tile::<$rows, BLOCKS> $args,)*
            _ => {}
        }
    };
}

/// The kernel, written once against the AVX-512 intrinsics' names and instantiated for
/// AVX-512 BF16 and for AVX2 (`cpu_emu512`: identical results).
macro_rules! lanes_kernels {
    ($features:literal, $bf16mod:ident) => {
        use crate::cpu_bf16::$bf16mod::{dot, load};
        use crate::cpu_matmul::OutPtr;

        use super::{BLOCKS, LANES, ROWS};

        /// Every row of `x` against `blocks` repacked blocks of 16 weight rows, writing columns
        /// `0..16 * blocks` of `out` (row stride `ldo`).
        #[target_feature(enable = $features)]
        pub(super) unsafe fn group(
            x: &[u16],
            m: usize,
            k: usize,
            w: &[u16],
            blocks: usize,
            out: OutPtr,
            ldo: usize,
        ) {
            let mut i = 0;
            while i < m {
                let mi = (m - i).min(ROWS);
                let (xp, wp, o) = (x.as_ptr().add(i * k), w.as_ptr(), out.0.add(i * ldo));
                let one_block = blocks == 1;
                tile_for_rows!(mi, one_block, tile(xp, k, wp, o, ldo); 1 2 3 4 5 6 7 8);
                i += mi;
            }
        }

        /// `MI` rows of `x` against `NB` blocks: accumulators hold 16 output columns each.
        #[allow(clippy::needless_range_loop)]
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn tile<const MI: usize, const NB: usize>(
            x: *const u16,
            k: usize,
            w: *const u16,
            out: *mut f32,
            ldo: usize,
        ) {
            let pairs = k / 2;
            let mut acc = [[_mm512_setzero_ps(); NB]; MI];
            for kp in 0..pairs {
                let mut wv = [load(w.add(kp * 2 * LANES)); NB];
                for b in 1..NB {
                    wv[b] = load(w.add((b * pairs + kp) * 2 * LANES));
                }
                for a in 0..MI {
                    let pair = std::ptr::read_unaligned(x.add(a * k + 2 * kp) as *const i32);
                    let xv = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair));
                    for b in 0..NB {
                        acc[a][b] = dot(acc[a][b], xv, wv[b]);
                    }
                }
            }
            for a in 0..MI {
                for b in 0..NB {
                    _mm512_storeu_ps(out.add(a * ldo + b * LANES), acc[a][b]);
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    lanes_kernels!("avx512f,avx512bf16", avx512);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::cpu_emu512::*;
    lanes_kernels!("avx2,fma,f16c", avx2);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_bf16::bf16_to_f32;

    /// Against products of the bf16-rounded operands summed in f64: within f32 rounding.
    #[test]
    fn matches_the_rounded_product_for_every_batch_size() {
        let (rows, cols) = (48, 96);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 2003) as f32 / 1000.0 - 1.0)
            .collect();
        let Some(lanes) = Bf16Lanes::from_f32(rows, cols, &w) else {
            return; // no bf16 kernels here (no AVX2)
        };
        let round = |v: f32| bf16_to_f32(round_to_bf16(v));
        for m in [1usize, 3, 8, 9, 17] {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 104729) % 997) as f32 / 500.0 - 1.0)
                .collect();
            let got = lanes.matmul(&x, m);
            for i in 0..m {
                for j in 0..rows {
                    let want: f64 = (0..cols)
                        .map(|c| round(x[i * cols + c]) as f64 * round(w[j * cols + c]) as f64)
                        .sum();
                    let g = got[i * rows + j] as f64;
                    assert!(
                        (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "m={m} ({i},{j}): {g} vs {want}"
                    );
                }
            }
            // Batch invariance: row 0 alone equals row 0 in any batch.
            let alone = lanes.matmul(&x[..cols], 1);
            assert_eq!(alone, got[..rows].to_vec(), "m={m}");
        }
        assert!(Bf16Lanes::from_f32(rows + 1, cols, &vec![0.0; (rows + 1) * cols]).is_none());
    }
}

/// The AVX2 emulation against AVX-512 BF16, bit for bit (where this CPU has both).
#[cfg(all(test, target_arch = "x86_64"))]
mod isa_tests {
    use super::*;
    use crate::cpu_isa::isa_test_support::{both_here, same_bits, values};

    #[test]
    fn avx2_lanes_equal_avx512_bf16() {
        if !both_here(crate::cpu_bf16::native()) {
            return;
        }
        let (rows, k, m) = (48, 96, 11);
        let (w, x) = (values(rows * k, 1), values(m * k, 2));
        let lanes = Bf16Lanes::from_f32(rows, k, &w).expect("supported");
        // SAFETY: support was checked.
        let xb = unsafe { activations(&x) };
        let (mut a, mut b) = (vec![f32::NAN; m * rows], vec![0f32; m * rows]);
        let group = BLOCKS * LANES * k;
        for (g, wg) in lanes.data.chunks(group).enumerate() {
            let blocks = wg.len() / (LANES * k);
            // SAFETY: both instruction sets are present; each group writes its own columns.
            unsafe {
                let col = g * BLOCKS * LANES;
                avx512::group(&xb, m, k, wg, blocks, OutPtr(a.as_mut_ptr().add(col)), rows);
                avx2::group(&xb, m, k, wg, blocks, OutPtr(b.as_mut_ptr().add(col)), rows);
            }
        }
        assert!(same_bits(&a, &b));
    }
}
