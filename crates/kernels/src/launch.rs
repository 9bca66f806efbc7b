//! Launch plumbing shared by the wrappers: dtype dispatch, device views of candle tensors, module
//! loading on candle's device (so every kernel runs on candle's stream, ordered with candle's
//! own ops), and the shared-memory opt-in above 48 KiB.

use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, DType, Layout, Storage, Tensor};
use cudarc::driver::sys::CUfunction_attribute;
use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::{CudaFunction, CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};

use crate::error::{KernelError, Result};

/// The element types the kernels are instantiated for; `SUFFIX` picks the kernel symbol.
pub trait KernelFloat: CudaDType + DeviceRepr + ValidAsZeroBits + Copy + 'static {
    /// Kernel-name suffix (`f32`, `f16`, `bf16`).
    const SUFFIX: &'static str;
    /// NaN, written into outputs before a launch when poisoning is on.
    const POISON: Self;
}

impl KernelFloat for f32 {
    const SUFFIX: &'static str = "f32";
    const POISON: Self = f32::NAN;
}
impl KernelFloat for half::f16 {
    const SUFFIX: &'static str = "f16";
    const POISON: Self = half::f16::NAN;
}
impl KernelFloat for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    const POISON: Self = half::bf16::NAN;
}

static POISON_OUTPUTS: AtomicBool = AtomicBool::new(false);

/// Test hook: fill every output buffer the wrappers allocate with NaN instead of zeros, so a test
/// proves each element it checks was written by the kernel (zeros can pass by accident). Off by
/// default; it costs an upload per output.
pub fn set_poison_outputs(on: bool) {
    POISON_OUTPUTS.store(on, Ordering::Relaxed);
}

/// An output buffer of `len` elements: zeros, or NaN when poisoning is on.
pub(crate) fn alloc_output<T: KernelFloat>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    if POISON_OUTPUTS.load(Ordering::Relaxed) {
        Ok(dev.clone_htod(vec![T::POISON; len].as_slice())?)
    } else {
        Ok(dev.alloc_zeros::<T>(len)?)
    }
}

/// Bytes per element of a kernel dtype, or an error naming the dtype the kernels lack.
pub(crate) fn elem_size(dtype: DType) -> Result<usize> {
    match dtype {
        DType::F32 => Ok(4),
        DType::F16 | DType::BF16 => Ok(2),
        other => Err(KernelError::Unsupported(format!(
            "dtype {other:?} (the kernels take f32, f16, bf16)"
        ))),
    }
}

/// The candle CUDA device a tensor lives on.
pub(crate) fn cuda_device(t: &Tensor, what: &str) -> Result<CudaDevice> {
    match t.device().as_cuda_device() {
        Ok(dev) => Ok(dev.clone()),
        Err(_) => Err(KernelError::Unsupported(format!(
            "{what} is on {:?}, not a CUDA device",
            t.device().location()
        ))),
    }
}

/// A device view of a tensor's storage starting at its layout offset. The storage guard the
/// caller holds keeps the allocation alive and unmodified while the view is used.
pub(crate) fn view<'a, T: CudaDType>(
    storage: &'a Storage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    match storage {
        Storage::Cuda(cuda) => {
            let slice = cuda.as_cuda_slice::<T>()?;
            let start = layout.start_offset();
            slice.try_slice(start..).ok_or_else(|| {
                KernelError::Unsupported(format!("{what}: offset {start} is past its storage"))
            })
        }
        _ => Err(KernelError::Unsupported(format!(
            "{what} is not stored on a CUDA device"
        ))),
    }
}

/// `t` seen as `rows` rows of `inner` contiguous elements, the rows `row_stride` apart (the
/// leading dimensions collapsed). `inner_dims` trailing dimensions form a row.
pub(crate) fn rows_of(t: &Tensor, inner_dims: usize, what: &str) -> Result<(usize, usize, usize)> {
    let dims = t.dims();
    let strides = t.stride();
    if dims.len() < inner_dims || inner_dims == 0 {
        return Err(KernelError::Unsupported(format!("{what}: shape {dims:?}")));
    }
    let split = dims.len() - inner_dims;
    let mut expected = 1;
    for i in (split..dims.len()).rev() {
        if dims[i] > 1 && strides[i] != expected {
            return Err(KernelError::Unsupported(format!(
                "{what}: the last {inner_dims} dimensions of {dims:?} (strides {strides:?}) are not contiguous"
            )));
        }
        expected *= dims[i];
    }
    let inner = expected;
    let rows: usize = dims[..split].iter().product();
    let row_stride = if split == 0 {
        inner
    } else {
        strides[split - 1]
    };
    for i in 0..split.saturating_sub(1) {
        if dims[i] > 1 && strides[i] != strides[i + 1] * dims[i + 1] {
            return Err(KernelError::Unsupported(format!(
                "{what}: leading dimensions of {dims:?} (strides {strides:?}) do not collapse into rows"
            )));
        }
    }
    Ok((rows, inner, row_stride))
}

/// Whether 16-byte vector access is legal: the start and every row begin on 16 bytes.
pub(crate) fn aligned16(layout: &Layout, row_stride: usize, elem: usize) -> bool {
    (layout.start_offset() * elem) % 16 == 0 && (row_stride * elem) % 16 == 0
}

/// Load (once per device; candle caches the module) and return one kernel of one module.
/// Launch it with `dev.cuda_stream().launch_builder(&func)`: candle's stream.
pub(crate) fn function(
    dev: &CudaDevice,
    module: &str,
    ptx: &'static str,
    name: &str,
) -> Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, &format!("spindle_{module}"), ptx)?
        .into_cuda_function())
}

/// Allow `bytes` of dynamic shared memory where that exceeds the 48 KiB default.
pub(crate) fn allow_smem(func: &CudaFunction, bytes: usize) -> Result<()> {
    if bytes > 48 * 1024 {
        let bytes = i32::try_from(bytes)
            .map_err(|_| KernelError::Unsupported(format!("{bytes} bytes of shared memory")))?;
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes,
        )?;
    }
    Ok(())
}

/// A grid dimension as the driver wants it, or an error instead of a silent wrap.
pub(crate) fn grid_dim(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n)
        .map_err(|_| KernelError::Unsupported(format!("{what}: {n} exceeds the CUDA grid")))
}

/// An i64 kernel argument from a stride or count.
pub(crate) fn as_i64(n: usize) -> i64 {
    n as i64
}

/// An i32 kernel argument, or an error when it does not fit.
pub(crate) fn as_i32(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n)
        .map_err(|_| KernelError::Unsupported(format!("{what}: {n} does not fit in 32 bits")))
}
