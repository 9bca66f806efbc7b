//! KV-cache block allocation (spindle_engine::block_manager): admitting and freeing a wave of
//! prompts, and per-step decode growth, with prefix caching on and off.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use spindle_engine::block_manager::{BlockManager, BlockTable};

const BLOCK: usize = 16;
const NUM_BLOCKS: usize = 16_384;

/// `seqs` distinct prompts of `len` tokens (no prefix-cache hits between them).
fn prompts(seqs: usize, len: usize) -> Vec<Vec<u32>> {
    (0..seqs)
        .map(|s| {
            (0..len)
                .map(|i| (s * 100_003 + i) as u32 % 49_152)
                .collect()
        })
        .collect()
}

fn admit_and_free(c: &mut Criterion) {
    let mut g = c.benchmark_group("block_manager/admit_free");
    let (seqs, len) = (64usize, 512usize);
    let ps = prompts(seqs, len);
    g.throughput(Throughput::Elements(seqs as u64));
    for caching in [false, true] {
        g.bench_with_input(
            BenchmarkId::new(format!("prefix_caching_{caching}"), format!("{seqs}x{len}")),
            &caching,
            |b, &caching| {
                b.iter_batched(
                    || BlockManager::new(NUM_BLOCKS, BLOCK, caching),
                    |mut bm| {
                        let mut tables: Vec<BlockTable> = Vec::with_capacity(seqs);
                        for p in &ps {
                            let (mut t, cached) = bm.start_sequence(p);
                            bm.grow(&mut t, p.len(), cached).expect("room");
                            bm.commit(&mut t, p);
                            tables.push(t);
                        }
                        for t in tables {
                            bm.free(t);
                        }
                        bm
                    },
                    BatchSize::LargeInput,
                )
            },
        );
    }
    g.finish();
}

fn decode_growth(c: &mut Criterion) {
    let mut g = c.benchmark_group("block_manager/decode_steps");
    let (seqs, prompt_len, steps) = (32usize, 128usize, 256usize);
    let ps = prompts(seqs, prompt_len);
    g.throughput(Throughput::Elements((seqs * steps) as u64));
    for caching in [false, true] {
        g.bench_with_input(
            BenchmarkId::new(
                format!("prefix_caching_{caching}"),
                format!("{seqs}seqs_{steps}steps"),
            ),
            &caching,
            |b, &caching| {
                b.iter_batched(
                    || {
                        let mut bm = BlockManager::new(NUM_BLOCKS, BLOCK, caching);
                        let seqs: Vec<(BlockTable, Vec<u32>)> = ps
                            .iter()
                            .map(|p| {
                                let (mut t, cached) = bm.start_sequence(p);
                                bm.grow(&mut t, p.len(), cached).expect("room");
                                bm.commit(&mut t, p);
                                (t, p.clone())
                            })
                            .collect();
                        (bm, seqs)
                    },
                    |(mut bm, mut seqs)| {
                        // One engine step = grow every sequence by its new token, then commit.
                        for step in 0..steps {
                            for (t, tokens) in seqs.iter_mut() {
                                let n = tokens.len();
                                bm.grow(t, n + 1, n).expect("room");
                                tokens.push((step * 31 + n) as u32 % 49_152);
                                bm.commit(t, tokens);
                            }
                        }
                        (bm, seqs)
                    },
                    BatchSize::LargeInput,
                )
            },
        );
    }
    g.finish();
}

criterion_group!(benches, admit_and_free, decode_growth);
criterion_main!(benches);
