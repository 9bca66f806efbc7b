//! Property test of the block manager: random interleavings of sequence starts (prompts over a
//! tiny alphabet, so prefixes collide), decode steps, forks and frees on a small cache (so
//! allocation fails and cached blocks get evicted), checking the allocator's bookkeeping after
//! every operation and simulating the KV cache to prove that prefix hits and copy-on-write
//! never expose the wrong data.

use proptest::prelude::*;
use spindle_engine::block_manager::{BlockManager, BlockState, BlockTable};

#[derive(Debug, Clone)]
enum Op {
    Start(Vec<u32>),
    Decode(usize, u32),
    Fork(usize),
    Free(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => prop::collection::vec(0u32..3, 0..14).prop_map(Op::Start),
        6 => (any::<usize>(), 0u32..3).prop_map(|(i, t)| Op::Decode(i, t)),
        1 => any::<usize>().prop_map(Op::Fork),
        2 => any::<usize>().prop_map(Op::Free),
    ]
}

struct Seq {
    table: BlockTable,
    /// Tokens whose KV is computed.
    tokens: Vec<u32>,
}

/// The simulated KV cache: each slot remembers the full token prefix whose KV it holds (KV at
/// position p depends on every token up to p).
struct Kv {
    slots: Vec<Option<Vec<u32>>>,
    block_size: usize,
}

impl Kv {
    fn write(&mut self, table: &BlockTable, tokens: &[u32], pos: usize) {
        let slot = table
            .slot(pos, self.block_size)
            .expect("grown table holds the position");
        self.slots[slot] = Some(tokens[..=pos].to_vec());
    }

    fn check(&self, table: &BlockTable, tokens: &[u32], upto: usize) {
        for pos in 0..upto {
            let slot = table
                .slot(pos, self.block_size)
                .expect("table covers computed tokens");
            assert_eq!(
                self.slots[slot].as_deref(),
                Some(&tokens[..=pos]),
                "KV at position {pos} is wrong"
            );
        }
    }

    fn copy_block(&mut self, src: u32, dst: u32) {
        let bs = self.block_size;
        for i in 0..bs {
            self.slots[dst as usize * bs + i] = self.slots[src as usize * bs + i].clone();
        }
    }
}

fn check_all(bm: &BlockManager, live: &[Seq], kv: &Kv) {
    bm.check_invariants().unwrap();
    let total = bm.num_total_blocks();
    let mut expected = vec![0u32; total];
    for s in live {
        for &b in &s.table.blocks {
            expected[b as usize] += 1;
        }
        kv.check(&s.table, &s.tokens, s.tokens.len());
    }
    let mut used = 0;
    for (b, &count) in expected.iter().enumerate() {
        let state = bm.block_state(b as u32).unwrap();
        match state {
            BlockState::InUse { refcount, .. } => {
                assert_eq!(refcount, count, "block {b} refcount vs live tables");
                used += 1;
            }
            BlockState::Free | BlockState::Evictable => {
                assert_eq!(count, 0, "block {b} is {state:?} but in a live table")
            }
        }
    }
    let entries: usize = live.iter().map(|s| s.table.blocks.len()).sum();
    assert_eq!(expected.iter().map(|&c| c as usize).sum::<usize>(), entries);
    assert_eq!(bm.num_used_blocks(), used);
    assert_eq!(bm.num_used_blocks() + bm.num_free_blocks(), total);
}

/// What a run exercised, so the deterministic test can prove the interesting paths were hit.
#[derive(Debug, Default)]
struct Coverage {
    prefix_hits: usize,
    copies: usize,
    out_of_blocks: usize,
    evictions: usize,
}

fn run(num_blocks: usize, block_size: usize, caching: bool, ops: Vec<Op>) -> Coverage {
    let mut cov = Coverage::default();
    let mut bm = BlockManager::new(num_blocks, block_size, caching);
    let mut kv = Kv {
        slots: vec![None; num_blocks * block_size],
        block_size,
    };
    let mut live: Vec<Seq> = Vec::new();
    let mut hits = 0u64;
    for op in ops {
        match op {
            Op::Start(prompt) => {
                let (mut table, cached) = bm.start_sequence(&prompt);
                assert!(
                    cached == 0 || cached < prompt.len(),
                    "never the whole prompt"
                );
                assert_eq!(cached % block_size, 0);
                assert_eq!(table.blocks.len(), cached / block_size);
                if !caching {
                    assert_eq!(cached, 0);
                }
                hits += cached as u64;
                cov.prefix_hits += usize::from(cached > 0);
                kv.check(&table, &prompt, cached);
                let before = table.blocks.clone();
                match bm.grow(&mut table, prompt.len(), cached) {
                    Ok(copies) => {
                        assert!(copies.is_empty(), "cached prefix blocks are never written");
                        for pos in cached..prompt.len() {
                            kv.write(&table, &prompt, pos);
                        }
                        bm.commit(&mut table, &prompt);
                        live.push(Seq {
                            table,
                            tokens: prompt,
                        });
                    }
                    Err(e) => {
                        assert_eq!(table.blocks, before);
                        assert!(e.needed > e.available);
                        cov.out_of_blocks += 1;
                        bm.free(table);
                    }
                }
            }
            Op::Decode(i, token) => {
                if live.is_empty() {
                    continue;
                }
                let i = i % live.len();
                let s = &mut live[i];
                let pos = s.tokens.len();
                let before = s.table.blocks.clone();
                let evictable_before = (0..num_blocks as u32)
                    .filter(|&b| bm.block_state(b) == Some(BlockState::Evictable))
                    .count();
                let needed = bm.blocks_needed(&s.table, pos + 1, pos);
                match bm.grow(&mut s.table, pos + 1, pos) {
                    Ok(copies) => {
                        assert!(needed <= 1 + copies.len());
                        cov.copies += copies.len();
                        let evictable_after = (0..num_blocks as u32)
                            .filter(|&b| bm.block_state(b) == Some(BlockState::Evictable))
                            .count();
                        cov.evictions += usize::from(evictable_after < evictable_before);
                        for &(src, dst) in &copies {
                            assert_ne!(src, dst);
                            kv.copy_block(src, dst);
                        }
                        s.tokens.push(token);
                        kv.write(&s.table, &s.tokens, pos);
                        bm.commit(&mut s.table, &s.tokens);
                    }
                    Err(e) => {
                        assert_eq!(s.table.blocks, before, "failed grow changed the table");
                        assert_eq!(e.needed, needed);
                        cov.out_of_blocks += 1;
                    }
                }
            }
            Op::Fork(i) => {
                if live.is_empty() {
                    continue;
                }
                let i = i % live.len();
                let table = bm.fork(&live[i].table);
                assert_eq!(table.blocks, live[i].table.blocks);
                let tokens = live[i].tokens.clone();
                live.push(Seq { table, tokens });
            }
            Op::Free(i) => {
                if live.is_empty() {
                    continue;
                }
                let s = live.swap_remove(i % live.len());
                bm.free(s.table);
            }
        }
        check_all(&bm, &live, &kv);
        assert_eq!(bm.prefix_cache_stats().1, hits);
    }
    for s in live.drain(..) {
        bm.free(s.table);
    }
    check_all(&bm, &live, &kv);
    assert_eq!(bm.num_used_blocks(), 0);
    assert_eq!(bm.num_free_blocks(), num_blocks);
    cov
}

proptest! {
    // Failing cases are printed (and shrunk); no regression file next to an integration test.
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn block_manager_invariants(
        num_blocks in 1usize..24,
        block_size in 1usize..5,
        caching in any::<bool>(),
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let _ = run(num_blocks, block_size, caching, ops);
    }
}

/// A long deterministic stress run on a roomier cache (more live sequences, deeper prefixes).
#[test]
fn long_mixed_workload() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut total = Coverage::default();
    for (num_blocks, block_size) in [(64, 4), (16, 2), (12, 3), (8, 1)] {
        for _ in 0..10 {
            let ops = prop::collection::vec(op(), 400)
                .new_tree(&mut runner)
                .unwrap()
                .current();
            let cov = run(num_blocks, block_size, true, ops);
            total.prefix_hits += cov.prefix_hits;
            total.copies += cov.copies;
            total.out_of_blocks += cov.out_of_blocks;
            total.evictions += cov.evictions;
        }
    }
    eprintln!("coverage: {total:?}");
    assert!(
        total.prefix_hits > 0 && total.copies > 0 && total.out_of_blocks > 0 && total.evictions > 0,
        "{total:?}"
    );
}
