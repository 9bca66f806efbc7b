//! Where tensors come from. The model asks for tensors by their Hugging Face names and shapes;
//! each source (GGUF, safetensors, random) maps names and converts to the serving dtype, so the
//! model code is written once.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::cpu_bf16::{Bf16Matrix, CpuArithmetic};
use crate::error::{ModelError, Result};
use crate::quant::mxfp4::Mxfp4Matrix;
use crate::quant::QuantMatrix;

/// A linear layer's weight: a dense `[out, in]` tensor, GGUF blocks that the CPU matmul
/// consumes block by block (same numbers, a fifth of the memory traffic for Q4), a bf16 copy
/// for bf16 products on the CPU, or several of these stacked along the output dimension.
#[derive(Clone)]
pub enum LinearWeight {
    Dense(Tensor),
    Quantized(Arc<QuantMatrix>),
    Bf16(Arc<Bf16Matrix>),
    /// Parts multiplied one after the other, outputs side by side (fused q/k/v whose parts
    /// are stored with different block types, as llama.cpp's mixes do).
    Stacked(Vec<LinearWeight>),
    /// MXFP4 blocks (gpt-oss's experts), expanded a panel at a time on the CPU.
    Mxfp4(Arc<Mxfp4Matrix>),
}

impl LinearWeight {
    /// This weight multiplied with `arithmetic`: with bf16 products, a dense f32 CPU matrix
    /// becomes a bf16 copy (where the CPU and width allow it). Quantized matrices carry their
    /// own arithmetic (set when they are read).
    pub fn with_arithmetic(self, arithmetic: CpuArithmetic) -> Result<Self> {
        let LinearWeight::Dense(t) = &self else {
            return Ok(self);
        };
        if arithmetic != CpuArithmetic::Bf16 || !t.device().is_cpu() || t.rank() != 2 {
            return Ok(self);
        }
        let (rows, cols) = t.dims2()?;
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(match Bf16Matrix::from_f32(rows, cols, &values) {
            Some(m) => LinearWeight::Bf16(Arc::new(m)),
            None => self,
        })
    }

    /// `x @ wᵀ` for a 2-D `x` (`[m, in]` -> `[m, out]`). Dense weights take the CPU matmul
    /// kernels (or candle's on other devices); quantized and bf16 ones their own kernels, which
    /// need f32 activations on the CPU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            LinearWeight::Dense(t) => crate::cpu_matmul::linear(x, t),
            LinearWeight::Quantized(q) => cpu_matmul_with(x, q.rows(), q.cols(), |xs, m, k| {
                crate::quant::matmul_xwt_quant_new(xs, m, k, q)
            }),
            LinearWeight::Bf16(b) => {
                cpu_matmul_with(x, b.rows(), b.cols(), |xs, m, _| b.matmul(xs, m))
            }
            LinearWeight::Stacked(parts) => {
                let outs = parts
                    .iter()
                    .map(|p| p.forward(x))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&outs, 1)?)
            }
            LinearWeight::Mxfp4(w) => {
                cpu_matmul_with(x, w.rows(), w.cols(), |xs, m, _| w.matmul(xs, m))
            }
        }
    }

    /// Output features (rows).
    pub fn rows(&self) -> usize {
        match self {
            LinearWeight::Dense(t) => t.dims().first().copied().unwrap_or(0),
            LinearWeight::Quantized(q) => q.rows(),
            LinearWeight::Bf16(b) => b.rows(),
            LinearWeight::Stacked(parts) => parts.iter().map(LinearWeight::rows).sum(),
            LinearWeight::Mxfp4(w) => w.rows(),
        }
    }

    /// The weight as a dense tensor (for fused concatenation with a dense part).
    pub fn to_dense(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let (values, rows, cols) = match self {
            LinearWeight::Dense(t) => return Ok(t.clone()),
            LinearWeight::Quantized(q) => (q.dequantize(), q.rows(), q.cols()),
            LinearWeight::Bf16(b) => (b.to_f32(), b.rows(), b.cols()),
            LinearWeight::Mxfp4(w) => (w.dequantize(), w.rows(), w.cols()),
            LinearWeight::Stacked(parts) => {
                let dense = parts
                    .iter()
                    .map(|p| p.to_dense(dtype, device))
                    .collect::<Result<Vec<_>>>()?;
                return Ok(Tensor::cat(&dense, 0)?);
            }
        };
        Ok(Tensor::from_vec(values, (rows, cols), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }

    /// Stack weights along the output dimension (fused q/k/v, gate/up): one quantized matrix
    /// when every part has one block type, one bf16 (or MXFP4) matrix when every part is bf16
    /// (or MXFP4), the parts side by side when they are stored in different ways, else a dense
    /// tensor.
    pub fn concat(parts: &[LinearWeight], dtype: DType, device: &Device) -> Result<LinearWeight> {
        if let Some(q) = all_of(parts, |p| match p {
            LinearWeight::Quantized(q) => Some(q.as_ref()),
            _ => None,
        })
        .and_then(|q| QuantMatrix::concat_rows(&q))
        {
            return Ok(LinearWeight::Quantized(Arc::new(q)));
        }
        if let Some(b) = all_of(parts, |p| match p {
            LinearWeight::Bf16(b) => Some(b.as_ref()),
            _ => None,
        })
        .and_then(|b| Bf16Matrix::concat_rows(&b))
        {
            return Ok(LinearWeight::Bf16(Arc::new(b)));
        }
        if let Some(m) = all_of(parts, |p| match p {
            LinearWeight::Mxfp4(m) => Some(m.as_ref()),
            _ => None,
        })
        .and_then(|m| Mxfp4Matrix::concat_rows(&m))
        {
            return Ok(LinearWeight::Mxfp4(Arc::new(m)));
        }
        if !parts.iter().any(|p| matches!(p, LinearWeight::Dense(_))) {
            return Ok(LinearWeight::Stacked(parts.to_vec()));
        }
        let dense = parts
            .iter()
            .map(|p| p.to_dense(dtype, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(LinearWeight::Dense(Tensor::cat(&dense, 0)?))
    }
}

/// Every part as the one storage `pick` takes out of it, or `None` when some part is stored
/// otherwise.
fn all_of<'a, T>(
    parts: &'a [LinearWeight],
    pick: impl Fn(&'a LinearWeight) -> Option<&'a T>,
) -> Option<Vec<&'a T>> {
    parts.iter().map(pick).collect()
}

/// Run a CPU kernel `f(x, m, k) -> [m, rows]` on `x`'s f32 values (`[m, cols]`).
fn cpu_matmul_with(
    x: &Tensor,
    rows: usize,
    cols: usize,
    f: impl FnOnce(&[f32], usize, usize) -> Vec<f32>,
) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (m, k) = x.dims2()?;
    if k != cols {
        return Err(ModelError::InvalidBatch(format!(
            "matmul [{m}, {k}] with [{rows}, {cols}]^T"
        )));
    }
    let out = {
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Err(ModelError::Unsupported(
                "quantized and bf16 CPU weights need CPU activations".into(),
            ));
        };
        let start = layout.start_offset();
        let xs = cpu
            .as_slice::<f32>()?
            .get(start..start + m * k)
            .ok_or_else(|| {
                ModelError::InvalidBatch(format!("activations shorter than [{m}, {k}]"))
            })?;
        f(xs, m, k)
    };
    Ok(Tensor::from_vec(out, (m, rows), x.device())?)
}

/// A provider of named weight tensors, already in the serving dtype and on the serving device.
pub trait WeightSource {
    /// The tensor `name` (HF naming), checked against `shape`.
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// Whether `name` exists (optional tensors: lm_head, biases).
    fn contains(&self, name: &str) -> bool;
    /// A path or label for error messages.
    fn origin(&self) -> String;

    /// A linear layer's weight; sources holding block-quantized data may keep it quantized.
    fn get_linear(&mut self, name: &str, shape: &[usize]) -> Result<LinearWeight> {
        LinearWeight::Dense(self.get(name, shape)?).with_arithmetic(self.arithmetic())
    }

    /// How this source's linear layers multiply on the CPU.
    fn arithmetic(&self) -> CpuArithmetic {
        CpuArithmetic::F32
    }

    /// Whether `get_linear` can return something other than a copy of `get` (so a tied
    /// output head is worth fetching separately).
    fn keeps_quantized(&self) -> bool {
        false
    }

    /// The raw bytes of a `u8` tensor (gpt-oss's MXFP4 `*_blocks` and `*_scales`).
    fn get_bytes(&mut self, name: &str, shape: &[usize]) -> Result<Vec<u8>> {
        let _ = shape;
        Err(ModelError::Unsupported(format!(
            "{} cannot serve the byte tensor '{name}'",
            self.origin()
        )))
    }
}

/// Fail with a message naming the file and tensor when a tensor's shape is off.
pub fn check_shape(origin: &str, name: &str, tensor: &Tensor, shape: &[usize]) -> Result<()> {
    if tensor.dims() != shape {
        return Err(ModelError::ShapeMismatch {
            path: origin.into(),
            tensor: name.to_string(),
            expected: shape.to_vec(),
            actual: tensor.dims().to_vec(),
        });
    }
    Ok(())
}

/// Random weights of the right shapes (`--load-format dummy`): lets us benchmark a large model's
/// shapes without its files. Norm weights are ones so activations stay in a sane range.
pub struct DummyWeights {
    dtype: DType,
    device: Device,
    rng: rand::rngs::StdRng,
    include_bias: bool,
    arithmetic: CpuArithmetic,
}

impl DummyWeights {
    pub fn new(seed: u64, dtype: DType, device: Device, include_bias: bool) -> Self {
        use rand::SeedableRng;
        Self {
            dtype,
            device,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            include_bias,
            arithmetic: CpuArithmetic::F32,
        }
    }

    /// Multiply the linear layers with `arithmetic`.
    pub fn with_arithmetic(mut self, arithmetic: CpuArithmetic) -> Self {
        self.arithmetic = arithmetic;
        self
    }
}

impl WeightSource for DummyWeights {
    fn arithmetic(&self) -> CpuArithmetic {
        self.arithmetic
    }

    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        use rand::Rng;
        let count: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; count]
        } else {
            // Uniform with std ~0.02, like common initializers.
            let bound = 0.02f32 * 3f32.sqrt();
            (0..count)
                .map(|_| self.rng.random_range(-bound..bound))
                .collect()
        };
        Ok(Tensor::from_vec(data, shape, &self.device)?.to_dtype(self.dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        // Dense stand-ins everywhere: no MXFP4 byte tensors (gpt-oss gets bf16-style experts).
        if name.ends_with("_blocks") || name.ends_with("_scales") {
            return false;
        }
        !name.ends_with(".bias") || self.include_bias
    }

    fn origin(&self) -> String {
        "dummy weights".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(rows: usize, cols: usize, seed: usize) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 + seed) % 997) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn bf16_weights_and_stacked_parts_multiply_like_their_dense_form() {
        let x = tensor(3, 64, 1);
        let dense = LinearWeight::Dense(tensor(40, 64, 2));
        let bf16 = dense.clone().with_arithmetic(CpuArithmetic::Bf16).unwrap();
        if crate::cpu_bf16::supported() {
            assert!(matches!(bf16, LinearWeight::Bf16(_)));
            let (a, b) = (dense.forward(&x).unwrap(), bf16.forward(&x).unwrap());
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 0.5, "{diff}");
        }
        // f32 arithmetic leaves a dense weight alone.
        assert!(matches!(
            dense.clone().with_arithmetic(CpuArithmetic::F32).unwrap(),
            LinearWeight::Dense(_)
        ));
        // Parts that cannot be merged are multiplied side by side, in order.
        let other = LinearWeight::Dense(tensor(8, 64, 3));
        let stacked = LinearWeight::Stacked(vec![dense.clone(), other.clone()]);
        assert_eq!(stacked.rows(), 48);
        let want = Tensor::cat(&[dense.forward(&x).unwrap(), other.forward(&x).unwrap()], 1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(stacked.forward(&x).unwrap().to_vec2::<f32>().unwrap(), want);
        let d = stacked.to_dense(DType::F32, &Device::Cpu).unwrap();
        assert_eq!(d.dims(), &[48, 64]);
    }
}
