//! Fused element-wise kernels on candle CUDA tensors: RMSNorm (with and without the residual
//! add), rotary embedding in place, SiLU-and-mul. Each replaces several candle ops (and their
//! intermediate tensors) with one pass over memory. They are not wired into the model yet; see
//! docs/cuda.md for where they go in `llama.rs`.

use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Shape, Storage, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::error::{KernelError, Result};
use crate::launch::{
    aligned16, alloc_output, as_i32, as_i64, cuda_device, function, grid_dim, rows_of, view,
    KernelFloat,
};
use crate::ptx;

fn same_dtype(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(KernelError::Unsupported(format!(
            "{what}: {:?} vs {:?}",
            a.dtype(),
            b.dtype()
        )));
    }
    Ok(())
}

fn threads_for(units: usize) -> u32 {
    (units.clamp(32, 1024).div_ceil(32) * 32) as u32
}

fn wrap<T: KernelFloat>(
    slice: cudarc::driver::CudaSlice<T>,
    dev: candle_core::CudaDevice,
    shape: Shape,
) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev)),
        shape,
        BackpropOp::none(),
        false,
    )
}

macro_rules! dispatch {
    ($dtype:expr, $f:ident, $($arg:expr),*) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            other => Err(KernelError::Unsupported(format!("dtype {other:?} (the kernels take f32, f16, bf16)"))),
        }
    };
}

/// `x / sqrt(mean(x^2) + eps) * weight` over the last dimension, in one pass with fp32 statistics.
/// `x` may have strided rows; the result is contiguous with x's shape.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    same_dtype(x, weight, "rms_norm weight")?;
    dispatch!(x.dtype(), rms_norm_t, x, weight, eps)
}

fn rms_norm_t<T: KernelFloat>(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let es = std::mem::size_of::<T>();
    let vec = 16 / es;
    let (rows, hidden, x_stride) = rows_of(x, 1, "rms_norm input")?;
    let weight = weight.contiguous()?;
    if weight.elem_count() != hidden {
        return Err(KernelError::Unsupported(format!(
            "rms_norm weight {:?} for rows of {hidden}",
            weight.dims()
        )));
    }
    let dev = cuda_device(x, "rms_norm input")?;
    let mut out = alloc_output::<T>(&dev, rows * hidden)?;
    if rows > 0 && hidden > 0 {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = weight.storage_and_layout();
        let vectorized =
            hidden % vec == 0 && aligned16(xl, x_stride, es) && aligned16(wl, hidden, es);
        let xv = view::<T>(&xs, xl, "rms_norm input")?;
        let wv = view::<T>(&ws, wl, "rms_norm weight")?;
        let func = function(
            &dev,
            "rms_norm",
            ptx::RMS_NORM,
            &format!("rms_norm_{}", T::SUFFIX),
        )?;
        let cfg = LaunchConfig {
            grid_dim: (grid_dim(rows, "rows")?, 1, 1),
            block_dim: (
                threads_for(if vectorized { hidden / vec } else { hidden }),
                1,
                1,
            ),
            shared_mem_bytes: 0,
        };
        let (out_stride, x_stride, hidden_i, vectorized) = (
            as_i64(hidden),
            as_i64(x_stride),
            as_i32(hidden, "hidden")?,
            vectorized as i32,
        );
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&mut out)
            .arg(&out_stride)
            .arg(&xv)
            .arg(&x_stride)
            .arg(&wv)
            .arg(&hidden_i)
            .arg(&eps)
            .arg(&vectorized);
        unsafe { b.launch(cfg) }?;
    }
    Ok(wrap(out, dev, x.shape().clone()))
}

/// Residual add fused with RMSNorm: returns `(rms_norm(x + residual) * weight, x + residual)`,
/// the sum rounded to the dtype first exactly as the unfused graph computes it.
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    same_dtype(x, residual, "add_rms_norm residual")?;
    same_dtype(x, weight, "add_rms_norm weight")?;
    if x.dims() != residual.dims() {
        return Err(KernelError::Unsupported(format!(
            "x {:?} vs residual {:?}",
            x.dims(),
            residual.dims()
        )));
    }
    dispatch!(x.dtype(), add_rms_norm_t, x, residual, weight, eps)
}

fn add_rms_norm_t<T: KernelFloat>(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let es = std::mem::size_of::<T>();
    let vec = 16 / es;
    let (x, residual, weight) = (
        x.contiguous()?,
        residual.contiguous()?,
        weight.contiguous()?,
    );
    let (rows, hidden, _) = rows_of(&x, 1, "add_rms_norm input")?;
    if weight.elem_count() != hidden {
        return Err(KernelError::Unsupported(format!(
            "rms_norm weight {:?} for rows of {hidden}",
            weight.dims()
        )));
    }
    let dev = cuda_device(&x, "add_rms_norm input")?;
    let mut out = alloc_output::<T>(&dev, rows * hidden)?;
    let mut sum = alloc_output::<T>(&dev, rows * hidden)?;
    if rows > 0 && hidden > 0 {
        let (xs, xl) = x.storage_and_layout();
        let (rs, rl) = residual.storage_and_layout();
        let (ws, wl) = weight.storage_and_layout();
        let vectorized = hidden % vec == 0
            && aligned16(xl, hidden, es)
            && aligned16(rl, hidden, es)
            && aligned16(wl, hidden, es);
        let xv = view::<T>(&xs, xl, "add_rms_norm input")?;
        let rv = view::<T>(&rs, rl, "add_rms_norm residual")?;
        let wv = view::<T>(&ws, wl, "add_rms_norm weight")?;
        let func = function(
            &dev,
            "rms_norm",
            ptx::RMS_NORM,
            &format!("add_rms_norm_{}", T::SUFFIX),
        )?;
        let cfg = LaunchConfig {
            grid_dim: (grid_dim(rows, "rows")?, 1, 1),
            block_dim: (
                threads_for(if vectorized { hidden / vec } else { hidden }),
                1,
                1,
            ),
            shared_mem_bytes: 0,
        };
        let (stride, hidden_i, vectorized) =
            (as_i64(hidden), as_i32(hidden, "hidden")?, vectorized as i32);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&mut out)
            .arg(&mut sum)
            .arg(&stride)
            .arg(&xv)
            .arg(&rv)
            .arg(&wv)
            .arg(&hidden_i)
            .arg(&eps)
            .arg(&vectorized);
        unsafe { b.launch(cfg) }?;
    }
    let shape = x.shape().clone();
    Ok((wrap(out, dev.clone(), shape.clone()), wrap(sum, dev, shape)))
}

/// Rotate `q` (`[tokens, heads, head_dim]`) and `k` (`[tokens, kv_heads, head_dim]`) in place,
/// Hugging Face rotate-half layout, token `i` at `positions[i]` (u32), with `cos`/`sin` tables
/// `[max_positions, head_dim / 2]` in q's dtype. Token rows may be strided (views into the fused
/// qkv projection). This writes into q's and k's storage: any tensor sharing that storage sees the
/// rotation, as with candle's in-place ops.
pub fn rotary_embedding_inplace(
    q: &Tensor,
    k: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    positions: &Tensor,
) -> Result<()> {
    same_dtype(q, k, "rotary k")?;
    same_dtype(q, cos, "rotary cos")?;
    same_dtype(q, sin, "rotary sin")?;
    if positions.dtype() != DType::U32 {
        return Err(KernelError::Unsupported(format!(
            "positions must be u32, not {:?}",
            positions.dtype()
        )));
    }
    dispatch!(q.dtype(), rotary_t, q, k, cos, sin, positions)
}

fn rotary_t<T: KernelFloat>(
    q: &Tensor,
    k: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    positions: &Tensor,
) -> Result<()> {
    let es = std::mem::size_of::<T>();
    let vec = 16 / es;
    let (tokens, heads, d) = q.dims3()?;
    let (k_tokens, kv_heads, k_d) = k.dims3()?;
    if k_tokens != tokens || k_d != d || d % 2 != 0 {
        return Err(KernelError::Unsupported(format!(
            "rotary: q {:?} vs k {:?}",
            q.dims(),
            k.dims()
        )));
    }
    let half = d / 2;
    let (cos, sin, positions) = (
        cos.contiguous()?,
        sin.contiguous()?,
        positions.contiguous()?,
    );
    let (max_positions, cos_half) = cos.dims2()?;
    if cos_half != half || sin.dims2()? != (max_positions, half) || max_positions == 0 {
        return Err(KernelError::Unsupported(format!(
            "rotary tables {:?} for head_dim {d}",
            cos.dims()
        )));
    }
    if positions.elem_count() != tokens {
        return Err(KernelError::Unsupported(format!(
            "{} positions for {tokens} tokens",
            positions.elem_count()
        )));
    }
    if tokens == 0 {
        return Ok(());
    }
    let (_, _, q_stride) = rows_of(q, 2, "rotary q")?;
    let (_, _, k_stride) = rows_of(k, 2, "rotary k")?;
    let dev = cuda_device(q, "rotary q")?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (cs, cl) = cos.storage_and_layout();
    let (ss, sl) = sin.storage_and_layout();
    let (ps, pl) = positions.storage_and_layout();
    let vectorized = half % vec == 0
        && aligned16(ql, q_stride, es)
        && aligned16(kl, k_stride, es)
        && aligned16(cl, half, es)
        && aligned16(sl, half, es);
    let qv = view::<T>(&qs, ql, "rotary q")?;
    let kv = view::<T>(&ks, kl, "rotary k")?;
    let cv = view::<T>(&cs, cl, "rotary cos")?;
    let sv = view::<T>(&ss, sl, "rotary sin")?;
    let pv = view::<u32>(&ps, pl, "positions")?;
    let func = function(
        &dev,
        "rotary",
        ptx::ROTARY,
        &format!("rotary_embedding_{}", T::SUFFIX),
    )?;
    let units = (heads + kv_heads) * if vectorized { half / vec } else { half };
    let cfg = LaunchConfig {
        grid_dim: (grid_dim(tokens, "tokens")?, 1, 1),
        block_dim: (threads_for(units).min(256), 1, 1),
        shared_mem_bytes: 0,
    };
    let (q_stride, k_stride) = (as_i64(q_stride), as_i64(k_stride));
    let (max_pos, heads_i, kv_heads_i, d_i, vectorized) = (
        as_i32(max_positions, "max positions")?,
        as_i32(heads, "heads")?,
        as_i32(kv_heads, "kv heads")?,
        as_i32(d, "head_dim")?,
        vectorized as i32,
    );
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&qv)
        .arg(&q_stride)
        .arg(&kv)
        .arg(&k_stride)
        .arg(&cv)
        .arg(&sv)
        .arg(&pv)
        .arg(&max_pos)
        .arg(&heads_i)
        .arg(&kv_heads_i)
        .arg(&d_i)
        .arg(&vectorized);
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// SwiGLU on the fused gate/up projection: `x` is `[rows, 2 * d]` (gate | up), the result is
/// `[rows, d]` = `silu(gate) * up`, computed in fp32 and rounded once.
pub fn silu_and_mul(x: &Tensor) -> Result<Tensor> {
    dispatch!(x.dtype(), silu_and_mul_t, x)
}

fn silu_and_mul_t<T: KernelFloat>(x: &Tensor) -> Result<Tensor> {
    let es = std::mem::size_of::<T>();
    let vec = 16 / es;
    let (rows, width, x_stride) = rows_of(x, 1, "silu_and_mul input")?;
    if width % 2 != 0 {
        return Err(KernelError::Unsupported(format!(
            "silu_and_mul: odd last dimension {width}"
        )));
    }
    let d = width / 2;
    let dev = cuda_device(x, "silu_and_mul input")?;
    let mut out = alloc_output::<T>(&dev, rows * d)?;
    if rows > 0 && d > 0 {
        let (xs, xl) = x.storage_and_layout();
        // The up half starts d elements in: it must be aligned too.
        let vectorized = d % vec == 0 && aligned16(xl, x_stride, es);
        let xv = view::<T>(&xs, xl, "silu_and_mul input")?;
        let func = function(
            &dev,
            "activation",
            ptx::ACTIVATION,
            &format!("silu_and_mul_{}", T::SUFFIX),
        )?;
        let threads = 256usize;
        let cfg = LaunchConfig {
            grid_dim: (
                grid_dim(rows, "rows")?,
                grid_dim(d.div_ceil(vec).div_ceil(threads), "columns")?,
                1,
            ),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (out_stride, x_stride, d_i, vectorized) = (
            as_i64(d),
            as_i64(x_stride),
            as_i32(d, "width")?,
            vectorized as i32,
        );
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&mut out)
            .arg(&out_stride)
            .arg(&xv)
            .arg(&x_stride)
            .arg(&d_i)
            .arg(&vectorized);
        unsafe { b.launch(cfg) }?;
    }
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = d;
    }
    Ok(wrap(out, dev, Shape::from(dims)))
}
