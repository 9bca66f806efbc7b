//! The CUDA attention backend against the CPU backend, and greedy decoding on CUDA against the
//! CPU on SmolLM2's shape with random weights.
//!
//! Compiled only with `--features cuda`; without a usable GPU each test prints why it is skipped
//! and passes. On a GPU machine they run for real (scripts/gpu-check.sh).
#![cfg(feature = "cuda")]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use spindle_kernels::plan::{DecodeVariant, PlanOptions};
use spindle_model::attention::cpu::CpuAttention;
use spindle_model::attention::cuda::CudaAttention;
use spindle_model::{
    AttentionBackend, AttentionMetadata, CacheShape, DTypeChoice, DeviceChoice, ForwardBatch,
    LayerAttention, LlamaModel, LoadFormat, LoadOptions, SequenceSlice,
};

fn gpu(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(dev) => Some(dev),
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
    assert!(out.iter().all(|x| x.is_finite()), "non-finite output");
    let num: f64 = out
        .iter()
        .zip(reference)
        .map(|(o, r)| (o - r) * (o - r))
        .sum();
    let den: f64 = reference.iter().map(|r| r * r).sum();
    (num / den.max(1e-300)).sqrt()
}

/// A sequence in the test's own little block manager.
struct Seq {
    table: Vec<u32>,
    len: usize,
}

/// Build the metadata of one step: each entry is (sequence, new tokens).
fn step_metadata(seqs: &[Seq], step: &[(usize, usize)], block_size: usize) -> AttentionMetadata {
    let mut md = AttentionMetadata::default();
    let mut start = 0;
    for &(s, new) in step {
        let seq = &seqs[s];
        let ctx = seq.len + new;
        assert!(
            seq.table.len() * block_size >= ctx,
            "test bug: sequence {s} needs more blocks"
        );
        for p in seq.len..ctx {
            md.slot_mapping
                .push(seq.table[p / block_size] * block_size as u32 + (p % block_size) as u32);
        }
        md.sequences.push(SequenceSlice {
            query_start: start,
            query_len: new,
            context_len: ctx,
            block_table: seq.table.clone(),
        });
        start += new;
    }
    md
}

#[test]
fn cuda_attention_matches_cpu_across_steps() {
    let Some(dev) = gpu("cuda_attention_matches_cpu_across_steps") else {
        return;
    };
    let mut rng = rng("cuda_attention_matches_cpu_across_steps");
    let block_size = 16;
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
        for (head_dim, num_heads, num_kv_heads) in [(64, 9, 3), (128, 8, 2), (80, 4, 4)] {
            for variant in [DecodeVariant::Auto, DecodeVariant::V2] {
                let shape = CacheShape {
                    num_layers: 2,
                    num_blocks: 40,
                    block_size,
                    num_kv_heads,
                    head_dim,
                };
                let mut cpu = CpuAttention::new(shape).expect("cpu cache");
                let mut gpu_backend = CudaAttention::new(shape, dtype, &dev).expect("cuda cache");
                gpu_backend.set_plan_options(PlanOptions {
                    decode_variant: variant,
                    partition_size: 64,
                    num_sms: 132,
                });
                // A: 37-token prompt; B: 16 (exactly one block); C: 5. D later shares A's first two
                // blocks (a prefix-cache hit); E later forks A (copy-on-write of A's last block).
                let mut seqs = vec![
                    Seq {
                        table: vec![0, 1, 2, 3, 4, 5],
                        len: 0,
                    },
                    Seq {
                        table: vec![6, 7, 8, 15],
                        len: 0,
                    },
                    Seq {
                        table: vec![9],
                        len: 0,
                    },
                    Seq {
                        table: vec![0, 1, 10],
                        len: 32,
                    },
                    Seq {
                        table: vec![0, 1, 11, 12, 13, 14],
                        len: 0,
                    },
                ];
                let steps: Vec<Vec<(usize, usize)>> = vec![
                    vec![(0, 37), (1, 16), (2, 5)],
                    vec![(0, 1), (1, 20), (2, 1)],
                    vec![(3, 10), (0, 1), (1, 1), (2, 1)],
                    vec![(4, 1), (0, 1), (3, 1), (1, 12)],
                    vec![(4, 1), (0, 1), (3, 1), (1, 1), (2, 1)],
                ];
                for (i, step) in steps.iter().enumerate() {
                    if i == 3 {
                        // Fork A into E: E shares A's blocks 0-1, gets a copy of block 2.
                        cpu.copy_blocks(&[(2, 11)]).expect("cpu copy");
                        gpu_backend.copy_blocks(&[(2, 11)]).expect("cuda copy");
                        seqs[4].len = seqs[0].len;
                    }
                    let md = step_metadata(&seqs, step, block_size);
                    let tokens = md.num_tokens();
                    cpu.begin_step(&md, num_heads).expect("cpu step");
                    gpu_backend.begin_step(&md, num_heads).expect("cuda step");
                    for layer in 0..shape.num_layers {
                        // Layer 1 slides (17 keys, across blocks) and soft-caps, as Gemma 2's do.
                        let how = match layer {
                            1 => LayerAttention {
                                window: Some(17),
                                softcap: Some(3.0),
                                ..LayerAttention::causal(head_dim)
                            },
                            _ => LayerAttention::causal(head_dim),
                        };
                        let mut data = |n: usize| -> Vec<f32> {
                            (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
                        };
                        let qd = data(tokens * num_heads * head_dim);
                        let kd = data(tokens * num_kv_heads * head_dim);
                        let vd = data(tokens * num_kv_heads * head_dim);
                        let make = |v: &Vec<f32>, heads: usize, device: &Device| {
                            Tensor::from_vec(v.clone(), (tokens, heads, head_dim), device)
                                .and_then(|t| t.to_dtype(dtype))
                                .expect("tensor")
                        };
                        let cpu_out = cpu
                            .attend(
                                layer,
                                &how,
                                &make(&qd, num_heads, &Device::Cpu),
                                &make(&kd, num_kv_heads, &Device::Cpu),
                                &make(&vd, num_kv_heads, &Device::Cpu),
                            )
                            .expect("cpu attend");
                        let gpu_out = gpu_backend
                            .attend(
                                layer,
                                &how,
                                &make(&qd, num_heads, &dev),
                                &make(&kd, num_kv_heads, &dev),
                                &make(&vd, num_kv_heads, &dev),
                            )
                            .expect("cuda attend");
                        assert_eq!(gpu_out.dims(), cpu_out.dims());
                        assert_eq!(gpu_out.dtype(), dtype);
                        let err = rel_err(&host(&gpu_out), &host(&cpu_out));
                        assert!(
                            err < tol,
                            "{dtype:?} d{head_dim} {num_heads}/{num_kv_heads} {variant:?} step {i} layer {layer}: {err:e}"
                        );
                    }
                    for &(s, new) in step {
                        seqs[s].len += new;
                    }
                }
            }
        }
    }
}

/// SmolLM2's config.json: `$SPINDLE_MODEL_CONFIGS/smollm2-135m.json` when set (the GPU bundle
/// carries the configs; the build machine's checkout is not there), else the repository's.
fn smollm2_config() -> String {
    let dir = match std::env::var_os("SPINDLE_MODEL_CONFIGS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/configs"),
    };
    dir.join("smollm2-135m.json").to_string_lossy().into_owned()
}

fn load(device: DeviceChoice) -> LlamaModel {
    let options = LoadOptions {
        model: smollm2_config(),
        load_format: LoadFormat::Dummy,
        dtype: DTypeChoice::Float32,
        device,
        max_model_len: Some(512),
        seed: 7,
        ..LoadOptions::default()
    };
    spindle_model::load(&options)
        .expect("load dummy SmolLM2")
        .model
}

/// Greedy-decode two sequences together (prefill both, then decode both each step). With
/// `forced`, feed those tokens instead of the argmax (teacher forcing) and return the argmax and
/// logits rows anyway.
fn greedy(
    model: &LlamaModel,
    backend: &mut dyn AttentionBackend,
    prompts: &[Vec<u32>],
    steps: usize,
    forced: Option<&[Vec<u32>]>,
) -> (Vec<Vec<u32>>, Vec<Vec<Vec<f32>>>) {
    let block_size = backend.shape().block_size;
    let blocks_per_seq = backend.shape().num_blocks / prompts.len();
    let mut tokens: Vec<Vec<u32>> = prompts.to_vec();
    let mut generated = vec![Vec::new(); prompts.len()];
    let mut logits_log = vec![Vec::new(); prompts.len()];
    let mut cached = vec![0usize; prompts.len()];
    for step in 0..steps {
        let mut batch = ForwardBatch::default();
        for (s, toks) in tokens.iter().enumerate() {
            let new = &toks[cached[s]..];
            let table: Vec<u32> = (0..blocks_per_seq)
                .map(|b| (s * blocks_per_seq + b) as u32)
                .collect();
            let start = batch.token_ids.len();
            for (i, &t) in new.iter().enumerate() {
                let p = cached[s] + i;
                batch.token_ids.push(t);
                batch.positions.push(p as u32);
                batch
                    .attention
                    .slot_mapping
                    .push(table[p / block_size] * block_size as u32 + (p % block_size) as u32);
            }
            batch.attention.sequences.push(SequenceSlice {
                query_start: start,
                query_len: new.len(),
                context_len: toks.len(),
                block_table: table,
            });
            batch.logit_rows.push((batch.token_ids.len() - 1) as u32);
        }
        let logits = model.forward(&batch, backend).expect("forward");
        let rows = logits.to_vec2::<f32>().expect("logits");
        for (s, row) in rows.into_iter().enumerate() {
            let best = row
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |acc, (i, &v)| {
                    if v > acc.1 {
                        (i, v)
                    } else {
                        acc
                    }
                })
                .0 as u32;
            generated[s].push(best);
            cached[s] = tokens[s].len();
            let next = forced.map(|f| f[s][step]).unwrap_or(best);
            tokens[s].push(next);
            logits_log[s].push(row);
        }
    }
    (generated, logits_log)
}

#[test]
fn greedy_decoding_on_cuda_equals_cpu() {
    let Some(_dev) = gpu("greedy_decoding_on_cuda_equals_cpu") else {
        return;
    };
    let mut rng = rng("greedy_decoding_on_cuda_equals_cpu");
    let cpu_model = load(DeviceChoice::Cpu);
    let gpu_model = load(DeviceChoice::Cuda(0));
    let c = cpu_model.config();
    let shape = CacheShape {
        num_layers: c.num_layers,
        num_blocks: 2 * 8,
        block_size: 16,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    };
    // Prompts of 21 and 16 tokens (a whole block), 24 steps: decode crosses block boundaries.
    let prompts: Vec<Vec<u32>> = [21usize, 16]
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| rng.random_range(0..c.vocab_size as u32))
                .collect()
        })
        .collect();
    let steps = 24;
    let mut cpu_cache = CpuAttention::new(shape).expect("cpu cache");
    let (cpu_tokens, cpu_logits) = greedy(&cpu_model, &mut cpu_cache, &prompts, steps, None);
    // Teacher-force the CPU's tokens on CUDA so one near-tie cannot derail the whole comparison.
    let mut gpu_cache =
        CudaAttention::new(shape, DType::F32, gpu_model.device()).expect("cuda cache");
    let (gpu_tokens, gpu_logits) = greedy(
        &gpu_model,
        &mut gpu_cache,
        &prompts,
        steps,
        Some(&cpu_tokens),
    );
    let mut near_ties = 0;
    for s in 0..prompts.len() {
        for step in 0..steps {
            let (a, b) = (&cpu_logits[s][step], &gpu_logits[s][step]);
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff / scale < 1e-3,
                "sequence {s} step {step}: logits differ by {diff} (scale {scale})"
            );
            if cpu_tokens[s][step] != gpu_tokens[s][step] {
                // Only a genuine near-tie (top-2 margin within the numerical difference) may flip it.
                let mut sorted = a.clone();
                sorted.sort_by(|x, y| y.total_cmp(x));
                let margin = sorted[0] - sorted[1];
                assert!(
                    margin < 2.0 * diff,
                    "greedy decoding differs: sequence {s} step {step}: CPU chose {} and CUDA {} (margin {margin}, \
                     logit difference {diff})",
                    cpu_tokens[s][step],
                    gpu_tokens[s][step]
                );
                eprintln!("sequence {s} step {step}: near-tie (margin {margin}), argmax differs");
                near_ties += 1;
            }
        }
    }
    eprintln!(
        "greedy decoding: CUDA chose the CPU's token at {} of {} steps ({near_ties} near-ties)",
        steps * prompts.len() - near_ties,
        steps * prompts.len()
    );
}
