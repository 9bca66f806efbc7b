//! The walk shared by the CPU matmul kernels that keep a tile of outputs in registers (fused
//! quantized, bf16, int8): an `m x rows` output in tiles of up to [`MAX_TILE`] rows of `x` by
//! [`MAX_TILE`] weight rows, each tile one call with its sizes as constants.

use rayon::prelude::*;

/// The biggest tile side: 4 x 4 accumulators (plus operands) fit the 32 vector registers.
pub(crate) const MAX_TILE: usize = 4;

/// A kernel computing one tile of `MI` rows of `x` (from row `i`) by `NJ` weight rows (from
/// row `j`) over the whole width.
pub(crate) trait Tiles {
    /// The largest tile the kernel takes (rows of `x`, weight rows): at most [`MAX_TILE`]
    /// each; smaller where the accumulators would not fit the registers (AVX2 has 16 vector
    /// registers, and its 16-lane accumulators take two each). Tile shapes never change
    /// results: each output is one dot product in its own fixed order.
    const TILE: (usize, usize) = (MAX_TILE, MAX_TILE);
    /// # Safety
    /// The implementor's kernel requirements (CPU features, buffer sizes) hold.
    unsafe fn tile<const MI: usize, const NJ: usize>(&self, i: usize, j: usize);
}

/// Every tile of an `m x rows` output, weight rows outermost (each weight tile is streamed
/// once and meets every row of `x`). Inlined, so that called from a function compiled with
/// the kernel's CPU features the tiles are inlined too (measured: 20 % of a batched decode
/// step went to calls when they were not).
///
/// # Safety
/// As [`Tiles::tile`] for every tile.
#[inline(always)]
pub(crate) unsafe fn run_tiles<T: Tiles>(kernel: &T, m: usize, rows: usize) {
    let (tile_i, tile_j) = T::TILE;
    let mut j = 0;
    while j < rows {
        let nj = (rows - j).min(tile_j);
        let mut i = 0;
        while i < m {
            let mi = (m - i).min(tile_i);
            macro_rules! go {
                ($mi:literal) => {
                    match nj {
                        4 => kernel.tile::<$mi, 4>(i, j),
                        3 => kernel.tile::<$mi, 3>(i, j),
                        2 => kernel.tile::<$mi, 2>(i, j),
                        _ => kernel.tile::<$mi, 1>(i, j),
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

/// Split `n` weight rows into about `tasks_per_thread` contiguous ranges per rayon thread
/// (multiples of 16 rows) and run `f(first_row, rows)` on each in parallel: enough tasks to
/// balance, few enough that scheduling stays small next to a decode step's arithmetic.
pub(crate) fn par_row_ranges(n: usize, tasks_per_thread: usize, f: impl Fn(usize, usize) + Sync) {
    let tasks = rayon::current_num_threads().max(1) * tasks_per_thread;
    let rows_per_task = n.div_ceil(tasks).next_multiple_of(16).max(16);
    (0..n.div_ceil(rows_per_task))
        .into_par_iter()
        .for_each(|t| {
            let r0 = t * rows_per_task;
            f(r0, rows_per_task.min(n - r0));
        });
}

/// A vector of f32 lanes reduced to one sum in a fixed order: AVX-512's `__m512` and its AVX2
/// emulation (`cpu_emu512`), which sums in the same order.
#[cfg(target_arch = "x86_64")]
pub(crate) trait HorizontalSum: Copy {
    /// # Safety
    /// The CPU has the vector type's instructions.
    unsafe fn hsum(self) -> f32;
}

#[cfg(target_arch = "x86_64")]
impl HorizontalSum for std::arch::x86_64::__m512 {
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        std::arch::x86_64::_mm512_reduce_add_ps(self)
    }
}

#[cfg(target_arch = "x86_64")]
impl HorizontalSum for crate::cpu_emu512::__m512 {
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        crate::cpu_emu512::_mm512_reduce_add_ps(self)
    }
}

/// Store a tile's accumulators, each reduced to one output (a fixed-order horizontal sum).
///
/// # Safety
/// `out` is valid for `MI` rows of stride `ldo` and `NJ` columns; the CPU has `V`'s
/// instructions.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn store_tile<V: HorizontalSum, const MI: usize, const NJ: usize>(
    acc: &[[V; NJ]; MI],
    out: *mut f32,
    ldo: usize,
) {
    for (a, row) in acc.iter().enumerate() {
        for (b, v) in row.iter().enumerate() {
            *out.add(a * ldo + b) = v.hsum();
        }
    }
}
