//! Paged KV-cache block allocator with automatic prefix caching.
//!
//! The KV cache is `num_blocks` fixed-size blocks of `block_size` token slots. Every sequence owns
//! a [`BlockTable`] listing its blocks in order; the token at position `p` lives in slot
//! `blocks[p / block_size] * block_size + p % block_size`.
//!
//! # Prefix caching
//!
//! Once a block is full and its KV is computed ([`BlockManager::commit`]), it is registered under
//! a key made of its exact tokens and the *registration id* of its parent block (the previous
//! block of the same sequence). Registration ids are unique and never reused, so a key identifies
//! the whole token prefix exactly: hash collisions cannot make two different prefixes share a
//! block (the hash only picks a bucket; hits compare the parent id and every token).
//!
//! A block whose last reference is dropped stays in the cache ("evictable") until the allocator
//! needs it; evictable blocks are reused least-recently-freed first. Evicting a block drops its
//! cache entry. Blocks registered below an evicted block can then no longer be reached (their
//! parent id is gone for good); they are evicted in turn when their time comes. [`BlockManager::free`]
//! releases a table's blocks tail first, so a sequence's later blocks are evicted before its
//! earlier ones and shared prefixes survive longest.
//!
//! # Contract for the engine loop
//!
//! 1. `start_sequence(prompt)` → table with the cached prefix blocks and `num_cached` tokens
//!    (always `< prompt.len()`): compute KV from position `num_cached` on.
//! 2. Before each forward pass, `grow(table, num_tokens_after_step, first_position_written)`;
//!    copy the KV of every returned `(src, dst)` pair before running the step.
//! 3. After the step, `commit(table, tokens_with_kv)` with all tokens whose KV is now in the cache
//!    (prompt + output, not the freshly sampled token whose KV is not computed yet).
//! 4. `fork` for `n > 1` children, `free` when a sequence finishes or is preempted.
//!
//! # Cache salts
//!
//! A sequence started with a [`CacheScope`] salt (vLLM's `cache_salt`) roots its chain at a
//! registration id reserved for that salt instead of 0, so its blocks match only blocks of
//! sequences with the same salt: tenants never share (or time) each other's prefixes. Its
//! first block's vLLM hash carries the salt as an extra key, as vLLM's does.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::kv_events::{BlockHash, BlockHasher, KvCacheEvent};

/// Index of one physical KV-cache block.
pub type BlockId = u32;

/// Returned by [`BlockManager::grow`] when the cache cannot hold the request; the scheduler
/// reacts by waiting or preempting. The table is left untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("out of KV-cache blocks: {needed} needed, {available} available")]
pub struct OutOfBlocks {
    /// Blocks the operation had to allocate.
    pub needed: usize,
    /// Blocks that were free or evictable.
    pub available: usize,
}

/// The ordered list of KV blocks of one sequence, so the model can map positions to cache slots.
///
/// Only [`BlockManager`] may change it (it keeps reference counts in step); callers read
/// `blocks`. Not `Clone` on purpose: use [`BlockManager::fork`] so references are counted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BlockTable {
    /// Physical blocks in sequence order.
    pub blocks: Vec<BlockId>,
    /// Registration id of the cached content of each leading full block whose KV is committed
    /// (`committed[i]` describes `blocks[i]`; it may name a different physical block holding the
    /// same tokens when two sequences computed the same block independently).
    committed: Vec<u64>,
    /// vLLM block hash of each committed block (only while KV events are published).
    hashes: Vec<BlockHash>,
    /// Registration id the chain hangs from: 0, or the reserved id of the sequence's salt.
    root: u64,
    /// The cache salt (an extra key of the first block's vLLM hash).
    salt: Option<Arc<str>>,
    /// Leading blocks already released because they left a sliding window
    /// ([`BlockManager::release_before`]): their entries in `blocks` stay, so positions keep
    /// their index, but this table holds no reference to them and nothing reads them.
    released: usize,
}

/// Which part of the prefix cache a sequence uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheScope {
    /// Share blocks only with sequences of the same salt (`None`: the shared namespace).
    pub salt: Option<Arc<str>>,
    /// Compute every prompt position even if cached (a sequence that wants prompt logprobs);
    /// its blocks are still registered for others.
    pub skip_reads: bool,
}

impl BlockTable {
    /// An empty table, for sequences that start without any cached prefix.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cache slot of token position `pos` (what the model's slot mapping needs); `None` when the
    /// table does not reach that far.
    pub fn slot(&self, pos: usize, block_size: usize) -> Option<usize> {
        if block_size == 0 {
            return None;
        }
        let block = *self.blocks.get(pos / block_size)?;
        Some(block as usize * block_size + pos % block_size)
    }

    /// Number of leading full blocks already committed (registered or matched in the prefix
    /// cache).
    #[cfg(test)]
    fn num_committed_blocks(&self) -> usize {
        self.committed.len()
    }
}

/// Where a block is, for invariant checks and debugging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// On the free list: unreferenced and holding no cached content.
    Free,
    /// Unreferenced but still holding cached content; reused least-recently-freed first.
    Evictable,
    /// Referenced by `refcount` live tables; `cached` tells whether it is registered in the
    /// prefix cache.
    InUse {
        /// Number of live tables holding the block.
        refcount: u32,
        /// Whether the block is registered in the prefix cache.
        cached: bool,
    },
}

/// Content key of a registered block.
#[derive(Debug)]
struct CachedBlock {
    /// Unique, never reused registration id (0 is reserved for "no parent").
    id: u64,
    /// Registration id of the parent block, 0 for the first block of a sequence.
    parent: u64,
    tokens: Box<[u32]>,
    /// Bucket hash of (`parent`, `tokens`), kept to find the bucket again on eviction.
    hash: u64,
    /// vLLM block hash (only while KV events are published), for the removal event.
    external: Option<BlockHash>,
}

/// Allocator of the paged KV cache: hands out blocks, counts references, shares computed prefix
/// blocks between sequences (prefix caching), and copies on write after a fork.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    enable_prefix_caching: bool,
    refcount: Vec<u32>,
    cached: Vec<Option<CachedBlock>>,
    /// Unreferenced blocks without cached content (a stack; lowest ids come out first initially).
    free: Vec<BlockId>,
    /// Unreferenced cached blocks by the tick at which they were freed (oldest first).
    evictable: BTreeMap<u64, BlockId>,
    /// Tick under which each evictable block sits in `evictable`.
    evict_tick: Vec<u64>,
    next_tick: u64,
    /// Bucket hash -> registered blocks with that hash.
    index: HashMap<u64, Vec<BlockId>>,
    next_reg_id: u64,
    /// Reserved root registration id of each cache salt seen.
    salt_roots: HashMap<Arc<str>, u64>,
    num_used: usize,
    queries: u64,
    hits: u64,
    /// Set while KV events are published: the hasher and the events not yet taken.
    events: Option<EventLog>,
}

/// KV events recorded since the engine last took them.
#[derive(Debug)]
struct EventLog {
    hasher: BlockHasher,
    pending: Vec<KvCacheEvent>,
}

impl EventLog {
    /// Record that a block entered the cache, extending the store just before it when this block
    /// continues its chain (consecutive blocks of a sequence are one event, as in vLLM).
    fn stored(&mut self, hash: BlockHash, parent: Option<BlockHash>, tokens: &[u32], size: usize) {
        if let Some(KvCacheEvent::BlockStored {
            block_hashes,
            token_ids,
            ..
        }) = self.pending.last_mut()
        {
            if parent.is_some() && block_hashes.last() == parent.as_ref() {
                block_hashes.push(hash);
                token_ids.extend_from_slice(tokens);
                return;
            }
        }
        self.pending.push(KvCacheEvent::BlockStored {
            block_hashes: vec![hash],
            parent_block_hash: parent,
            token_ids: tokens.to_vec(),
            block_size: size,
        });
    }

    /// Record that a block left the cache, merging with a removal just before it.
    fn removed(&mut self, hash: BlockHash) {
        if let Some(KvCacheEvent::BlockRemoved { block_hashes }) = self.pending.last_mut() {
            block_hashes.push(hash);
        } else {
            self.pending.push(KvCacheEvent::BlockRemoved {
                block_hashes: vec![hash],
            });
        }
    }
}

fn key_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockManager {
    /// A cache of `num_blocks` blocks of `block_size` slots. A zero `block_size` is treated as 1
    /// and `num_blocks` is capped at `u32::MAX` so odd configurations cannot panic later.
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        let num_blocks = num_blocks.min(u32::MAX as usize);
        let block_size = block_size.max(1);
        Self {
            block_size,
            enable_prefix_caching,
            refcount: vec![0; num_blocks],
            cached: (0..num_blocks).map(|_| None).collect(),
            free: (0..num_blocks as u32).rev().collect(),
            evictable: BTreeMap::new(),
            evict_tick: vec![0; num_blocks],
            next_tick: 0,
            index: HashMap::new(),
            next_reg_id: 1,
            salt_roots: HashMap::new(),
            num_used: 0,
            queries: 0,
            hits: 0,
            events: None,
        }
    }

    /// Record KV events (blocks stored, removed, cache cleared) with vLLM's block hashes, for
    /// [`Self::take_events`]. Only meaningful with prefix caching on.
    pub fn with_events(mut self, hasher: BlockHasher) -> Self {
        self.events = Some(EventLog {
            hasher,
            pending: Vec::new(),
        });
        self
    }

    /// The events recorded since the last call, in order.
    pub fn take_events(&mut self) -> Vec<KvCacheEvent> {
        self.events
            .as_mut()
            .map(|e| std::mem::take(&mut e.pending))
            .unwrap_or_default()
    }

    /// Slots per block, so callers can compute slot mappings and block counts.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Size of the cache in blocks (the denominator of KV-cache usage).
    pub fn num_total_blocks(&self) -> usize {
        self.refcount.len()
    }

    /// Blocks referenced by at least one live table (what `vllm:kv_cache_usage_perc` counts;
    /// cached-but-unreferenced blocks do not count).
    pub fn num_used_blocks(&self) -> usize {
        self.num_used
    }

    /// Blocks that can be allocated right now: free plus evictable.
    pub fn num_free_blocks(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Prompt tokens looked up in the prefix cache and tokens found there, both cumulative, for
    /// the `prefix_cache_queries/hits` metrics. Nothing is counted while caching is disabled.
    pub fn prefix_cache_stats(&self) -> (u64, u64) {
        (self.queries, self.hits)
    }

    /// Where `block` is (`None` if it is out of range), for tests and debugging.
    pub fn block_state(&self, block: BlockId) -> Option<BlockState> {
        let b = block as usize;
        let rc = *self.refcount.get(b)?;
        let cached = self.cached[b].is_some();
        Some(if rc > 0 {
            BlockState::InUse {
                refcount: rc,
                cached,
            }
        } else if cached {
            BlockState::Evictable
        } else {
            BlockState::Free
        })
    }

    /// Find the registered block holding `tokens` below parent registration `parent`.
    fn lookup(&self, parent: u64, tokens: &[u32]) -> Option<BlockId> {
        let bucket = self.index.get(&key_hash(parent, tokens))?;
        bucket.iter().copied().find(|&b| {
            self.cached[b as usize]
                .as_ref()
                .is_some_and(|c| c.parent == parent && *c.tokens == *tokens)
        })
    }

    /// Take one more reference on `block`, pulling it out of the evictable set if needed.
    fn take_ref(&mut self, block: BlockId) {
        let b = block as usize;
        if self.refcount[b] == 0 {
            if self.cached[b].is_some() {
                self.evictable.remove(&self.evict_tick[b]);
            } else if let Some(pos) = self.free.iter().position(|&f| f == block) {
                // Only reachable through misuse (forking a freed table); keep the books right.
                self.free.swap_remove(pos);
            }
            self.num_used += 1;
        }
        self.refcount[b] += 1;
    }

    /// Drop one reference on `block`; an unreferenced block becomes evictable (if cached) or free.
    fn release(&mut self, block: BlockId) {
        let b = block as usize;
        let Some(rc) = self.refcount.get_mut(b) else {
            return;
        };
        if *rc == 0 {
            return; // double free: ignore rather than corrupt the counts
        }
        *rc -= 1;
        if *rc > 0 {
            return;
        }
        self.num_used -= 1;
        if self.cached[b].is_some() {
            let tick = self.next_tick;
            self.next_tick += 1;
            self.evict_tick[b] = tick;
            self.evictable.insert(tick, block);
        } else {
            self.free.push(block);
        }
    }

    /// Remove `block`'s prefix-cache entry.
    fn uncache(&mut self, block: BlockId) {
        let Some(c) = self.cached[block as usize].take() else {
            return;
        };
        if let (Some(log), Some(hash)) = (self.events.as_mut(), c.external) {
            log.removed(hash);
        }
        if let Some(bucket) = self.index.get_mut(&c.hash) {
            bucket.retain(|&x| x != block);
            if bucket.is_empty() {
                self.index.remove(&c.hash);
            }
        }
    }

    /// One fresh block with refcount 1: the free list first, else the least recently freed
    /// cached block (which loses its cache entry).
    fn allocate(&mut self) -> Option<BlockId> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                self.uncache(b);
                b
            }
        };
        self.refcount[block as usize] = 1;
        self.num_used += 1;
        Some(block)
    }

    /// Start a sequence in the shared namespace (see [`Self::start_sequence_in`]).
    pub fn start_sequence(&mut self, prompt: &[u32]) -> (BlockTable, usize) {
        self.start_sequence_in(prompt, &CacheScope::default())
    }

    /// Start a sequence: reuse the longest chain of cached full blocks matching the start of
    /// `prompt` within `scope`'s namespace (taking a reference on each) and return the table
    /// plus the number of cached tokens. At least one prompt token is always left to compute
    /// (the model needs it to produce logits), so a fully cached prompt gives up its last block.
    /// With `scope.skip_reads` nothing is reused.
    pub fn start_sequence_in(&mut self, prompt: &[u32], scope: &CacheScope) -> (BlockTable, usize) {
        let mut table = BlockTable::new();
        if !self.enable_prefix_caching || prompt.is_empty() {
            return (table, 0);
        }
        if let Some(salt) = &scope.salt {
            table.root = self.salt_root(salt);
            table.salt = Some(salt.clone());
        }
        if scope.skip_reads {
            return (table, 0);
        }
        self.queries += prompt.len() as u64;
        let bs = self.block_size;
        let max_blocks = (prompt.len() - 1) / bs;
        let mut parent = table.root;
        for chunk in prompt.chunks_exact(bs).take(max_blocks) {
            let Some(block) = self.lookup(parent, chunk) else {
                break;
            };
            let Some((id, external)) = self.cached[block as usize]
                .as_ref()
                .map(|c| (c.id, c.external))
            else {
                break;
            };
            self.take_ref(block);
            table.blocks.push(block);
            table.committed.push(id);
            if let Some(h) = external {
                table.hashes.push(h);
            }
            parent = id;
        }
        let cached_tokens = table.blocks.len() * bs;
        self.hits += cached_tokens as u64;
        (table, cached_tokens)
    }

    /// The root registration id of `salt`'s namespace, reserved on first use (ids are never
    /// reused, so no block chain of another namespace can hang from it).
    fn salt_root(&mut self, salt: &Arc<str>) -> u64 {
        if let Some(&root) = self.salt_roots.get(salt) {
            return root;
        }
        let root = self.next_reg_id;
        self.next_reg_id += 1;
        self.salt_roots.insert(salt.clone(), root);
        root
    }

    /// Range of existing table indices that a write of positions `write_from..num_tokens` touches.
    fn written_existing(
        &self,
        table: &BlockTable,
        num_tokens: usize,
        write_from: usize,
    ) -> std::ops::Range<usize> {
        if num_tokens <= write_from {
            return 0..0;
        }
        let first = write_from / self.block_size;
        let last = (num_tokens - 1) / self.block_size + 1;
        first.min(table.blocks.len())..last.min(table.blocks.len())
    }

    /// Blocks that must be newly allocated for `table` to hold `num_tokens` slots when positions
    /// `write_from..num_tokens` are written: new tail blocks plus copy-on-write copies of shared
    /// blocks in the written range. Lets the scheduler budget before calling [`Self::grow`].
    pub fn blocks_needed(&self, table: &BlockTable, num_tokens: usize, write_from: usize) -> usize {
        let want = num_tokens.div_ceil(self.block_size);
        let tail = want.saturating_sub(table.blocks.len());
        let cow = self
            .written_existing(table, num_tokens, write_from)
            .filter(|&i| {
                self.refcount
                    .get(table.blocks[i] as usize)
                    .is_some_and(|&rc| rc > 1)
            })
            .count();
        tail + cow
    }

    /// Make `table` hold `num_tokens` slots before positions `write_from..num_tokens` are
    /// written. Allocates tail blocks (free list first, then evicting the least recently freed
    /// cached block) and copies on write every block in the written range that is shared with
    /// another table (after [`Self::fork`]): the table gets a fresh block and the returned
    /// `(src, dst)` pairs tell the caller which KV blocks to copy before the step.
    /// On `Err(OutOfBlocks)` nothing changed.
    pub fn grow(
        &mut self,
        table: &mut BlockTable,
        num_tokens: usize,
        write_from: usize,
    ) -> Result<Vec<(BlockId, BlockId)>, OutOfBlocks> {
        let needed = self.blocks_needed(table, num_tokens, write_from);
        let available = self.num_free_blocks();
        if needed > available {
            return Err(OutOfBlocks { needed, available });
        }
        let mut copies = Vec::new();
        for i in self.written_existing(table, num_tokens, write_from) {
            let src = table.blocks[i];
            if self.refcount.get(src as usize).is_none_or(|&rc| rc <= 1) {
                continue;
            }
            let dst = self.allocate().ok_or(OutOfBlocks { needed, available })?;
            self.release(src);
            table.blocks[i] = dst;
            // The copy is not registered; whatever gets written there is committed afresh.
            table.committed.truncate(i);
            table.hashes.truncate(i);
            copies.push((src, dst));
        }
        let want = num_tokens.div_ceil(self.block_size);
        while table.blocks.len() < want {
            let block = self.allocate().ok_or(OutOfBlocks { needed, available })?;
            table.blocks.push(block);
        }
        Ok(copies)
    }

    /// Register the blocks of `table` that became full, now that the KV of `tokens` (all of the
    /// sequence's tokens whose KV is computed: prompt + output so far, in order) is in the
    /// cache. Cheap to call after every step: already committed blocks are skipped. If an
    /// identical block is already registered (another sequence computed the same prefix), that
    /// one stays the cache entry and this table's block remains private (freed normally).
    /// Does nothing while prefix caching is disabled.
    pub fn commit(&mut self, table: &mut BlockTable, tokens: &[u32]) {
        if !self.enable_prefix_caching {
            return;
        }
        let bs = self.block_size;
        let full = (tokens.len() / bs).min(table.blocks.len());
        for i in table.committed.len()..full {
            let block = table.blocks[i];
            let b = block as usize;
            if b >= self.cached.len() {
                return;
            }
            let chunk = &tokens[i * bs..(i + 1) * bs];
            // vLLM's hash of this block (a function of the token prefix alone).
            let parent_hash = i.checked_sub(1).and_then(|p| table.hashes.get(p)).copied();
            let salt = if i == 0 { table.salt.as_deref() } else { None };
            let external = self
                .events
                .as_ref()
                .map(|log| log.hasher.hash_with_salt(parent_hash.as_ref(), chunk, salt));
            if let Some(h) = external {
                table.hashes.push(h);
            }
            if let Some(c) = &self.cached[b] {
                // A prefix-cache hit or a block shared through fork: already registered.
                table.committed.push(c.id);
                continue;
            }
            let parent = if i == 0 {
                table.root
            } else {
                table.committed[i - 1]
            };
            if let Some(existing) = self.lookup(parent, chunk) {
                if let Some(c) = &self.cached[existing as usize] {
                    table.committed.push(c.id);
                    continue;
                }
            }
            let id = self.next_reg_id;
            self.next_reg_id += 1;
            let hash = key_hash(parent, chunk);
            self.cached[b] = Some(CachedBlock {
                id,
                parent,
                tokens: chunk.into(),
                hash,
                external,
            });
            self.index.entry(hash).or_default().push(block);
            table.committed.push(id);
            if let (Some(log), Some(h)) = (self.events.as_mut(), external) {
                log.stored(h, parent_hash, chunk, bs);
            }
        }
    }

    /// A child sequence (`n > 1`) sharing all of `table`'s held blocks: each gets one more
    /// reference; the first write into a shared block copies it (see [`Self::grow`]).
    pub fn fork(&mut self, table: &BlockTable) -> BlockTable {
        let mut child = BlockTable {
            blocks: Vec::with_capacity(table.blocks.len()),
            committed: table.committed.clone(),
            hashes: table.hashes.clone(),
            root: table.root,
            salt: table.salt.clone(),
            released: table.released,
        };
        for (i, &block) in table.blocks.iter().enumerate() {
            if (block as usize) < self.refcount.len() {
                if i >= table.released {
                    self.take_ref(block);
                }
                child.blocks.push(block);
            }
        }
        child.committed.truncate(child.blocks.len());
        child.hashes.truncate(child.blocks.len());
        child
    }

    /// Release a finished or preempted sequence's blocks. Unreferenced blocks registered in the
    /// prefix cache stay cached (evictable, least recently freed first; the table's tail is
    /// released first), the others return to the free list.
    pub fn free(&mut self, table: BlockTable) {
        for &block in table.blocks[table.released.min(table.blocks.len())..]
            .iter()
            .rev()
        {
            self.release(block);
        }
    }

    /// Sliding-window models (every layer slides): release the leading blocks that lie wholly
    /// before position `first_pos`, the first key any later query of the sequence attends to,
    /// so a long sequence holds O(window) blocks. Registered blocks stay in the prefix cache
    /// (evictable); with prefix caching on, only committed blocks go (a block must be registered
    /// before its table stops holding it). Idempotent; `free` and `fork` skip released blocks.
    pub fn release_before(&mut self, table: &mut BlockTable, first_pos: usize) {
        let mut upto = (first_pos / self.block_size).min(table.blocks.len());
        if self.enable_prefix_caching {
            upto = upto.min(table.committed.len());
        }
        for i in table.released..upto {
            self.release(table.blocks[i]);
        }
        table.released = table.released.max(upto);
    }

    /// Drop every cached-but-unreferenced block from the prefix cache (vLLM's
    /// `/reset_prefix_cache`). Only allowed while no block is in use, so that no live table
    /// refers to a dropped registration; returns whether the reset happened.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.num_used > 0 {
            return false;
        }
        // One AllBlocksCleared instead of a removal per block.
        let events = self.events.take();
        while let Some((_, block)) = self.evictable.pop_first() {
            self.uncache(block);
            self.free.push(block);
        }
        self.index.clear();
        self.events = events;
        if let Some(log) = self.events.as_mut() {
            log.pending.push(KvCacheEvent::AllBlocksCleared);
        }
        true
    }

    /// Verify the allocator's internal bookkeeping, for tests and debug assertions: every block
    /// is in exactly one place, counters match, and the cache index agrees with block metadata.
    pub fn check_invariants(&self) -> Result<(), String> {
        let n = self.refcount.len();
        let mut seen = vec![0u8; n];
        for &b in &self.free {
            let b = b as usize;
            if b >= n {
                return Err(format!("free list holds out-of-range block {b}"));
            }
            seen[b] += 1;
            if self.refcount[b] != 0 || self.cached[b].is_some() {
                return Err(format!("free block {b} is referenced or cached"));
            }
        }
        for (&tick, &b) in &self.evictable {
            let b = b as usize;
            if b >= n {
                return Err(format!("evictable set holds out-of-range block {b}"));
            }
            seen[b] += 1;
            if self.refcount[b] != 0 || self.cached[b].is_none() || self.evict_tick[b] != tick {
                return Err(format!(
                    "evictable block {b} is referenced, uncached or mis-ticked"
                ));
            }
        }
        let mut used = 0;
        for (b, count) in seen.iter_mut().enumerate() {
            if self.refcount[b] > 0 {
                used += 1;
                *count += 1;
            }
            if *count != 1 {
                return Err(format!("block {b} is in {count} places"));
            }
        }
        if used != self.num_used {
            return Err(format!(
                "num_used {} but {used} referenced blocks",
                self.num_used
            ));
        }
        let mut indexed = 0;
        for (&hash, bucket) in &self.index {
            for &b in bucket {
                indexed += 1;
                match &self.cached[b as usize] {
                    Some(c) if c.hash == hash && key_hash(c.parent, &c.tokens) == hash => {}
                    _ => {
                        return Err(format!(
                            "index entry for block {b} does not match its metadata"
                        ))
                    }
                }
            }
        }
        let registered = self.cached.iter().filter(|c| c.is_some()).count();
        if indexed != registered {
            return Err(format!(
                "{indexed} index entries but {registered} registered blocks"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
