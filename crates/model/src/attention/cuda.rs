//! Paged attention on CUDA, through spindle's own kernels (`spindle-kernels`, `/kernels/*.cu`).
//! Same contract as the CPU backend: `attend` first writes the step's new K/V at
//! `metadata.slot_mapping`, then runs causal attention of each sequence's new tokens over its
//! cached context. Decode sequences (one new token) go to the paged decode kernel (split-K for
//! long contexts with few sequences), the others to the prefill kernel, in the same call.
//!
//! The cache has the CPU backend's layout, `[num_blocks, num_kv_heads, block_size, head_dim]` per
//! layer for K and for V, in the model's dtype (bf16 on CUDA by default), as device byte
//! buffers this backend owns. The step's metadata (block tables, work list) is uploaded once, at
//! the first layer of a step, and reused by the other layers while the metadata is unchanged.

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::cudarc::driver::{result, sys};
use candle_core::{CudaDevice, DType, Device, Tensor};
use spindle_kernels::attention::{self as kernels, CacheGeometry, DevicePlan};
use spindle_kernels::plan::{AttentionPlan, AttentionShape, PlanOptions};
use spindle_kernels::KernelError;

use super::{check_layer_inputs, AttentionBackend, AttentionMetadata, CacheShape, LayerAttention};
use crate::error::{ModelError, Result};

/// Map a kernel-layer error onto the model's error type without losing its kind.
fn kernel_err(e: KernelError) -> ModelError {
    match e {
        KernelError::InvalidBatch(m) => ModelError::InvalidBatch(m),
        KernelError::Unsupported(m) => ModelError::Unsupported(format!("CUDA attention: {m}")),
        KernelError::Candle(e) => ModelError::Candle(e),
        KernelError::Driver(e) => ModelError::Candle(candle_core::Error::Cuda(Box::new(e))),
    }
}

/// The metadata of the step in flight, uploaded to the device.
struct StepState {
    tokens: usize,
    num_heads: usize,
    plan: DevicePlan,
    slots: CudaSlice<u32>,
}

/// The CUDA KV cache and the attention kernels that read it.
pub struct CudaAttention {
    shape: CacheShape,
    dtype: DType,
    device: CudaDevice,
    /// Per layer: (K, V) device buffers.
    layers: Vec<(CudaSlice<u8>, CudaSlice<u8>)>,
    options: PlanOptions,
    step: Option<StepState>,
}

/// Free and total bytes of device memory, for sizing the cache after the weights are loaded.
pub fn cuda_memory_info(device: &Device) -> Result<(usize, usize)> {
    let dev = device.as_cuda_device()?;
    let info = dev.cuda_stream().context().mem_get_info();
    info.map_err(|e| kernel_err(KernelError::Driver(e)))
}

/// The high-water mark of memory handed out by the device's default stream-ordered memory pool,
/// which is where candle's CUDA tensors come from when the driver supports asynchronous
/// allocation. Like `torch.cuda.max_memory_allocated`, it measures what a profiling forward
/// pass really needed, including temporaries freed before it returned.
pub struct PoolPeak {
    pool: sys::CUmemoryPool,
    base: u64,
}

impl PoolPeak {
    const USED_MEM_CURRENT: sys::CUmemPool_attribute =
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT;
    const USED_MEM_HIGH: sys::CUmemPool_attribute =
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;

    /// Reset the pool's high-water mark to what is in use now. `None` when this device
    /// allocates without a pool (then nothing can be measured this way).
    pub fn start(device: &Device) -> Result<Option<Self>> {
        let dev = device.as_cuda_device()?;
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        if !ctx.has_async_alloc() {
            return Ok(None);
        }
        let driver = |e| kernel_err(KernelError::Driver(e));
        stream.synchronize().map_err(driver)?;
        ctx.bind_to_thread().map_err(driver)?;
        // SAFETY: the device comes from a live context; both attributes are `cuuint64_t`, and
        // the high-water mark may only be reset to zero (which sets it to the current use).
        unsafe {
            let pool = result::device::get_default_mem_pool(ctx.cu_device()).map_err(driver)?;
            let mut zero: u64 = 0;
            result::mem_pool::set_attribute(
                pool,
                Self::USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut c_void,
            )
            .map_err(driver)?;
            let base = Self::read(pool, Self::USED_MEM_CURRENT).map_err(driver)?;
            Ok(Some(Self { pool, base }))
        }
    }

    /// Bytes in use at the high-water mark since [`PoolPeak::start`], above what was in use then.
    pub fn finish(self, device: &Device) -> Result<u64> {
        let dev = device.as_cuda_device()?;
        let driver = |e| kernel_err(KernelError::Driver(e));
        dev.cuda_stream().synchronize().map_err(driver)?;
        // SAFETY: the pool was obtained in `start` from the same live context.
        let high = unsafe { Self::read(self.pool, Self::USED_MEM_HIGH) }.map_err(driver)?;
        Ok(high.saturating_sub(self.base))
    }

    /// # Safety
    /// `pool` must be valid and `attr` a `cuuint64_t` attribute.
    unsafe fn read(
        pool: sys::CUmemoryPool,
        attr: sys::CUmemPool_attribute,
    ) -> std::result::Result<u64, result::DriverError> {
        let mut value: u64 = 0;
        result::mem_pool::get_attribute(pool, attr, &mut value as *mut u64 as *mut c_void)?;
        Ok(value)
    }
}

impl CudaAttention {
    /// Allocate a zeroed cache of `shape` in `dtype` (f32, f16 or bf16) on the CUDA `device`.
    /// Errors (instead of aborting) when the device is not CUDA, the head size has no kernel, or
    /// memory is short.
    pub fn new(shape: CacheShape, dtype: DType, device: &Device) -> Result<Self> {
        let device = match device {
            Device::Cuda(dev) => dev.clone(),
            other => {
                return Err(ModelError::Unsupported(format!(
                    "the CUDA attention backend needs a CUDA device, not {:?}",
                    other.location()
                )))
            }
        };
        // Validate the geometry against the kernels (num_heads is only known per call; use a
        // group of one for the check).
        AttentionShape {
            num_heads: shape.num_kv_heads,
            num_kv_heads: shape.num_kv_heads,
            head_dim: shape.head_dim,
            block_size: shape.block_size,
            num_blocks: shape.num_blocks,
        }
        .validate()
        .map_err(kernel_err)?;
        let geometry = Self::geometry_of(shape);
        let mut layers = Vec::with_capacity(shape.num_layers);
        for _ in 0..shape.num_layers {
            let k = kernels::alloc_cache_buffer(&device, geometry, dtype).map_err(kernel_err)?;
            let v = kernels::alloc_cache_buffer(&device, geometry, dtype).map_err(kernel_err)?;
            layers.push((k, v));
        }
        let num_sms = device
            .cuda_stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map(|n| n.max(1) as usize)
            .unwrap_or(132);
        let options = PlanOptions {
            num_sms,
            ..PlanOptions::default()
        };
        Ok(Self {
            shape,
            dtype,
            device,
            layers,
            options,
            step: None,
        })
    }

    /// Override the kernel planning (tests force each decode variant and small partitions).
    pub fn set_plan_options(&mut self, options: PlanOptions) {
        self.options = options;
        self.step = None;
    }

    /// The cache dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn geometry_of(shape: CacheShape) -> CacheGeometry {
        CacheGeometry {
            num_blocks: shape.num_blocks,
            num_kv_heads: shape.num_kv_heads,
            block_size: shape.block_size,
            head_dim: shape.head_dim,
        }
    }
}

/// The layer's scoring as the kernels take it.
fn score_params(how: &LayerAttention) -> kernels::ScoreParams {
    kernels::ScoreParams {
        softmax_scale: how.scale,
        softcap: how.softcap,
        window: how.window,
    }
}

impl AttentionBackend for CudaAttention {
    /// Validate the step's metadata and upload its launch plan and slot mapping once; every
    /// layer of the step reuses them.
    fn begin_step(&mut self, md: &AttentionMetadata, num_heads: usize) -> Result<()> {
        self.step = None;
        let tokens = md.num_tokens();
        md.validate(&self.shape, tokens)?;
        if tokens == 0 {
            return Ok(());
        }
        let seqs = md.seq_specs();
        let shape = AttentionShape {
            num_heads,
            num_kv_heads: self.shape.num_kv_heads,
            head_dim: self.shape.head_dim,
            block_size: self.shape.block_size,
            num_blocks: self.shape.num_blocks,
        };
        let plan = AttentionPlan::build(&seqs, tokens, shape, self.options).map_err(kernel_err)?;
        let plan = DevicePlan::upload(&self.device, plan).map_err(kernel_err)?;
        let slots = self.device.clone_htod(md.slot_mapping.as_slice())?;
        self.step = Some(StepState {
            tokens,
            num_heads,
            plan,
            slots,
        });
        Ok(())
    }

    fn attend(
        &mut self,
        layer: usize,
        how: &LayerAttention,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        how.validate()?;
        if how.sinks.is_some() {
            // gpt-oss's sinks are not in the CUDA kernels yet (the CPU backend runs them).
            return Err(ModelError::Unsupported(
                "attention sinks (gpt-oss) are not implemented in the CUDA attention kernels yet; use --device cpu".into(),
            ));
        }
        let Some(step) = self.step.as_ref() else {
            if q.dims().first() == Some(&0) {
                return Ok(q.zeros_like()?);
            }
            return Err(ModelError::InvalidBatch("attend before begin_step".into()));
        };
        let num_heads = check_layer_inputs(&self.shape, layer, step.tokens, q, k, v)?;
        if num_heads != step.num_heads {
            return Err(ModelError::InvalidBatch(format!(
                "{num_heads} query heads in a step begun for {}",
                step.num_heads
            )));
        }
        // The kernels work in the cache dtype; inputs in another dtype are converted (and the
        // output converted back), never silently mixed.
        let (qc, kc, vc) =
            if q.dtype() == self.dtype && k.dtype() == self.dtype && v.dtype() == self.dtype {
                (q.clone(), k.clone(), v.clone())
            } else {
                (
                    q.to_dtype(self.dtype)?,
                    k.to_dtype(self.dtype)?,
                    v.to_dtype(self.dtype)?,
                )
            };
        let geometry = Self::geometry_of(self.shape);
        let (kcache, vcache) = &mut self.layers[layer];
        kernels::reshape_and_cache(&kc, &vc, kcache, vcache, geometry, &step.slots)
            .map_err(kernel_err)?;
        let out =
            kernels::paged_attention(&qc, kcache, vcache, geometry, &step.plan, score_params(how))
                .map_err(kernel_err)?;
        if out.dtype() != q.dtype() {
            return Ok(out.to_dtype(q.dtype())?);
        }
        Ok(out)
    }

    fn copy_blocks(&mut self, pairs: &[(u32, u32)]) -> Result<()> {
        let geometry = Self::geometry_of(self.shape);
        let elem = self.dtype.size_in_bytes();
        let block_bytes = geometry.block_elements() * elem;
        let mut buffers: Vec<&mut CudaSlice<u8>> =
            self.layers.iter_mut().flat_map(|(k, v)| [k, v]).collect();
        kernels::copy_blocks(
            &self.device,
            &mut buffers,
            block_bytes,
            self.shape.num_blocks,
            pairs,
        )
        .map_err(kernel_err)
    }

    fn shape(&self) -> CacheShape {
        self.shape
    }
}
