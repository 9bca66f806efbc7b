//! The CPU attention kernels with a layer's own scale, Gemma 2's soft-cap, a sliding window and
//! gpt-oss's attention sinks, against a naive masked reference over contiguous keys: both kernels
//! (the vectorized one for 16-token blocks and the portable one), at the window's edges (1, one
//! block ± 1, wider than the context), for a prefill, a chunk over a cached prefix and decode.

use candle_core::{Device, Tensor};
use spindle_model::attention::cpu::CpuAttention;
use spindle_model::{
    AttentionBackend, AttentionMetadata, CacheShape, LayerAttention, SequenceSlice,
};

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0) * 2.5)
        .collect()
}

/// `out[t][h]` for queries at positions `first..first + q_len` over keys `0..ctx`, f64.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (heads, kv_heads, hd): (usize, usize, usize),
    first: usize,
    q_len: usize,
    how: &LayerAttention,
) -> Vec<f32> {
    let group = heads / kv_heads;
    let mut out = vec![0f32; q_len * heads * hd];
    for i in 0..q_len {
        let pos = first + i;
        let lo = match how.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        };
        for h in 0..heads {
            let g = h / group;
            let qv = &q[(i * heads + h) * hd..][..hd];
            let scores: Vec<f64> = (lo..=pos)
                .map(|j| {
                    let kv = &k[(j * kv_heads + g) * hd..][..hd];
                    let dot: f64 = qv.iter().zip(kv).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let s = dot * how.scale as f64;
                    match how.softcap {
                        Some(c) => c as f64 * (s / c as f64).tanh(),
                        None => s,
                    }
                })
                .collect();
            let sink = how.sinks.as_ref().map(|s| s[h] as f64);
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let max = sink.map_or(max, |s| max.max(s));
            let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            // A sink is one more logit in the softmax, with no value.
            let sum: f64 = exps.iter().sum::<f64>() + sink.map_or(0.0, |s| (s - max).exp());
            for d in 0..hd {
                let acc: f64 = (lo..=pos)
                    .zip(&exps)
                    .map(|(j, e)| e * v[(j * kv_heads + g) * hd + d] as f64)
                    .sum();
                out[(i * heads + h) * hd + d] = (acc / sum) as f32;
            }
        }
    }
    out
}

/// Feeds one sequence of `total` tokens in `chunks` (sizes) and compares every chunk's output.
fn check(block_size: usize, hd: usize, total: usize, chunks: &[usize], how: LayerAttention) {
    let (heads, kv_heads) = (4, 2);
    let shape = CacheShape {
        num_layers: 1,
        num_blocks: total.div_ceil(block_size) + 3,
        block_size,
        num_kv_heads: kv_heads,
        head_dim: hd,
    };
    // Blocks in a scrambled order, so the kernel must follow the table.
    let nb = total.div_ceil(block_size);
    let table: Vec<u32> = (0..nb)
        .map(|b| ((b * 5 + 2) % shape.num_blocks) as u32)
        .collect();
    let mut sorted = table.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), nb, "the table repeats a block");
    let q = values(total * heads * hd, 1);
    let k = values(total * kv_heads * hd, 2);
    let v = values(total * kv_heads * hd, 3);
    let mut cache = CpuAttention::new(shape).expect("cache");
    let mut start = 0;
    for &len in chunks {
        let md = AttentionMetadata {
            sequences: vec![SequenceSlice {
                query_start: 0,
                query_len: len,
                context_len: start + len,
                block_table: table[..(start + len).div_ceil(block_size)].to_vec(),
            }],
            slot_mapping: (start..start + len)
                .map(|p| table[p / block_size] * block_size as u32 + (p % block_size) as u32)
                .collect(),
        };
        let t = |x: &[f32], h: usize| {
            Tensor::from_vec(
                x[start * h * hd..(start + len) * h * hd].to_vec(),
                (len, h, hd),
                &Device::Cpu,
            )
            .expect("tensor")
        };
        cache.begin_step(&md, heads).expect("begin");
        let got: Vec<f32> = cache
            .attend(0, &how, &t(&q, heads), &t(&k, kv_heads), &t(&v, kv_heads))
            .expect("attend")
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("vec");
        let want = reference(
            &q[start * heads * hd..],
            &k,
            &v,
            (heads, kv_heads, hd),
            start,
            len,
            &how,
        );
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-4,
            "block {block_size}, head {hd}, chunk at {start}+{len}, {how:?}: error {worst}"
        );
        start += len;
    }
}

#[test]
fn windows_soft_caps_and_scales_match_a_masked_reference() {
    let total = 70;
    // A prefill, then a chunk over the cached prefix, then decode steps.
    let chunks = [37, 29, 1, 1, 1, 1];
    for (block, hd) in [(16, 64), (16, 128), (4, 24)] {
        for window in [
            None,
            Some(1),
            Some(15),
            Some(16),
            Some(17),
            Some(33),
            Some(500),
        ] {
            for softcap in [None, Some(3.0)] {
                // Sinks below, near and above the scores (4 query heads).
                for sinks in [None, Some(vec![-2.0, 0.5, 3.0, 40.0])] {
                    let how = LayerAttention {
                        scale: 0.2,
                        softcap,
                        window,
                        sinks: sinks.map(Into::into),
                    };
                    check(block, hd, total, &chunks, how);
                }
            }
        }
    }
}

#[test]
fn a_window_wider_than_the_context_is_plain_causal_attention() {
    let run = |how: LayerAttention| {
        let mut cache = CpuAttention::new(CacheShape {
            num_layers: 1,
            num_blocks: 2,
            block_size: 16,
            num_kv_heads: 1,
            head_dim: 64,
        })
        .expect("cache");
        let md = AttentionMetadata {
            sequences: vec![SequenceSlice {
                query_start: 0,
                query_len: 20,
                context_len: 20,
                block_table: vec![1, 0],
            }],
            slot_mapping: (0..20)
                .map(|p| if p < 16 { 16 + p } else { p - 16 })
                .collect(),
        };
        let t =
            |seed| Tensor::from_vec(values(20 * 64, seed), (20, 1, 64), &Device::Cpu).expect("t");
        cache.begin_step(&md, 1).expect("begin");
        cache
            .attend(0, &how, &t(1), &t(2), &t(3))
            .expect("attend")
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec")
    };
    let causal = LayerAttention::causal(64);
    let wide = LayerAttention {
        window: Some(20),
        ..causal.clone()
    };
    assert_eq!(run(causal.clone()), run(wide), "bit-identical");
    let narrow = LayerAttention {
        window: Some(19),
        ..causal.clone()
    };
    assert_ne!(run(causal), run(narrow));
}

#[test]
fn bad_layer_settings_are_errors() {
    let mut cache = CpuAttention::new(CacheShape {
        num_layers: 1,
        num_blocks: 1,
        block_size: 16,
        num_kv_heads: 1,
        head_dim: 8,
    })
    .expect("cache");
    let md = AttentionMetadata {
        sequences: vec![SequenceSlice {
            query_start: 0,
            query_len: 1,
            context_len: 1,
            block_table: vec![0],
        }],
        slot_mapping: vec![0],
    };
    let x = Tensor::zeros((1, 1, 8), candle_core::DType::F32, &Device::Cpu).expect("x");
    cache.begin_step(&md, 1).expect("begin");
    for how in [
        LayerAttention {
            window: Some(0),
            ..LayerAttention::causal(8)
        },
        LayerAttention {
            softcap: Some(0.0),
            ..LayerAttention::causal(8)
        },
        LayerAttention {
            scale: f32::NAN,
            ..LayerAttention::causal(8)
        },
    ] {
        assert!(cache.attend(0, &how, &x, &x, &x).is_err(), "{how:?}");
    }
}
