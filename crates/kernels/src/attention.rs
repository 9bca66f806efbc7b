//! Paged attention on the GPU: writing new K/V into the paged cache, decode and prefill
//! attention over it, and whole-block copies. The cache buffers are dtype-erased device byte
//! buffers owned by the caller (the model's CUDA attention backend), one K and one V buffer per
//! layer, each laid out `[num_blocks, num_kv_heads, block_size, head_dim]` like the CPU cache.
//!
//! Every launch goes to candle's stream for the tensors' device, so it is ordered with the
//! candle ops before and after it without extra synchronisation.

use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Storage, Tensor};
use cudarc::driver::{CudaSlice, DevicePtrMut, LaunchConfig, PushKernelArg};

use crate::error::{KernelError, Result};
use crate::launch::{
    aligned16, alloc_output, allow_smem, as_i32, as_i64, cuda_device, elem_size, function,
    grid_dim, rows_of, view, KernelFloat,
};
use crate::plan::{
    decode_smem_bytes, prefill_smem_bytes, reduce_smem_bytes, AttentionPlan, DECODE_THREADS,
    PREFILL_THREADS,
};
use crate::ptx;

/// `log2(e)`: the kernels run softmax in base 2.
const LOG2E: f32 = std::f32::consts::LOG2_E;

/// Geometry of one layer's K (or V) cache buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheGeometry {
    /// Blocks in the cache.
    pub num_blocks: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Elements per head row.
    pub head_dim: usize,
}

impl CacheGeometry {
    /// Elements in one block (all heads): the unit `copy_blocks` moves.
    pub fn block_elements(&self) -> usize {
        self.num_kv_heads * self.block_size * self.head_dim
    }

    /// Elements in one layer's K (or V) buffer, or `None` on overflow.
    pub fn elements(&self) -> Option<usize> {
        self.num_blocks.checked_mul(self.block_elements())
    }

    /// Bytes of one buffer at `dtype`, checking the dtype is one the kernels take.
    pub fn buffer_bytes(&self, dtype: DType) -> Result<usize> {
        let es = elem_size(dtype)?;
        self.elements()
            .and_then(|n| n.checked_mul(es))
            .ok_or_else(|| KernelError::Unsupported(format!("a cache of {self:?} overflows")))
    }
}

/// Allocate one zeroed cache buffer (zeros, not garbage: a stray read can never produce NaN).
pub fn alloc_cache_buffer(
    dev: &CudaDevice,
    geometry: CacheGeometry,
    dtype: DType,
) -> Result<CudaSlice<u8>> {
    let bytes = geometry.buffer_bytes(dtype)?;
    Ok(dev.alloc_zeros::<u8>(bytes)?)
}

fn check_cache(
    buf: &CudaSlice<u8>,
    geometry: CacheGeometry,
    dtype: DType,
    what: &str,
) -> Result<()> {
    let bytes = geometry.buffer_bytes(dtype)?;
    if buf.len() != bytes {
        return Err(KernelError::Unsupported(format!(
            "{what}: buffer of {} bytes, the geometry {geometry:?} at {dtype:?} needs {bytes}",
            buf.len()
        )));
    }
    Ok(())
}

/// Write each token's K and V rows (`[tokens, num_kv_heads, head_dim]`, token rows may be
/// strided, e.g. views into the fused qkv projection) into the cache at `slot_mapping[token]`
/// (`block * block_size + offset`; `u32::MAX` skips a padding token).
pub fn reshape_and_cache(
    key: &Tensor,
    value: &Tensor,
    key_cache: &mut CudaSlice<u8>,
    value_cache: &mut CudaSlice<u8>,
    geometry: CacheGeometry,
    slot_mapping: &CudaSlice<u32>,
) -> Result<()> {
    match key.dtype() {
        DType::F32 => {
            reshape_and_cache_t::<f32>(key, value, key_cache, value_cache, geometry, slot_mapping)
        }
        DType::F16 => reshape_and_cache_t::<half::f16>(
            key,
            value,
            key_cache,
            value_cache,
            geometry,
            slot_mapping,
        ),
        DType::BF16 => reshape_and_cache_t::<half::bf16>(
            key,
            value,
            key_cache,
            value_cache,
            geometry,
            slot_mapping,
        ),
        other => Err(KernelError::Unsupported(format!("key dtype {other:?}"))),
    }
}

fn reshape_and_cache_t<T: KernelFloat>(
    key: &Tensor,
    value: &Tensor,
    key_cache: &mut CudaSlice<u8>,
    value_cache: &mut CudaSlice<u8>,
    g: CacheGeometry,
    slot_mapping: &CudaSlice<u32>,
) -> Result<()> {
    let dtype = key.dtype();
    let es = std::mem::size_of::<T>();
    if value.dtype() != dtype {
        return Err(KernelError::Unsupported(format!(
            "key {dtype:?} vs value {:?}",
            value.dtype()
        )));
    }
    for (t, what) in [(key, "key"), (value, "value")] {
        if t.dims().len() != 3 || t.dims()[1] != g.num_kv_heads || t.dims()[2] != g.head_dim {
            return Err(KernelError::Unsupported(format!(
                "{what} {:?}: expected [tokens, {}, {}]",
                t.dims(),
                g.num_kv_heads,
                g.head_dim
            )));
        }
    }
    if key.dims() != value.dims() {
        return Err(KernelError::Unsupported(format!(
            "key {:?} vs value {:?}",
            key.dims(),
            value.dims()
        )));
    }
    check_cache(key_cache, g, dtype, "key cache")?;
    check_cache(value_cache, g, dtype, "value cache")?;
    let (tokens, _, key_stride) = rows_of(key, 2, "key")?;
    let (_, _, value_stride) = rows_of(value, 2, "value")?;
    if slot_mapping.len() != tokens {
        return Err(KernelError::InvalidBatch(format!(
            "{} slots for {tokens} tokens",
            slot_mapping.len()
        )));
    }
    if tokens == 0 {
        return Ok(());
    }
    let dev = cuda_device(key, "key")?;
    let (ks, kl) = key.storage_and_layout();
    let (vs, vl) = value.storage_and_layout();
    if !aligned16(kl, key_stride, es) || !aligned16(vl, value_stride, es) {
        return Err(KernelError::Unsupported(
            "key/value rows are not 16-byte aligned".into(),
        ));
    }
    let kv = view::<T>(&ks, kl, "key")?;
    let vv = view::<T>(&vs, vl, "value")?;
    let func = function(
        &dev,
        "cache",
        ptx::CACHE,
        &format!("reshape_and_cache_{}", T::SUFFIX),
    )?;
    let (num_kv_heads, head_dim, block_size) = (
        as_i32(g.num_kv_heads, "kv heads")?,
        as_i32(g.head_dim, "head_dim")?,
        as_i32(g.block_size, "block size")?,
    );
    let (key_stride, value_stride) = (as_i64(key_stride), as_i64(value_stride));
    let chunks = g.num_kv_heads * g.head_dim * es / 16;
    let threads = chunks.clamp(32, 256).div_ceil(32) * 32;
    let cfg = LaunchConfig {
        grid_dim: (grid_dim(tokens, "tokens")?, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&kv)
        .arg(&vv)
        .arg(key_cache)
        .arg(value_cache)
        .arg(slot_mapping)
        .arg(&num_kv_heads)
        .arg(&head_dim)
        .arg(&block_size)
        .arg(&key_stride)
        .arg(&value_stride);
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// One step's [`AttentionPlan`] with its arrays on the device: uploaded once per step and reused
/// by every layer.
pub struct DevicePlan {
    plan: AttentionPlan,
    decode: Option<[CudaSlice<i32>; 3]>,
    prefill: Option<[CudaSlice<i32>; 6]>,
}

impl DevicePlan {
    /// Copy the plan's arrays to `dev` (a handful of small host-to-device copies).
    pub fn upload(dev: &CudaDevice, plan: AttentionPlan) -> Result<Self> {
        let up = |v: &Vec<i32>| -> Result<CudaSlice<i32>> { Ok(dev.clone_htod(v.as_slice())?) };
        let decode = if plan.decode.is_empty() {
            None
        } else {
            let d = &plan.decode;
            Some([up(&d.entry_token)?, up(&d.entry_ctx)?, up(&d.block_tables)?])
        };
        let prefill = if plan.prefill.is_empty() {
            None
        } else {
            let p = &plan.prefill;
            Some([
                up(&p.seq_qstart)?,
                up(&p.seq_qlen)?,
                up(&p.seq_ctx)?,
                up(&p.block_tables)?,
                up(&p.work_seq)?,
                up(&p.work_qoff)?,
            ])
        };
        Ok(Self {
            plan,
            decode,
            prefill,
        })
    }

    /// The host-side plan.
    pub fn plan(&self) -> &AttentionPlan {
        &self.plan
    }
}

/// Causal attention of every query row in `q` (`[tokens, num_heads, head_dim]`, token rows may be
/// strided) over the paged cache, as planned: decode entries through the decode kernel (split-K
/// plus merge when the plan says so), multi-token sequences through the prefill kernel. The new
/// tokens' K/V must already be in the cache. Returns `[tokens, num_heads, head_dim]` in q's dtype;
/// rows no sequence claims are zero (NaN under [`crate::set_poison_outputs`]).
pub fn paged_attention(
    q: &Tensor,
    key_cache: &CudaSlice<u8>,
    value_cache: &CudaSlice<u8>,
    geometry: CacheGeometry,
    plan: &DevicePlan,
    params: ScoreParams,
) -> Result<Tensor> {
    params.validate()?;
    match q.dtype() {
        DType::F32 => paged_attention_t::<f32>(q, key_cache, value_cache, geometry, plan, params),
        DType::F16 => {
            paged_attention_t::<half::f16>(q, key_cache, value_cache, geometry, plan, params)
        }
        DType::BF16 => {
            paged_attention_t::<half::bf16>(q, key_cache, value_cache, geometry, plan, params)
        }
        other => Err(KernelError::Unsupported(format!("q dtype {other:?}"))),
    }
}

/// How one layer scores keys: the softmax scale, an optional soft-cap of the scaled scores
/// (`cap * tanh(s / cap)`, Gemma 2) and an optional sliding window (a query at `p` sees keys
/// `p - window + 1 ..= p`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreParams {
    pub softmax_scale: f32,
    pub softcap: Option<f32>,
    pub window: Option<usize>,
}

impl ScoreParams {
    /// Plain causal attention at `softmax_scale`.
    pub fn causal(softmax_scale: f32) -> Self {
        Self {
            softmax_scale,
            softcap: None,
            window: None,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(KernelError::InvalidBatch(m));
        if !(self.softmax_scale.is_finite() && self.softmax_scale > 0.0) {
            return bad(format!("softmax scale {}", self.softmax_scale));
        }
        if self.softcap.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
            return bad(format!("soft-cap {:?}", self.softcap));
        }
        if self.window.is_some_and(|w| w == 0 || w > i32::MAX as usize) {
            return bad(format!("window {:?}", self.window));
        }
        Ok(())
    }

    /// The kernels' arguments: window (0: none) and the soft-cap in the base-2 score domain
    /// (0: none).
    fn kernel_args(&self) -> (i32, f32) {
        (
            self.window.map_or(0, |w| w as i32),
            self.softcap.map_or(0.0, |c| c * LOG2E),
        )
    }
}

fn paged_attention_t<T: KernelFloat>(
    q: &Tensor,
    key_cache: &CudaSlice<u8>,
    value_cache: &CudaSlice<u8>,
    g: CacheGeometry,
    dplan: &DevicePlan,
    params: ScoreParams,
) -> Result<Tensor> {
    let plan = &dplan.plan;
    let shape = plan.shape;
    let es = std::mem::size_of::<T>();
    let dtype = q.dtype();
    if shape.num_kv_heads != g.num_kv_heads
        || shape.head_dim != g.head_dim
        || shape.block_size != g.block_size
    {
        return Err(KernelError::Unsupported(format!(
            "plan {shape:?} does not match cache {g:?}"
        )));
    }
    let (tokens, heads, d) = q.dims3()?;
    if tokens != plan.num_tokens || heads != shape.num_heads || d != shape.head_dim {
        return Err(KernelError::Unsupported(format!(
            "q {:?}: the plan expects [{}, {}, {}]",
            q.dims(),
            plan.num_tokens,
            shape.num_heads,
            shape.head_dim
        )));
    }
    check_cache(key_cache, g, dtype, "key cache")?;
    check_cache(value_cache, g, dtype, "value cache")?;
    let (_, _, q_stride) = rows_of(q, 2, "q")?;
    let dev = cuda_device(q, "q")?;
    let row = heads * d;
    let mut out = alloc_output::<T>(&dev, tokens * row)?;
    if tokens > 0 {
        let (qs, ql) = q.storage_and_layout();
        if !aligned16(ql, q_stride, es) {
            return Err(KernelError::Unsupported(
                "q rows are not 16-byte aligned".into(),
            ));
        }
        let qv = view::<T>(&qs, ql, "q")?;
        let (out_stride, q_stride) = (as_i64(row), as_i64(q_stride));
        let scale_log2 = params.softmax_scale * LOG2E;
        let (window, softcap_log2) = params.kernel_args();
        let (num_heads, num_kv_heads, block_size) = (
            as_i32(shape.num_heads, "heads")?,
            as_i32(shape.num_kv_heads, "kv heads")?,
            as_i32(shape.block_size, "block size")?,
        );

        if let Some([entry_token, entry_ctx, tables]) = &dplan.decode {
            let dp = &plan.decode;
            let name = format!("paged_decode_{}_d{d}", T::SUFFIX);
            let func = function(&dev, "paged_attention", ptx::PAGED_ATTENTION, &name)?;
            let smem = decode_smem_bytes(es, d);
            allow_smem(&func, smem)?;
            let cfg = LaunchConfig {
                grid_dim: (
                    grid_dim(shape.num_kv_heads * dp.head_chunks, "decode heads")?,
                    grid_dim(dp.len(), "decode entries")?,
                    grid_dim(dp.num_partitions, "partitions")?,
                ),
                block_dim: (DECODE_THREADS, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let (bt_stride, partition_size, max_parts, heads_per_cta) = (
                as_i32(dp.bt_stride, "block table stride")?,
                as_i32(dp.partition_size, "partition size")?,
                as_i32(dp.num_partitions, "partitions")?,
                as_i32(dp.heads_per_cta, "heads per CTA")?,
            );
            if dp.is_split() {
                let rows = dp.len() * shape.num_heads * dp.num_partitions;
                let part_out = alloc_output::<f32>(&dev, rows * d)?;
                let part_ml = alloc_output::<f32>(&dev, rows * 2)?;
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&func);
                b.arg(&mut out)
                    .arg(&out_stride)
                    .arg(&part_out)
                    .arg(&part_ml)
                    .arg(&qv)
                    .arg(&q_stride)
                    .arg(key_cache)
                    .arg(value_cache)
                    .arg(entry_token)
                    .arg(entry_ctx)
                    .arg(tables)
                    .arg(&bt_stride)
                    .arg(&num_heads)
                    .arg(&num_kv_heads)
                    .arg(&block_size)
                    .arg(&scale_log2)
                    .arg(&partition_size)
                    .arg(&max_parts)
                    .arg(&heads_per_cta)
                    .arg(&window)
                    .arg(&softcap_log2);
                unsafe { b.launch(cfg) }?;

                let name = format!("paged_decode_reduce_{}_d{d}", T::SUFFIX);
                let func = function(&dev, "paged_attention", ptx::PAGED_ATTENTION, &name)?;
                let smem = reduce_smem_bytes(dp.num_partitions);
                allow_smem(&func, smem)?;
                let cfg = LaunchConfig {
                    grid_dim: (
                        grid_dim(shape.num_heads, "heads")?,
                        grid_dim(dp.len(), "decode entries")?,
                        1,
                    ),
                    block_dim: (DECODE_THREADS, 1, 1),
                    shared_mem_bytes: smem as u32,
                };
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&func);
                b.arg(&mut out)
                    .arg(&out_stride)
                    .arg(&part_out)
                    .arg(&part_ml)
                    .arg(entry_token)
                    .arg(entry_ctx)
                    .arg(&num_heads)
                    .arg(&partition_size)
                    .arg(&max_parts);
                unsafe { b.launch(cfg) }?;
            } else {
                let null: u64 = 0; // partial buffers are not touched by v1
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&func);
                b.arg(&mut out)
                    .arg(&out_stride)
                    .arg(&null)
                    .arg(&null)
                    .arg(&qv)
                    .arg(&q_stride)
                    .arg(key_cache)
                    .arg(value_cache)
                    .arg(entry_token)
                    .arg(entry_ctx)
                    .arg(tables)
                    .arg(&bt_stride)
                    .arg(&num_heads)
                    .arg(&num_kv_heads)
                    .arg(&block_size)
                    .arg(&scale_log2)
                    .arg(&partition_size)
                    .arg(&max_parts)
                    .arg(&heads_per_cta)
                    .arg(&window)
                    .arg(&softcap_log2);
                unsafe { b.launch(cfg) }?;
            }
        }

        if let Some([qstart, qlen, ctx, tables, work_seq, work_qoff]) = &dplan.prefill {
            let pp = &plan.prefill;
            let name = format!("prefill_attention_{}_d{d}", T::SUFFIX);
            let func = function(&dev, "prefill_attention", ptx::PREFILL_ATTENTION, &name)?;
            let smem = prefill_smem_bytes(es, d);
            allow_smem(&func, smem)?;
            let cfg = LaunchConfig {
                grid_dim: (
                    grid_dim(pp.work_seq.len(), "prefill work")?,
                    grid_dim(shape.num_kv_heads, "kv heads")?,
                    1,
                ),
                block_dim: (PREFILL_THREADS, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let (bt_stride, tokens_per_cta) = (
                as_i32(pp.bt_stride, "block table stride")?,
                as_i32(pp.tokens_per_cta, "tokens per CTA")?,
            );
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&mut out)
                .arg(&out_stride)
                .arg(&qv)
                .arg(&q_stride)
                .arg(key_cache)
                .arg(value_cache)
                .arg(qstart)
                .arg(qlen)
                .arg(ctx)
                .arg(tables)
                .arg(&bt_stride)
                .arg(work_seq)
                .arg(work_qoff)
                .arg(&num_heads)
                .arg(&num_kv_heads)
                .arg(&block_size)
                .arg(&scale_log2)
                .arg(&tokens_per_cta)
                .arg(&window)
                .arg(&softcap_log2);
            unsafe { b.launch(cfg) }?;
        }
    }
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev));
    Ok(Tensor::from_storage(
        storage,
        (tokens, heads, d),
        BackpropOp::none(),
        false,
    ))
}

/// Copy whole blocks, `(src, dst)` pairs, in every buffer of `buffers` (all layers' K and V):
/// copy-on-write after a fork. `block_bytes` is one block of one buffer.
pub fn copy_blocks(
    dev: &CudaDevice,
    buffers: &mut [&mut CudaSlice<u8>],
    block_bytes: usize,
    num_blocks: usize,
    pairs: &[(u32, u32)],
) -> Result<()> {
    if pairs.is_empty() || buffers.is_empty() {
        return Ok(());
    }
    if let Some(&(s, d)) = pairs
        .iter()
        .find(|&&(s, d)| s as usize >= num_blocks || d as usize >= num_blocks)
    {
        return Err(KernelError::InvalidBatch(format!(
            "block copy {s} -> {d} is out of range"
        )));
    }
    if block_bytes % 16 != 0 {
        return Err(KernelError::Unsupported(format!(
            "blocks of {block_bytes} bytes (not a multiple of 16)"
        )));
    }
    if let Some(b) = buffers.iter().find(|b| b.len() < block_bytes * num_blocks) {
        return Err(KernelError::Unsupported(format!(
            "a cache buffer of {} bytes is too small",
            b.len()
        )));
    }
    // CTAs are unordered: a block that is written must not be read in the same launch.
    let sources: std::collections::HashSet<u32> = pairs.iter().map(|p| p.0).collect();
    let batches: Vec<&[(u32, u32)]> = if pairs.iter().any(|p| sources.contains(&p.1)) {
        pairs.chunks(1).collect()
    } else {
        vec![pairs]
    };
    let func = function(dev, "cache", ptx::CACHE, "copy_blocks")?;
    let stream = dev.cuda_stream();
    let mut addresses = Vec::with_capacity(buffers.len());
    let mut guards = Vec::with_capacity(buffers.len());
    for buf in buffers.iter_mut() {
        let (ptr, guard) = buf.device_ptr_mut(&stream);
        addresses.push(ptr);
        guards.push(guard);
    }
    let addresses = dev.clone_htod(addresses.as_slice())?;
    let block_bytes = as_i64(block_bytes);
    for batch in batches {
        let flat: Vec<u32> = batch.iter().flat_map(|&(s, d)| [s, d]).collect();
        let flat = dev.clone_htod(flat.as_slice())?;
        let cfg = LaunchConfig {
            grid_dim: (
                grid_dim(batch.len(), "block pairs")?,
                grid_dim(guards.len(), "cache buffers")?,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&addresses).arg(&flat).arg(&block_bytes);
        unsafe { b.launch(cfg) }?;
    }
    drop(guards);
    Ok(())
}
