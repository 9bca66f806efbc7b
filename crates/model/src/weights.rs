//! Where tensors come from. The model asks for tensors by their Hugging Face names and shapes;
//! each source (GGUF, safetensors, random) maps names and converts to the serving dtype, so the
//! model code is written once.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::quant::QuantMatrix;

/// A linear layer's weight: a dense `[out, in]` tensor, or GGUF blocks that the CPU matmul
/// dequantizes panel by panel (same numbers, a fifth of the memory traffic for Q4).
#[derive(Clone)]
pub enum LinearWeight {
    Dense(Tensor),
    Quantized(Arc<QuantMatrix>),
}

impl LinearWeight {
    /// `x @ wᵀ` for a 2-D `x` (`[m, in]` -> `[m, out]`). Dense weights take the CPU matmul
    /// kernels (or candle's on other devices); quantized ones are consumed block by block by
    /// the quantized kernels, which need f32 activations on the CPU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let q = match self {
            LinearWeight::Dense(t) => return crate::cpu_matmul::linear(x, t),
            LinearWeight::Quantized(q) => q,
        };
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let (m, k) = x.dims2()?;
        if k != q.cols() {
            return Err(ModelError::InvalidBatch(format!(
                "matmul [{m}, {k}] with [{}, {}]^T",
                q.rows(),
                q.cols()
            )));
        }
        let out = {
            let (storage, layout) = x.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                return Err(ModelError::Unsupported(
                    "quantized weights need CPU activations".into(),
                ));
            };
            let start = layout.start_offset();
            let xs = cpu
                .as_slice::<f32>()?
                .get(start..start + m * k)
                .ok_or_else(|| {
                    ModelError::InvalidBatch(format!("activations shorter than [{m}, {k}]"))
                })?;
            crate::quant::matmul_xwt_quant_new(xs, m, k, q)
        };
        Ok(Tensor::from_vec(out, (m, q.rows()), x.device())?)
    }

    /// Output features (rows).
    pub fn rows(&self) -> usize {
        match self {
            LinearWeight::Dense(t) => t.dims().first().copied().unwrap_or(0),
            LinearWeight::Quantized(q) => q.rows(),
        }
    }

    /// The weight as a dense tensor (for fused concatenation with a dense part).
    pub fn to_dense(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        match self {
            LinearWeight::Dense(t) => Ok(t.clone()),
            LinearWeight::Quantized(q) => {
                Ok(
                    Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), &Device::Cpu)?
                        .to_dtype(dtype)?
                        .to_device(device)?,
                )
            }
        }
    }

    /// Stack weights along the output dimension (fused q/k/v, gate/up). Stays quantized when
    /// every part is quantized with one type.
    pub fn concat(parts: &[LinearWeight], dtype: DType, device: &Device) -> Result<LinearWeight> {
        let quant: Vec<&QuantMatrix> = parts
            .iter()
            .filter_map(|p| match p {
                LinearWeight::Quantized(q) => Some(q.as_ref()),
                LinearWeight::Dense(_) => None,
            })
            .collect();
        if quant.len() == parts.len() {
            if let Some(q) = QuantMatrix::concat_rows(&quant) {
                return Ok(LinearWeight::Quantized(Arc::new(q)));
            }
        }
        let dense = parts
            .iter()
            .map(|p| p.to_dense(dtype, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(LinearWeight::Dense(Tensor::cat(&dense, 0)?))
    }
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
        Ok(LinearWeight::Dense(self.get(name, shape)?))
    }

    /// Whether `get_linear` can return something other than a copy of `get` (so a tied
    /// output head is worth fetching separately).
    fn keeps_quantized(&self) -> bool {
        false
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
}

impl DummyWeights {
    pub fn new(seed: u64, dtype: DType, device: Device, include_bias: bool) -> Self {
        use rand::SeedableRng;
        Self {
            dtype,
            device,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            include_bias,
        }
    }
}

impl WeightSource for DummyWeights {
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
        !name.ends_with(".bias") || self.include_bias
    }

    fn origin(&self) -> String {
        "dummy weights".to_string()
    }
}
