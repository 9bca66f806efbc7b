//! Where tensors come from. The model asks for tensors by their Hugging Face names and shapes;
//! each source (GGUF, safetensors, random) maps names and converts to the serving dtype, so the
//! model code is written once.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// A provider of named weight tensors, already in the serving dtype and on the serving device.
pub trait WeightSource {
    /// The tensor `name` (HF naming), checked against `shape`.
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// Whether `name` exists (optional tensors: lm_head, biases).
    fn contains(&self, name: &str) -> bool;
    /// A path or label for error messages.
    fn origin(&self) -> String;
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
        Self { dtype, device, rng: rand::rngs::StdRng::seed_from_u64(seed), include_bias }
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
            (0..count).map(|_| self.rng.random_range(-bound..bound)).collect()
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
