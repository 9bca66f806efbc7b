//! Weights filled from the integer hash the golden scripts use (`fill` in
//! `scripts/golden/make_tiny_llama3.py` and `make_tiny_families.py`): element k of tensor number
//! `index` in the sorted name list, so tiny reference checkpoints need no stored weights.

use candle_core::{Device, Tensor};
use spindle_model::weights::WeightSource;

/// The script's `fill`: element k of tensor number `index` (names in sorted order).
fn fill(index: usize, n: usize, scale: f64, offset: f64, mix: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|k| {
            let h = (k * 2_654_435_761 + index as u64 * mix + 12_345) % (1u64 << 32);
            let u = h as f64 / 4_294_967_296.0;
            (offset + scale * (u - 0.5)) as f32
        })
        .collect()
}

/// Weights computed on demand from their name's position in the script's sorted name list.
pub struct HashWeights(pub Vec<String>);

impl WeightSource for HashWeights {
    fn get(&mut self, name: &str, shape: &[usize]) -> spindle_model::Result<Tensor> {
        let index = self.0.iter().position(|n| n == name).ok_or_else(|| {
            spindle_model::ModelError::MissingTensor {
                path: "hash".into(),
                tensor: name.into(),
            }
        })?;
        let (scale, offset) = if name.ends_with("norm.weight") {
            (0.4, 1.0)
        } else if name.contains("embed_tokens") {
            (2.0, 0.0)
        } else if name.ends_with("sinks") {
            (40.0, 40.0)
        } else {
            (0.5, 0.0)
        };
        // The script's EXPERT_MIX: experts must differ from each other.
        let mix = if name.contains(".experts.") {
            2_246_822_519
        } else {
            40_503
        };
        let n = shape.iter().product();
        Ok(Tensor::from_vec(
            fill(index, n, scale, offset, mix),
            shape,
            &Device::Cpu,
        )?)
    }
    fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|n| n == name)
    }

    /// `byte_fill` of `scripts/golden/make_tiny_gpt_oss_mxfp4.py`: MXFP4 blocks and scales.
    fn get_bytes(&mut self, name: &str, shape: &[usize]) -> spindle_model::Result<Vec<u8>> {
        let index = self.0.iter().position(|n| n == name).ok_or_else(|| {
            spindle_model::ModelError::MissingTensor {
                path: "hash".into(),
                tensor: name.into(),
            }
        })? as u64;
        let n = shape.iter().product::<usize>() as u64;
        let scales = name.ends_with("_scales");
        Ok((0..n)
            .map(|k| {
                let h = (k * 2_654_435_761 + index * 2_246_822_519 + 12_345) % (1u64 << 32);
                let b = (h >> 13) & 0xff;
                (if scales { 121 + b % 4 } else { b }) as u8
            })
            .collect())
    }
    fn origin(&self) -> String {
        "hash".into()
    }
}
