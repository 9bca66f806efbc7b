//! The block manager on its own: slots, prefix-cache hits and eviction order, copy-on-write
//! after forks, cache salts, and its invariants after every operation.

use super::*;

fn prompt(len: usize, base: u32) -> Vec<u32> {
    (0..len as u32).map(|i| base + i).collect()
}

/// Run a sequence's prefill: start, grow, commit. Returns the table and the cache hit.
fn prefill(bm: &mut BlockManager, p: &[u32]) -> (BlockTable, usize) {
    let (mut t, cached) = bm.start_sequence(p);
    bm.grow(&mut t, p.len(), cached).unwrap();
    bm.commit(&mut t, p);
    bm.check_invariants().unwrap();
    (t, cached)
}

#[test]
fn slots_follow_the_table() {
    let mut bm = BlockManager::new(8, 4, false);
    let (mut t, _) = bm.start_sequence(&[1, 2, 3]);
    bm.grow(&mut t, 6, 0).unwrap();
    assert_eq!(t.blocks, vec![0, 1]);
    assert_eq!(t.slot(5, 4), Some(5));
    assert_eq!(t.slot(8, 4), None);
    assert_eq!(t.blocks.len() * 4, 8);
}

#[test]
fn prefix_hit_after_first_sequence_is_freed() {
    let mut bm = BlockManager::new(16, 4, true);
    let p = prompt(10, 100);
    let (t, cached) = prefill(&mut bm, &p);
    assert_eq!(cached, 0);
    assert_eq!(bm.num_used_blocks(), 3);
    bm.free(t);
    assert_eq!(bm.num_used_blocks(), 0);
    assert_eq!(bm.num_free_blocks(), 16);
    let (t2, cached) = prefill(&mut bm, &p);
    assert_eq!(cached, 8, "two full blocks reused");
    assert_eq!(bm.prefix_cache_stats(), (20, 8));
    // A different prompt sharing only the first block.
    let mut q = p.clone();
    q[5] = 7;
    let (t3, cached) = prefill(&mut bm, &q);
    assert_eq!(cached, 4);
    assert_eq!(t3.blocks[0], t2.blocks[0]);
    assert_eq!(
        bm.block_state(t2.blocks[0]),
        Some(BlockState::InUse {
            refcount: 2,
            cached: true
        })
    );
    bm.free(t2);
    bm.free(t3);
    bm.check_invariants().unwrap();
    assert_eq!(bm.num_used_blocks(), 0);
}

#[test]
fn cache_salts_isolate_prefixes() {
    let mut bm = BlockManager::new(32, 4, true);
    let p = prompt(10, 100);
    let scope = |salt: Option<&str>, skip_reads| CacheScope {
        salt: salt.map(Arc::from),
        skip_reads,
    };
    let run = |bm: &mut BlockManager, s: &CacheScope| {
        let (mut t, cached) = bm.start_sequence_in(&p, s);
        bm.grow(&mut t, p.len(), cached).unwrap();
        bm.commit(&mut t, &p);
        bm.free(t);
        cached
    };
    assert_eq!(run(&mut bm, &scope(Some("a"), false)), 0);
    // Another salt and the shared namespace miss; the same salt hits.
    assert_eq!(run(&mut bm, &scope(Some("b"), false)), 0);
    assert_eq!(run(&mut bm, &scope(None, false)), 0);
    assert_eq!(run(&mut bm, &scope(Some("a"), false)), 8);
    assert_eq!(run(&mut bm, &scope(Some("b"), false)), 8);
    assert_eq!(run(&mut bm, &scope(None, false)), 8);
    // Skipping reads computes everything, but its blocks still serve others.
    assert_eq!(run(&mut bm, &scope(Some("c"), true)), 0);
    assert_eq!(run(&mut bm, &scope(Some("c"), false)), 8);
    bm.check_invariants().unwrap();
}

#[test]
fn never_covers_the_whole_prompt() {
    let mut bm = BlockManager::new(16, 4, true);
    let p = prompt(8, 0);
    let (t, _) = prefill(&mut bm, &p);
    bm.free(t);
    let (t, cached) = bm.start_sequence(&p);
    assert_eq!(cached, 4, "the last block is recomputed");
    assert_eq!(t.blocks.len(), 1);
    bm.free(t);
    // One token more: both blocks can be reused.
    let mut p9 = p.clone();
    p9.push(99);
    let (t, cached) = bm.start_sequence(&p9);
    assert_eq!(cached, 8);
    bm.free(t);
    // A prompt shorter than a block never hits.
    let (t, cached) = bm.start_sequence(&p[..4]);
    assert_eq!(cached, 0);
    bm.free(t);
    let (t, cached) = bm.start_sequence(&[]);
    assert_eq!(cached, 0);
    bm.free(t);
    bm.check_invariants().unwrap();
}

#[test]
fn recomputed_last_block_is_a_duplicate_not_a_corruption() {
    let mut bm = BlockManager::new(16, 4, true);
    let p = prompt(8, 0);
    let (t, _) = prefill(&mut bm, &p);
    let (t2, cached) = prefill(&mut bm, &p);
    assert_eq!(cached, 4);
    // t2 recomputed block 1 into a private block; the registered one is t's.
    assert_ne!(t.blocks[1], t2.blocks[1]);
    assert_eq!(
        bm.block_state(t2.blocks[1]),
        Some(BlockState::InUse {
            refcount: 1,
            cached: false
        })
    );
    let private = t2.blocks[1];
    bm.free(t2);
    assert_eq!(bm.block_state(private), Some(BlockState::Free));
    bm.free(t);
    bm.check_invariants().unwrap();
    let (t3, cached) = bm.start_sequence(&[p.clone(), vec![1]].concat());
    assert_eq!(cached, 8);
    bm.free(t3);
}

#[test]
fn concurrent_identical_prompts_register_once() {
    let mut bm = BlockManager::new(16, 2, true);
    let p = prompt(6, 0);
    let (mut a, _) = bm.start_sequence(&p);
    let (mut b, _) = bm.start_sequence(&p);
    bm.grow(&mut a, 6, 0).unwrap();
    bm.grow(&mut b, 6, 0).unwrap();
    bm.commit(&mut b, &p[..4]);
    bm.commit(&mut a, &p);
    bm.commit(&mut b, &p);
    bm.check_invariants().unwrap();
    // b's first two blocks registered first; a's third.
    let registered: Vec<_> = a
        .blocks
        .iter()
        .chain(&b.blocks)
        .filter(|&&x| {
            matches!(
                bm.block_state(x),
                Some(BlockState::InUse { cached: true, .. })
            )
        })
        .collect();
    assert_eq!(registered.len(), 3);
    bm.free(a);
    bm.free(b);
    let (c, cached) = bm.start_sequence(&[p.clone(), vec![9]].concat());
    assert_eq!(cached, 6, "the chain crosses the blocks of both sequences");
    bm.free(c);
    bm.check_invariants().unwrap();
}

#[test]
fn lru_eviction_order() {
    let mut bm = BlockManager::new(4, 4, true);
    let pa = prompt(5, 0); // one full block + one partial
    let pb = prompt(5, 1000);
    let (ta, _) = prefill(&mut bm, &pa);
    bm.free(ta); // A's full block evictable first
    let (tb, _) = prefill(&mut bm, &pb);
    bm.free(tb); // then B's
    assert_eq!(bm.num_free_blocks(), 4);
    // Three fresh blocks: two free ones, then the least recently freed cached block (A's).
    let mut t = BlockTable::new();
    bm.grow(&mut t, 12, 0).unwrap();
    bm.check_invariants().unwrap();
    let (ta, cached) = bm.start_sequence(&pa);
    assert_eq!(cached, 0, "A was evicted");
    let (tb, cached) = bm.start_sequence(&pb);
    assert_eq!(cached, 4, "B survived");
    bm.free(t);
    bm.free(ta);
    bm.free(tb);

    let pa = prompt(9, 0); // two full blocks + one partial
                           // Within a table, the tail goes first: evicting one block keeps the prefix usable.
    let mut bm = BlockManager::new(3, 4, true);
    let (ta, _) = prefill(&mut bm, &pa);
    bm.free(ta);
    let (mut t, _) = bm.start_sequence(&[7]);
    bm.grow(&mut t, 1, 0).unwrap(); // the free block
    let mut t2 = BlockTable::new();
    bm.grow(&mut t2, 1, 0).unwrap(); // evicts A's tail block
    let (t3, cached) = bm.start_sequence(&pa);
    assert_eq!(cached, 4, "A's first block survived");
    bm.free(t);
    bm.free(t2);
    bm.free(t3);
    bm.check_invariants().unwrap();
}

#[test]
fn copy_on_write_after_fork() {
    let mut bm = BlockManager::new(8, 4, true);
    let p = prompt(6, 0);
    let (parent, _) = prefill(&mut bm, &p);
    let mut parent = parent;
    let mut child = bm.fork(&parent);
    assert_eq!(child.blocks, parent.blocks);
    assert_eq!(bm.num_used_blocks(), 2);
    assert_eq!(
        bm.block_state(parent.blocks[1]),
        Some(BlockState::InUse {
            refcount: 2,
            cached: false
        })
    );
    // The child writes position 6 (in the shared, partial block 1): copy.
    assert_eq!(bm.blocks_needed(&child, 7, 6), 1);
    let copies = bm.grow(&mut child, 7, 6).unwrap();
    assert_eq!(copies, vec![(parent.blocks[1], child.blocks[1])]);
    assert_ne!(child.blocks[1], parent.blocks[1]);
    assert_eq!(
        child.blocks[0], parent.blocks[0],
        "full prefix block stays shared"
    );
    // The parent is now the only owner of its block: no copy.
    assert_eq!(bm.grow(&mut parent, 7, 6).unwrap(), vec![]);
    // Writing past the shared block allocates without copying.
    let copies = bm.grow(&mut parent, 9, 8).unwrap();
    assert!(copies.is_empty());
    assert_eq!(parent.blocks.len(), 3);
    bm.check_invariants().unwrap();
    bm.free(parent);
    bm.free(child);
    assert_eq!(bm.num_used_blocks(), 0);
    bm.check_invariants().unwrap();
}

#[test]
fn out_of_blocks_leaves_table_unchanged() {
    let mut bm = BlockManager::new(2, 4, true);
    let (mut t, _) = bm.start_sequence(&[1, 2, 3]);
    bm.grow(&mut t, 4, 0).unwrap();
    let before = t.blocks.clone();
    let err = bm.grow(&mut t, 13, 4).unwrap_err();
    assert_eq!(
        err,
        OutOfBlocks {
            needed: 3,
            available: 1
        }
    );
    assert_eq!(t.blocks, before);
    assert_eq!(bm.num_used_blocks(), 1);
    // CoW that does not fit also fails cleanly.
    let mut child = bm.fork(&t);
    bm.grow(&mut t, 8, 4).unwrap();
    let err = bm.grow(&mut child, 4, 3).unwrap_err();
    assert_eq!(err.needed, 1);
    bm.free(t);
    bm.free(child);
    bm.check_invariants().unwrap();
}

#[test]
fn disabled_cache_never_hits() {
    let mut bm = BlockManager::new(8, 4, false);
    let p = prompt(9, 0);
    let (t, _) = prefill(&mut bm, &p);
    assert_eq!(t.num_committed_blocks(), 0);
    bm.free(t);
    assert_eq!(bm.num_free_blocks(), 8);
    let (t, cached) = prefill(&mut bm, &p);
    assert_eq!(cached, 0);
    assert_eq!(bm.prefix_cache_stats(), (0, 0));
    bm.free(t);
    for b in 0..8 {
        assert_eq!(bm.block_state(b), Some(BlockState::Free));
    }
}

#[test]
fn evicted_block_loses_its_entry_and_reset_clears_the_cache() {
    let mut bm = BlockManager::new(2, 2, true);
    let p = [1, 2, 3, 4, 5];
    let (mut t, _) = bm.start_sequence(&p);
    bm.grow(&mut t, 4, 0).unwrap();
    bm.commit(&mut t, &p[..4]);
    bm.free(t);
    let mut other = BlockTable::new();
    bm.grow(&mut other, 4, 0).unwrap(); // evicts both
    bm.check_invariants().unwrap();
    bm.free(other);
    let (t, cached) = bm.start_sequence(&p);
    assert_eq!(cached, 0);
    bm.free(t);

    let (mut t, _) = bm.start_sequence(&p);
    bm.grow(&mut t, 4, 0).unwrap();
    bm.commit(&mut t, &p[..4]);
    assert!(!bm.reset_prefix_cache(), "blocks in use");
    bm.free(t);
    assert!(bm.reset_prefix_cache());
    bm.check_invariants().unwrap();
    let (t, cached) = bm.start_sequence(&p);
    assert_eq!(cached, 0);
    bm.free(t);
}

#[test]
fn kv_events_follow_the_prefix_cache() {
    let hasher = BlockHasher::new(Some("42"));
    let mut bm = BlockManager::new(4, 2, true).with_events(hasher.clone());
    let p = [1, 2, 3, 4, 5];
    // Two full blocks computed in one step: one event with both, chained hashes.
    let (mut t, _) = bm.start_sequence(&p);
    bm.grow(&mut t, 5, 0).unwrap();
    bm.commit(&mut t, &p);
    let h0 = hasher.hash(None, &[1, 2]);
    let h1 = hasher.hash(Some(&h0), &[3, 4]);
    assert_eq!(
        bm.take_events(),
        vec![KvCacheEvent::BlockStored {
            block_hashes: vec![h0, h1],
            parent_block_hash: None,
            token_ids: vec![1, 2, 3, 4],
            block_size: 2,
        }]
    );
    assert!(bm.take_events().is_empty(), "taken once");
    // Decoding fills the third block later: its parent is the second.
    let q = [1, 2, 3, 4, 5, 6];
    bm.commit(&mut t, &q);
    let h2 = hasher.hash(Some(&h1), &[5, 6]);
    assert_eq!(
        bm.take_events(),
        vec![KvCacheEvent::BlockStored {
            block_hashes: vec![h2],
            parent_block_hash: Some(h1),
            token_ids: vec![5, 6],
            block_size: 2,
        }]
    );
    bm.free(t);
    // A prefix hit stores nothing new.
    let (mut t, cached) = bm.start_sequence(&[1, 2, 3, 4, 9]);
    assert_eq!(cached, 4);
    bm.grow(&mut t, 5, 4).unwrap();
    bm.commit(&mut t, &[1, 2, 3, 4, 9]);
    assert!(bm.take_events().is_empty());
    bm.free(t);
    // Fresh blocks for another sequence evict the least recently freed cached blocks.
    let mut other = BlockTable::new();
    bm.grow(&mut other, 8, 0).unwrap();
    let removed: Vec<BlockHash> = bm
        .take_events()
        .into_iter()
        .flat_map(|e| match e {
            KvCacheEvent::BlockRemoved { block_hashes } => block_hashes,
            e => panic!("unexpected {e:?}"),
        })
        .collect();
    assert_eq!(removed.len(), 3);
    assert!([h0, h1, h2].iter().all(|h| removed.contains(h)));
    bm.free(other);
    // A reset is one AllBlocksCleared, not a removal per block.
    let (mut t, _) = bm.start_sequence(&p);
    bm.grow(&mut t, 5, 0).unwrap();
    bm.commit(&mut t, &p);
    bm.free(t);
    bm.take_events();
    assert!(bm.reset_prefix_cache());
    assert_eq!(bm.take_events(), vec![KvCacheEvent::AllBlocksCleared]);
    bm.check_invariants().unwrap();
}

#[test]
fn odd_inputs_do_not_panic() {
    let mut bm = BlockManager::new(0, 0, true);
    assert_eq!(bm.block_size(), 1);
    let (mut t, c) = bm.start_sequence(&[1, 2]);
    assert_eq!(c, 0);
    assert!(bm.grow(&mut t, 1, 0).is_err());
    assert_eq!(bm.grow(&mut t, 0, 0), Ok(vec![]));
    bm.commit(&mut t, &[1, 2, 3]);
    bm.free(t);
    let mut bm = BlockManager::new(4, 2, true);
    // commit with fewer tokens than slots, or more tokens than slots.
    let mut t = BlockTable::new();
    bm.grow(&mut t, 3, 0).unwrap();
    bm.commit(&mut t, &[1]);
    bm.commit(&mut t, &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(t.num_committed_blocks(), 2);
    assert_eq!(bm.block_state(99), None);
    bm.free(t);
    bm.check_invariants().unwrap();
}

/// Sliding windows: blocks wholly before the window go back (cached ones stay cached), once;
/// `free` and `fork` skip them; the table keeps its positions.
#[test]
fn blocks_before_a_sliding_window_are_released_once() {
    for caching in [false, true] {
        let mut bm = BlockManager::new(16, 4, caching);
        let p = prompt(18, 300); // 5 blocks, the last one partial
        let (mut t, _) = prefill(&mut bm, &p);
        assert_eq!(bm.num_used_blocks(), 5);
        let slot_17 = t.slot(17, 4);
        // The next query (position 18) with a window of 8 sees keys 11..: blocks 0 and 1 go.
        bm.release_before(&mut t, 11);
        bm.check_invariants().unwrap();
        assert_eq!(bm.num_used_blocks(), 3, "caching {caching}");
        assert_eq!(t.slot(17, 4), slot_17, "positions keep their slots");
        bm.release_before(&mut t, 11);
        bm.release_before(&mut t, 3);
        assert_eq!(bm.num_used_blocks(), 3, "idempotent");
        let child = bm.fork(&t);
        assert_eq!(bm.num_used_blocks(), 3);
        bm.free(child);
        bm.free(t);
        bm.check_invariants().unwrap();
        assert_eq!(bm.num_used_blocks(), 0);
        assert_eq!(bm.num_free_blocks(), 16);
        if caching {
            // The released blocks stayed in the prefix cache: the same prompt hits them.
            let (t2, cached) = prefill(&mut bm, &p);
            assert_eq!(cached, 16);
            bm.free(t2);
        }
    }
}

/// With prefix caching on, a block that was never registered is not released: the table
/// must still hold it when it is committed.
#[test]
fn uncommitted_blocks_are_kept_under_prefix_caching() {
    let mut bm = BlockManager::new(16, 4, true);
    let (mut t, _) = bm.start_sequence(&prompt(12, 500));
    bm.grow(&mut t, 12, 0).unwrap();
    bm.release_before(&mut t, 12);
    assert_eq!(bm.num_used_blocks(), 3, "nothing committed yet");
    bm.commit(&mut t, &prompt(12, 500));
    bm.release_before(&mut t, 12);
    assert_eq!(bm.num_used_blocks(), 0);
    bm.free(t);
    bm.check_invariants().unwrap();
}
