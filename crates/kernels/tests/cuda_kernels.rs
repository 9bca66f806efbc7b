//! Every CUDA kernel against a float64 CPU reference on fresh random inputs (the seed is printed;
//! set SPINDLE_TEST_SEED to replay one). Outputs are poisoned with NaN before each launch, so an
//! element the kernel failed to write fails the check. Relative error is ||out - ref|| / ||ref||:
//! below 1e-5 for f32, 2e-3 for f16, 1e-2 for bf16.
//!
//! Compiled only with `--features cuda`. Without a usable GPU each test prints why it is skipped
//! and passes; on a GPU machine they run for real (scripts/gpu-check.sh).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use spindle_kernels::attention::{self, CacheGeometry, DevicePlan};
use spindle_kernels::plan::{
    AttentionPlan, AttentionShape, DecodeVariant, PlanOptions, SeqSpec, SUPPORTED_HEAD_DIMS,
};
use spindle_kernels::{ops, set_poison_outputs};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The GPU, or None after printing why the test is skipped.
fn gpu(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(dev) => {
            set_poison_outputs(true);
            Some(dev)
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: no usable CUDA device ({e})");
            None
        }
    }
}

fn rng(test: &str) -> StdRng {
    let seed = std::env::var("SPINDLE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: seed {seed}");
    StdRng::seed_from_u64(seed)
}

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 1e-2,
    }
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// A tensor of `dtype` on `dev` holding `values` (rounded to the dtype).
fn tensor(dev: &Device, values: Vec<f32>, shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(values, shape, dev)
        .and_then(|t| t.to_dtype(dtype))
        .expect("upload")
}

/// A tensor's values (any layout) as f64, exactly as stored.
fn host(t: &Tensor) -> Vec<f64> {
    let v = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("download");
    v.into_iter().map(f64::from).collect()
}

fn rel_err(out: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    if let Some(i) = out.iter().position(|x| !x.is_finite()) {
        panic!("element {i} is {} (not written, or overflow)", out[i]);
    }
    let num: f64 = out
        .iter()
        .zip(reference)
        .map(|(o, r)| (o - r) * (o - r))
        .sum();
    let den: f64 = reference.iter().map(|r| r * r).sum();
    (num / den.max(1e-300)).sqrt()
}

fn check(what: &str, dtype: DType, out: &[f64], reference: &[f64]) {
    let err = rel_err(out, reference);
    assert!(
        err < tolerance(dtype),
        "{what} {dtype:?}: relative error {err:e} >= {:e}",
        tolerance(dtype)
    );
}

fn elem_size(dtype: DType) -> usize {
    dtype.size_in_bytes()
}

/// Values rounded to `dtype`, as little-endian bytes (the cache's raw contents).
fn encode(dtype: DType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * elem_size(dtype));
    for &v in values {
        match dtype {
            DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes()),
            _ => out.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes()),
        }
    }
    out
}

fn decode(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
            .collect(),
        _ => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
            .collect(),
    }
}

fn upload_bytes(dev: &Device, bytes: &[u8]) -> cudarc::driver::CudaSlice<u8> {
    dev.as_cuda_device()
        .expect("cuda")
        .clone_htod(bytes)
        .expect("upload")
}

fn download_bytes(dev: &Device, buf: &cudarc::driver::CudaSlice<u8>) -> Vec<u8> {
    dev.as_cuda_device()
        .expect("cuda")
        .clone_dtoh(buf)
        .expect("download")
}

#[test]
fn every_ptx_module_loads_on_the_device() {
    let Some(dev) = gpu("every_ptx_module_loads_on_the_device") else {
        return;
    };
    let cuda = dev.as_cuda_device().expect("cuda");
    let mut count = 0;
    for (module, ptx) in spindle_kernels::ptx::ALL {
        for line in ptx.lines().filter(|l| l.contains(".entry ")) {
            let name = line
                .split(".entry ")
                .nth(1)
                .and_then(|s| s.split('(').next())
                .map(str::trim)
                .expect("entry name");
            cuda.get_or_load_custom_func(name, &format!("spindle_{module}"), ptx)
                .unwrap_or_else(|e| panic!("{module}: {name} does not load: {e}"));
            count += 1;
        }
    }
    // 3 cache writes + copy_blocks + 15 decode + 15 merge + 15 prefill + 6 norms + 3 rotary + 3 silu.
    assert_eq!(count, 61, "kernel entry points in the PTX");
}

#[test]
fn reshape_and_cache_writes_exactly_the_slots() {
    let Some(dev) = gpu("reshape_and_cache_writes_exactly_the_slots") else {
        return;
    };
    let mut rng = rng("reshape_and_cache");
    for dtype in DTYPES {
        for head_dim in SUPPORTED_HEAD_DIMS {
            let g = CacheGeometry {
                num_blocks: 8,
                num_kv_heads: 2,
                block_size: 16,
                head_dim,
            };
            let row = g.num_kv_heads * head_dim;
            // Slots at block boundaries plus random ones, all distinct.
            let mut slots: Vec<u32> = vec![0, 15, 16, 31, 32, 127];
            let mut rest: Vec<u32> = (0..128).filter(|s| !slots.contains(s)).collect();
            rest.shuffle(&mut rng);
            slots.extend(rest.into_iter().take(31));
            let tokens = slots.len();
            // K and V as strided views (no copy) into one [tokens, 3 * row] matrix, like qkv.
            let qkv = tensor(
                &dev,
                random(&mut rng, tokens * 3 * row, 1.0),
                &[tokens, 3, g.num_kv_heads, head_dim],
                dtype,
            );
            let key = qkv
                .narrow(1, 1, 1)
                .and_then(|t| t.squeeze(1))
                .expect("key view");
            let value = qkv
                .narrow(1, 2, 1)
                .and_then(|t| t.squeeze(1))
                .expect("value view");
            assert!(!key.is_contiguous(), "the test means to pass strided rows");
            let bytes = g.buffer_bytes(dtype).expect("size");
            let mut kc = upload_bytes(&dev, &vec![0xff; bytes]);
            let mut vc = upload_bytes(&dev, &vec![0xff; bytes]);
            let slot_buf = dev
                .as_cuda_device()
                .expect("cuda")
                .clone_htod(slots.as_slice())
                .expect("slots");
            attention::reshape_and_cache(&key, &value, &mut kc, &mut vc, g, &slot_buf)
                .expect("launch");
            let (kh, vh) = (download_bytes(&dev, &kc), download_bytes(&dev, &vc));
            let (kin, vin) = (host(&key), host(&value));
            let es = elem_size(dtype);
            let mut written = vec![false; g.num_blocks * g.block_size];
            for (t, &slot) in slots.iter().enumerate() {
                written[slot as usize] = true;
                let (block, off) = (slot as usize / g.block_size, slot as usize % g.block_size);
                for h in 0..g.num_kv_heads {
                    let dst = ((block * g.num_kv_heads + h) * g.block_size + off) * head_dim * es;
                    let got_k = decode(dtype, &kh[dst..dst + head_dim * es]);
                    let got_v = decode(dtype, &vh[dst..dst + head_dim * es]);
                    let src = (t * g.num_kv_heads + h) * head_dim;
                    assert_eq!(
                        got_k,
                        kin[src..src + head_dim],
                        "{dtype:?} d{head_dim} slot {slot} head {h} K"
                    );
                    assert_eq!(
                        got_v,
                        vin[src..src + head_dim],
                        "{dtype:?} d{head_dim} slot {slot} head {h} V"
                    );
                }
            }
            // Every other slot still holds the poison bytes.
            for (slot, _) in written.iter().enumerate().filter(|(_, w)| !**w) {
                let (block, off) = (slot / g.block_size, slot % g.block_size);
                for h in 0..g.num_kv_heads {
                    let dst = ((block * g.num_kv_heads + h) * g.block_size + off) * head_dim * es;
                    assert!(
                        kh[dst..dst + head_dim * es].iter().all(|&b| b == 0xff),
                        "slot {slot} K overwritten"
                    );
                    assert!(
                        vh[dst..dst + head_dim * es].iter().all(|&b| b == 0xff),
                        "slot {slot} V overwritten"
                    );
                }
            }
        }
    }
}

/// A mixed batch: decode at block boundaries and across tiles, a fresh prefill spanning several
/// CTAs and tiles, and a chunked prefill over a cached prefix.
fn mixed_batch(block_size: usize) -> Vec<(usize, usize)> {
    // (query_len, context_len)
    vec![
        (1, 1),
        (1, block_size),
        (1, block_size + 1),
        (1, 300),
        (33, 33),
        (20, 80),
        (130, 130),
        (1, 64),
        (1, 65),
    ]
}

/// Float64 reference of causal paged attention, reading K/V from the cache's raw bytes.
#[allow(clippy::too_many_arguments)]
fn reference_attention(
    q: &[f64],
    kc: &[f64],
    vc: &[f64],
    seqs: &[SeqSpec<'_>],
    tokens: usize,
    num_heads: usize,
    g: CacheGeometry,
    scale: f64,
) -> Vec<f64> {
    let d = g.head_dim;
    let group = num_heads / g.num_kv_heads;
    let mut out = vec![0f64; tokens * num_heads * d];
    let at = |block: usize, h: usize, off: usize| {
        ((block * g.num_kv_heads + h) * g.block_size + off) * d
    };
    for seq in seqs {
        let first = seq.context_len - seq.query_len;
        for i in 0..seq.query_len {
            let t = seq.query_start + i;
            let visible = first + i + 1;
            for head in 0..num_heads {
                let kvh = head / group;
                let qv = &q[(t * num_heads + head) * d..][..d];
                let scores: Vec<f64> = (0..visible)
                    .map(|p| {
                        let o = at(
                            seq.block_table[p / g.block_size] as usize,
                            kvh,
                            p % g.block_size,
                        );
                        qv.iter()
                            .zip(&kc[o..o + d])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let denom: f64 = weights.iter().sum();
                let dst = &mut out[(t * num_heads + head) * d..][..d];
                for (p, w) in weights.iter().enumerate() {
                    let o = at(
                        seq.block_table[p / g.block_size] as usize,
                        kvh,
                        p % g.block_size,
                    );
                    for (x, v) in dst.iter_mut().zip(&vc[o..o + d]) {
                        *x += w / denom * v;
                    }
                }
            }
        }
    }
    out
}

#[test]
fn paged_attention_matches_reference_on_mixed_batches() {
    let Some(dev) = gpu("paged_attention_matches_reference_on_mixed_batches") else {
        return;
    };
    let mut rng = rng("paged_attention");
    let block_size = 16;
    for dtype in DTYPES {
        for head_dim in SUPPORTED_HEAD_DIMS {
            // MHA, GQA 4 (Llama-3), GQA 3 (SmolLM2), GQA 20 (more than one decode CTA per group).
            for (num_heads, num_kv_heads) in [(2, 2), (8, 2), (6, 2), (20, 1)] {
                let shapes = mixed_batch(block_size);
                let blocks_per_seq: Vec<usize> = shapes
                    .iter()
                    .map(|&(_, c)| c.div_ceil(block_size))
                    .collect();
                let num_blocks = blocks_per_seq.iter().sum::<usize>() + 3;
                let g = CacheGeometry {
                    num_blocks,
                    num_kv_heads,
                    block_size,
                    head_dim,
                };
                // Scattered, non-contiguous block tables.
                let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
                ids.shuffle(&mut rng);
                let mut tables = Vec::new();
                let mut next = 0;
                for n in &blocks_per_seq {
                    tables.push(ids[next..next + n].to_vec());
                    next += n;
                }
                let mut seqs = Vec::new();
                let mut start = 0;
                for (i, &(qlen, ctx)) in shapes.iter().enumerate() {
                    seqs.push(SeqSpec {
                        query_start: start,
                        query_len: qlen,
                        context_len: ctx,
                        block_table: &tables[i],
                    });
                    start += qlen;
                }
                let tokens = start;
                let elems = g.elements().expect("size");
                let (kraw, vraw) = (
                    encode(dtype, &random(&mut rng, elems, 1.0)),
                    encode(dtype, &random(&mut rng, elems, 1.0)),
                );
                let (kc, vc) = (upload_bytes(&dev, &kraw), upload_bytes(&dev, &vraw));
                // q as a strided view (rows of a wider matrix, like q inside qkv), scaled so the
                // softmax is not flat.
                let qwide = tensor(
                    &dev,
                    random(&mut rng, tokens * (num_heads + 2) * head_dim, 2.0),
                    &[tokens, num_heads + 2, head_dim],
                    dtype,
                );
                let q = qwide.narrow(1, 0, num_heads).expect("q view");
                let scale = 1.0 / (head_dim as f64).sqrt();
                let reference = reference_attention(
                    &host(&q),
                    &decode(dtype, &kraw),
                    &decode(dtype, &vraw),
                    &seqs,
                    tokens,
                    num_heads,
                    g,
                    scale,
                );
                let shape = AttentionShape {
                    num_heads,
                    num_kv_heads,
                    head_dim,
                    block_size,
                    num_blocks,
                };
                for (variant, partition) in [
                    (DecodeVariant::V1, 512),
                    (DecodeVariant::V2, 64),
                    (DecodeVariant::Auto, 128),
                ] {
                    let options = PlanOptions {
                        decode_variant: variant,
                        partition_size: partition,
                        num_sms: 132,
                    };
                    let plan = AttentionPlan::build(&seqs, tokens, shape, options).expect("plan");
                    let plan = DevicePlan::upload(dev.as_cuda_device().expect("cuda"), plan)
                        .expect("upload plan");
                    let out = attention::paged_attention(
                        &q,
                        &kc,
                        &vc,
                        g,
                        &plan,
                        attention::ScoreParams::causal(scale as f32),
                    )
                    .expect("launch");
                    check(
                        &format!("attention d{head_dim} heads {num_heads}/{num_kv_heads} {variant:?}/{partition}"),
                        dtype,
                        &host(&out),
                        &reference,
                    );
                }
            }
        }
    }
}

#[test]
fn rms_norm_and_add_rms_norm_match_reference() {
    let Some(dev) = gpu("rms_norm_and_add_rms_norm_match_reference") else {
        return;
    };
    let mut rng = rng("rms_norm");
    let eps = 1e-5f32;
    for dtype in DTYPES {
        // 576: SmolLM2; 4096: Llama-8B; 100: not a multiple of the vector (scalar path).
        for hidden in [64, 576, 4096, 100] {
            let rows = 7;
            let wide = tensor(
                &dev,
                random(&mut rng, rows * (hidden + 8), 3.0),
                &[rows, hidden + 8],
                dtype,
            );
            let x = wide.narrow(1, 8, hidden).expect("strided x");
            let w = tensor(&dev, random(&mut rng, hidden, 1.0), &[hidden], dtype);
            let r = tensor(
                &dev,
                random(&mut rng, rows * hidden, 3.0),
                &[rows, hidden],
                dtype,
            );
            let (xh, wh) = (host(&x), host(&w));
            let norm = |v: &[f64]| -> Vec<f64> {
                v.chunks(hidden)
                    .flat_map(|row| {
                        let ms = row.iter().map(|a| a * a).sum::<f64>() / hidden as f64;
                        let inv = 1.0 / (ms + eps as f64).sqrt();
                        row.iter()
                            .zip(&wh)
                            .map(move |(a, b)| a * inv * b)
                            .collect::<Vec<_>>()
                    })
                    .collect()
            };
            let out = ops::rms_norm(&x, &w, eps).expect("rms_norm");
            check(
                &format!("rms_norm {hidden}"),
                dtype,
                &host(&out),
                &norm(&xh),
            );

            let (normed, sum) = ops::add_rms_norm(&x, &r, &w, eps).expect("add_rms_norm");
            // The sum is rounded to the dtype before the norm, as the unfused graph does.
            let sum_ref: Vec<f64> = host(&(x.add(&r).expect("add")));
            check(
                &format!("add_rms_norm sum {hidden}"),
                dtype,
                &host(&sum),
                &sum_ref,
            );
            check(
                &format!("add_rms_norm {hidden}"),
                dtype,
                &host(&normed),
                &norm(&sum_ref),
            );
        }
    }
}

#[test]
fn rotary_embedding_matches_reference() {
    let Some(dev) = gpu("rotary_embedding_matches_reference") else {
        return;
    };
    let mut rng = rng("rotary");
    for dtype in DTYPES {
        for head_dim in SUPPORTED_HEAD_DIMS {
            let (tokens, heads, kv_heads, max_pos) = (19, 6, 2, 300);
            let half = head_dim / 2;
            let angles: Vec<f32> = random(&mut rng, max_pos * half, 50.0);
            let cos = tensor(
                &dev,
                angles.iter().map(|a| a.cos()).collect(),
                &[max_pos, half],
                dtype,
            );
            let sin = tensor(
                &dev,
                angles.iter().map(|a| a.sin()).collect(),
                &[max_pos, half],
                dtype,
            );
            let mut positions: Vec<u32> = vec![0, 15, 16, 17, 63, 64, 299];
            positions
                .extend((positions.len()..tokens).map(|_| rng.random_range(0..max_pos as u32)));
            let pos = Tensor::new(positions.as_slice(), &dev).expect("positions");
            // q, k and v as strided views (no copy) of one qkv tensor: rotary must change q and k
            // in place and leave v alone.
            let qkv = tensor(
                &dev,
                random(&mut rng, tokens * (heads + 2 * kv_heads) * head_dim, 2.0),
                &[tokens, heads + 2 * kv_heads, head_dim],
                dtype,
            );
            let q = qkv.narrow(1, 0, heads).expect("q");
            let k = qkv.narrow(1, heads, kv_heads).expect("k");
            let v = qkv.narrow(1, heads + kv_heads, kv_heads).expect("v");
            let (qh, kh, ch, sh) = (host(&q), host(&k), host(&cos), host(&sin));
            let vh_before = host(&v);
            let rotate = |x: &[f64], nh: usize| -> Vec<f64> {
                let mut out = x.to_vec();
                for t in 0..tokens {
                    let p = positions[t] as usize;
                    for h in 0..nh {
                        let base = (t * nh + h) * head_dim;
                        for i in 0..half {
                            let (a, b) = (x[base + i], x[base + half + i]);
                            let (c, s) = (ch[p * half + i], sh[p * half + i]);
                            out[base + i] = a * c - b * s;
                            out[base + half + i] = b * c + a * s;
                        }
                    }
                }
                out
            };
            ops::rotary_embedding_inplace(&q, &k, &cos, &sin, &pos).expect("rotary");
            check(
                &format!("rotary q d{head_dim}"),
                dtype,
                &host(&q),
                &rotate(&qh, heads),
            );
            check(
                &format!("rotary k d{head_dim}"),
                dtype,
                &host(&k),
                &rotate(&kh, kv_heads),
            );
            // The V columns of the same rows are untouched.
            assert_eq!(host(&v), vh_before, "rotary wrote into v");
        }
    }
}

#[test]
fn silu_and_mul_matches_reference() {
    let Some(dev) = gpu("silu_and_mul_matches_reference") else {
        return;
    };
    let mut rng = rng("silu_and_mul");
    for dtype in DTYPES {
        for d in [1536, 14336, 100, 8] {
            let rows = 5;
            let x = tensor(
                &dev,
                random(&mut rng, rows * 2 * d, 6.0),
                &[rows, 2 * d],
                dtype,
            );
            let xh = host(&x);
            let reference: Vec<f64> = (0..rows)
                .flat_map(|r| {
                    let row = &xh[r * 2 * d..(r + 1) * 2 * d];
                    (0..d).map(move |i| {
                        let g = row[i];
                        g / (1.0 + (-g).exp()) * row[d + i]
                    })
                })
                .collect();
            let out = ops::silu_and_mul(&x).expect("silu_and_mul");
            assert_eq!(out.dims(), &[rows, d]);
            check(&format!("silu_and_mul {d}"), dtype, &host(&out), &reference);
        }
    }
}

#[test]
fn copy_blocks_copies_whole_blocks_in_every_buffer() {
    let Some(dev) = gpu("copy_blocks_copies_whole_blocks_in_every_buffer") else {
        return;
    };
    let mut rng = rng("copy_blocks");
    let dtype = DType::BF16;
    let g = CacheGeometry {
        num_blocks: 10,
        num_kv_heads: 2,
        block_size: 16,
        head_dim: 80,
    };
    let bytes = g.buffer_bytes(dtype).expect("size");
    let block_bytes = g.block_elements() * elem_size(dtype);
    let originals: Vec<Vec<u8>> = (0..4)
        .map(|_| (0..bytes).map(|_| rng.random::<u8>()).collect())
        .collect();
    let mut bufs: Vec<_> = originals.iter().map(|b| upload_bytes(&dev, b)).collect();
    for pairs in [vec![(1u32, 7u32), (2, 8), (1, 9)], vec![(3, 4), (4, 5)]] {
        let mut expected = originals.clone();
        for (i, buf) in bufs.iter_mut().enumerate() {
            *buf = upload_bytes(&dev, &originals[i]);
        }
        for exp in expected.iter_mut() {
            for &(s, d) in &pairs {
                let src = exp[s as usize * block_bytes..(s as usize + 1) * block_bytes].to_vec();
                exp[d as usize * block_bytes..(d as usize + 1) * block_bytes].copy_from_slice(&src);
            }
        }
        let mut refs: Vec<_> = bufs.iter_mut().collect();
        attention::copy_blocks(
            dev.as_cuda_device().expect("cuda"),
            &mut refs,
            block_bytes,
            g.num_blocks,
            &pairs,
        )
        .expect("copy_blocks");
        for (buf, exp) in bufs.iter().zip(&expected) {
            assert!(download_bytes(&dev, buf) == *exp, "copy {pairs:?} differs");
        }
    }
    let mut refs: Vec<_> = bufs.iter_mut().collect();
    let out_of_range = attention::copy_blocks(
        dev.as_cuda_device().expect("cuda"),
        &mut refs,
        block_bytes,
        10,
        &[(0, 10)],
    );
    assert!(out_of_range.is_err());
}
