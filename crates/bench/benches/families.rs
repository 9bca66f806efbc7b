//! One forward pass per dense family at the same shape (SmolLM2-135M's width: hidden 576, 9
//! query heads, 3 KV heads, head_dim 64, intermediate 1536; 8 layers, vocab 49152), dummy
//! weights, the default CPU arithmetic: a decode step of 32 sequences at context 128 and a
//! 256-token prefill. A family's switches (norm placement, GeGLU, multipliers, soft-caps,
//! windows, NoPE layers) should cost nothing next to the matmuls: compare each line with Llama's.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use spindle_model::attention::cpu::CpuAttention;
use spindle_model::{
    load, CacheShape, ForwardBatch, LlamaModel, LoadFormat, LoadOptions, SequenceSlice,
};

const BLOCK: usize = 16;

const SHAPE: &str = r#""vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 8, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "max_position_embeddings": 4096"#;

const FAMILIES: [(&str, &str); 8] = [
    (
        "llama",
        r#""architectures": ["LlamaForCausalLM"], "tie_word_embeddings": true"#,
    ),
    (
        "qwen3",
        r#""architectures": ["Qwen3ForCausalLM"], "tie_word_embeddings": true"#,
    ),
    (
        "gemma2",
        r#""architectures": ["Gemma2ForCausalLM"], "sliding_window": 64, "query_pre_attn_scalar": 64, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0"#,
    ),
    (
        "gemma3",
        r#""architectures": ["Gemma3ForCausalLM"], "sliding_window": 64, "query_pre_attn_scalar": 64"#,
    ),
    (
        "smollm3",
        r#""architectures": ["SmolLM3ForCausalLM"], "tie_word_embeddings": true"#,
    ),
    (
        "olmo2",
        r#""architectures": ["Olmo2ForCausalLM"], "tie_word_embeddings": true"#,
    ),
    (
        "phi3",
        r#""architectures": ["Phi3ForCausalLM"], "tie_word_embeddings": true, "partial_rotary_factor": 0.75"#,
    ),
    (
        "granite",
        r#""architectures": ["GraniteForCausalLM"], "tie_word_embeddings": true, "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.015625, "logits_scaling": 8.0"#,
    ),
];

fn model(name: &str, extra: &str) -> LlamaModel {
    let dir = std::env::temp_dir().join(format!("spindle-bench-family-{name}"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("config.json");
    std::fs::write(&path, format!("{{{extra}, {SHAPE}}}")).expect("config");
    let loaded = load(&LoadOptions {
        model: path.display().to_string(),
        load_format: LoadFormat::Dummy,
        max_model_len: Some(512),
        ..Default::default()
    })
    .expect("dummy load");
    loaded.model
}

/// `seqs` sequences of `context` tokens whose last `new` are this step's.
fn batch(seqs: usize, context: usize, new: usize) -> ForwardBatch {
    let per = context.div_ceil(BLOCK);
    let mut b = ForwardBatch::default();
    for s in 0..seqs {
        let table: Vec<u32> = (0..per).map(|i| (s * per + i) as u32).collect();
        let start = b.token_ids.len();
        for p in context - new..context {
            b.token_ids.push(((s * 131 + p * 7) % 49152) as u32);
            b.positions.push(p as u32);
            b.attention
                .slot_mapping
                .push(table[p / BLOCK] * BLOCK as u32 + (p % BLOCK) as u32);
        }
        b.attention.sequences.push(SequenceSlice {
            query_start: start,
            query_len: new,
            context_len: context,
            block_table: table,
        });
        b.logit_rows.push((b.token_ids.len() - 1) as u32);
    }
    b
}

fn cache(m: &LlamaModel, seqs: usize, context: usize) -> CpuAttention {
    let c = m.config();
    CpuAttention::new(CacheShape {
        num_layers: c.num_layers,
        num_blocks: seqs * context.div_ceil(BLOCK),
        block_size: BLOCK,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    })
    .expect("cache")
}

fn families(c: &mut Criterion) {
    let mut g = c.benchmark_group("family_forward");
    g.sample_size(10);
    for (name, extra) in FAMILIES {
        let m = model(name, extra);
        let (seqs, context) = (32, 128);
        let mut kv = cache(&m, seqs, context);
        m.forward(&batch(seqs, context, context), &mut kv)
            .expect("fill");
        let step = batch(seqs, context, 1);
        g.throughput(Throughput::Elements(seqs as u64));
        g.bench_with_input(BenchmarkId::new("decode32_ctx128", name), &(), |b, _| {
            b.iter(|| m.forward(&step, &mut kv).expect("decode"))
        });
        let mut kv = cache(&m, 1, 256);
        let prefill = batch(1, 256, 256);
        g.throughput(Throughput::Elements(256));
        g.bench_with_input(BenchmarkId::new("prefill256", name), &(), |b, _| {
            b.iter(|| m.forward(&prefill, &mut kv).expect("prefill"))
        });
    }
    g.finish();
}

criterion_group!(benches, families);
criterion_main!(benches);
