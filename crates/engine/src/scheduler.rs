//! One token-budget scheduler for decode, prefill and chunked prefill (vLLM V1 style). Each
//! step: running sequences first, in admission order, each takes the tokens it still needs
//! (1 for a decode, a chunk for an unfinished prefill) within the budget; then waiting
//! sequences are admitted FCFS while the budget, `max_num_seqs` and free blocks allow. A long
//! prompt is split over steps so it never stalls running decodes. When blocks run out, the
//! most recently admitted running sequence is preempted (its blocks freed, recomputed later).

use std::collections::{HashMap, VecDeque};

use crate::block_manager::{BlockId, BlockManager};
use crate::sequence::{SeqId, Sequence};

/// What one step runs.
#[derive(Debug, Default)]
pub struct ScheduledBatch {
    /// (sequence, number of new tokens this step), in batch order.
    pub entries: Vec<(SeqId, usize)>,
    /// KV block copies (copy-on-write) to perform before the forward pass.
    pub copies: Vec<(BlockId, BlockId)>,
    /// Sequences preempted while scheduling this step.
    pub preempted: Vec<SeqId>,
}

/// The waiting queue and running set, plus the budget knobs.
pub struct Scheduler {
    pub waiting: VecDeque<SeqId>,
    pub running: Vec<SeqId>,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    next_admission: u64,
}

impl Scheduler {
    pub fn new(max_num_seqs: usize, max_num_batched_tokens: usize) -> Self {
        Self {
            waiting: VecDeque::new(),
            running: Vec::new(),
            max_num_seqs: max_num_seqs.max(1),
            max_num_batched_tokens: max_num_batched_tokens.max(1),
            next_admission: 0,
        }
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Forget a sequence wherever it is (finish or abort); the caller frees its blocks.
    pub fn remove(&mut self, id: SeqId) {
        self.running.retain(|&s| s != id);
        self.waiting.retain(|&s| s != id);
    }

    /// Release a sequence's blocks and send it back to the front of the waiting queue; it will
    /// recompute its KV (prompt and output so far) when readmitted.
    fn preempt(
        &mut self,
        id: SeqId,
        seqs: &mut HashMap<SeqId, Sequence>,
        blocks: &mut BlockManager,
    ) {
        self.running.retain(|&s| s != id);
        if let Some(seq) = seqs.get_mut(&id) {
            if let Some(table) = seq.table.take() {
                blocks.free(table);
            }
            seq.num_computed = 0;
        }
        self.waiting.push_front(id);
    }

    /// Pick this step's batch.
    pub fn schedule(
        &mut self,
        seqs: &mut HashMap<SeqId, Sequence>,
        blocks: &mut BlockManager,
    ) -> ScheduledBatch {
        let mut out = ScheduledBatch::default();
        let mut budget = self.max_num_batched_tokens;

        // 1. Running sequences, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(seq) = seqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let n = seq.num_uncomputed().min(budget);
            if n == 0 {
                i += 1;
                continue;
            }
            // Make room, preempting the newest running sequences (possibly this one).
            let mut scheduled_self = true;
            loop {
                let Some(seq) = seqs.get(&id) else { break };
                let Some(table) = seq.table.as_ref() else {
                    break;
                };
                let target = seq.num_computed + n;
                let need = blocks.blocks_needed(table, target, seq.num_computed);
                if need <= blocks.num_free_blocks() {
                    break;
                }
                let victim = *self
                    .running
                    .iter()
                    .filter(|s| !out.entries.iter().any(|(e, _)| e == *s))
                    .max_by_key(|s| seqs.get(s).map(|q| q.admitted_at).unwrap_or(0))
                    .unwrap_or(&id);
                self.preempt(victim, seqs, blocks);
                out.preempted.push(victim);
                if victim == id {
                    scheduled_self = false;
                    break;
                }
            }
            if !scheduled_self {
                continue; // `running[i]` is now the next sequence
            }
            let Some(seq) = seqs.get_mut(&id) else {
                continue;
            };
            let target = seq.num_computed + n;
            let write_from = seq.num_computed;
            let Some(table) = seq.table.as_mut() else {
                continue;
            };
            match blocks.grow(table, target, write_from) {
                Ok(copies) => {
                    out.copies.extend(copies);
                    out.entries.push((id, n));
                    budget -= n;
                }
                Err(_) => {
                    // Cannot happen after the check above; be safe and retry next step.
                    tracing::warn!(seq = id, "block allocation failed after reservation");
                }
            }
            // Preemption may have removed entries before `i`: continue after `id`.
            i = self
                .running
                .iter()
                .position(|&s| s == id)
                .map_or(i, |p| p + 1);
        }

        // 2. Waiting sequences, FCFS, while there is room. Nothing is preempted for them.
        while budget > 0 && self.running.len() < self.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let Some(seq) = seqs.get_mut(&id) else {
                self.waiting.pop_front();
                continue;
            };
            if seq.table.is_none() {
                let (table, cached) = blocks.start_sequence(&seq.tokens);
                seq.table = Some(table);
                seq.num_computed = cached;
            }
            let n = seq.num_uncomputed().min(budget);
            let target = seq.num_computed + n;
            let write_from = seq.num_computed;
            let Some(table) = seq.table.as_mut() else {
                break;
            };
            match blocks.grow(table, target, write_from) {
                Ok(copies) => {
                    out.copies.extend(copies);
                    self.waiting.pop_front();
                    seq.admitted_at = self.next_admission;
                    self.next_admission += 1;
                    self.running.push(id);
                    out.entries.push((id, n));
                    budget -= n;
                }
                Err(_) => {
                    // Not enough free blocks: give the prefix-cache references back and wait.
                    if let Some(table) = seq.table.take() {
                        blocks.free(table);
                    }
                    seq.num_computed = 0;
                    break;
                }
            }
        }
        out
    }

    /// Admit a sequence created already running (an n > 1 child forked from its parent).
    pub fn add_running(&mut self, seq: &mut Sequence) {
        seq.admitted_at = self.next_admission;
        self.next_admission += 1;
        self.running.push(seq.id);
    }
}
