//! CPU paged attention (spindle_model::attention::cpu) for one layer with SmolLM2-135M's shapes
//! (9 query heads, 3 KV heads, head_dim 64, block size 16): decode batches at several context
//! lengths, and prefill of one prompt. Each call also writes the new K/V into the cache, as in
//! the model's forward pass.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use spindle_model::attention::cpu::CpuAttention;
use spindle_model::{
    AttentionBackend, AttentionMetadata, CacheShape, LayerAttention, SequenceSlice,
};

const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const BLOCK: usize = 16;

fn how() -> LayerAttention {
    LayerAttention::causal(HEAD_DIM)
}

/// A cache large enough for `seqs` sequences of `context` tokens, each on its own blocks.
fn backend(seqs: usize, context: usize) -> CpuAttention {
    let shape = CacheShape {
        num_layers: 1,
        num_blocks: seqs * context.div_ceil(BLOCK),
        block_size: BLOCK,
        num_kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
    };
    CpuAttention::new(shape).expect("cache allocation")
}

/// Metadata for `seqs` sequences of `context` tokens whose last `query_len` tokens are new.
fn metadata(seqs: usize, context: usize, query_len: usize) -> AttentionMetadata {
    let blocks_per_seq = context.div_ceil(BLOCK);
    let mut md = AttentionMetadata::default();
    for s in 0..seqs {
        let block_table: Vec<u32> = (0..blocks_per_seq)
            .map(|b| (s * blocks_per_seq + b) as u32)
            .collect();
        for pos in context - query_len..context {
            let block = block_table[pos / BLOCK] as usize;
            md.slot_mapping.push((block * BLOCK + pos % BLOCK) as u32);
        }
        md.sequences.push(SequenceSlice {
            query_start: s * query_len,
            query_len,
            context_len: context,
            block_table,
        });
    }
    md
}

fn qkv(tokens: usize) -> (Tensor, Tensor, Tensor) {
    let d = Device::Cpu;
    let q = Tensor::randn(0f32, 1f32, (tokens, HEADS, HEAD_DIM), &d).expect("q");
    let k = Tensor::randn(0f32, 1f32, (tokens, KV_HEADS, HEAD_DIM), &d).expect("k");
    let v = Tensor::randn(0f32, 1f32, (tokens, KV_HEADS, HEAD_DIM), &d).expect("v");
    (q, k, v)
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention/decode");
    for &(batch, context) in &[
        (1usize, 512usize),
        (8, 512),
        (32, 512),
        (64, 512),
        (32, 2048),
        (1, 4096),
    ] {
        let mut attn = backend(batch, context);
        // Fill the whole context once so the cache is not all zeros.
        let (fq, fk, fv) = qkv(batch * context);
        attn.begin_step(&metadata(batch, context, context), HEADS)
            .expect("fill step");
        attn.attend(0, &how(), &fq, &fk, &fv).expect("fill");
        // One step, timed per layer (the step's validation runs once, in begin_step).
        attn.begin_step(&metadata(batch, context, 1), HEADS)
            .expect("decode step");
        let (q, k, v) = qkv(batch);
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(
            BenchmarkId::new(format!("batch{batch}"), format!("ctx{context}")),
            &(),
            |b, _| b.iter(|| attn.attend(0, &how(), &q, &k, &v).expect("attend")),
        );
    }
    g.finish();
}

fn prefill(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention/prefill");
    g.sample_size(10);
    for &len in &[128usize, 512, 1024] {
        let mut attn = backend(1, len);
        attn.begin_step(&metadata(1, len, len), HEADS)
            .expect("prefill step");
        let (q, k, v) = qkv(len);
        g.throughput(Throughput::Elements(len as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("len{len}")),
            &(),
            |b, _| b.iter(|| attn.attend(0, &how(), &q, &k, &v).expect("attend")),
        );
    }
    g.finish();
}

criterion_group!(benches, decode, prefill);
criterion_main!(benches);
