//! Token sampling (spindle_engine::sampler) over one decode step's logits: batch 1–64 at the
//! vocabulary sizes of SmolLM2 (49 152) and Qwen2.5 (151 936), greedy and with a typical
//! temperature / top-k / top-p / repetition-penalty setting.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use spindle_engine::sampler::{sample_batch, SampleInput, SequenceRng};
use spindle_engine::SamplingParams;

fn logits(rows: usize, vocab: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..rows)
        .map(|_| (0..vocab).map(|_| rng.random_range(-8.0f32..8.0)).collect())
        .collect()
}

fn bench(c: &mut Criterion) {
    let greedy = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let random = SamplingParams {
        temperature: 0.8,
        top_k: 50,
        top_p: 0.9,
        repetition_penalty: 1.1,
        ..SamplingParams::default()
    };
    let prompt: Vec<u32> = (0..256).map(|i| i * 7 + 3).collect();
    let output: Vec<u32> = (0..64).map(|i| i * 13 + 1).collect();
    let eos = [2u32];
    for &vocab in &[49_152usize, 151_936] {
        let mut g = c.benchmark_group(format!("sampler/vocab{vocab}"));
        let all = logits(64, vocab, vocab as u64);
        for (name, params) in [("greedy", &greedy), ("t0.8-topk50-topp0.9-rep1.1", &random)] {
            for &batch in &[1usize, 8, 32, 64] {
                let mut rngs: Vec<SequenceRng> = (0..batch)
                    .map(|i| SequenceRng::new(Some(0), i, 0))
                    .collect();
                g.throughput(Throughput::Elements(batch as u64));
                g.bench_with_input(
                    BenchmarkId::new(name, format!("batch{batch}")),
                    &batch,
                    |b, &batch| {
                        b.iter(|| {
                            let mut rows: Vec<SampleInput<'_>> = rngs
                                .iter_mut()
                                .zip(&all[..batch])
                                .map(|(rng, l)| SampleInput {
                                    logits: l,
                                    params,
                                    prompt_ids: &prompt,
                                    output_ids: &output,
                                    eos_ids: &eos,
                                    rng,
                                })
                                .collect();
                            sample_batch(&mut rows)
                        })
                    },
                );
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
