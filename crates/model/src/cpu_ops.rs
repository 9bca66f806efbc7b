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
                    .for_each(|(o, row)| {
                        let (gate, up) = row.split_at(inter);
                        for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                            // candle's SiLU, rounded to f32, then the product.
                            let silu = g / (1.0 + (-g).exp());
                            *o = silu * u;
                        }
                    });
                return Ok(Tensor::from_vec(out, (m, inter), gate_up.device())?);
            }
        }
    }
    Ok((gate_up.narrow(1, 0, inter)?.silu()? * gate_up.narrow(1, inter, inter)?)?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

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
