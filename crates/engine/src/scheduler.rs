//! One token-budget scheduler for decode, prefill and chunked prefill (vLLM V1 style). Each
//! step: running sequences first, in admission order, each takes the tokens it still needs
//! (1 for a decode, a chunk for an unfinished prefill) within the budget; then waiting
//! sequences are admitted FCFS while the budget, `max_num_seqs` and free blocks allow. A long
//! prompt is split over steps so it never stalls running decodes. When blocks run out, the
//! most recently admitted running sequence is preempted (its blocks freed, recomputed later).
//! A waiting sequence that cannot fit even when nothing else runs is refused.
//!
//! Urgency (vLLM's `--scheduling-policy`): sequences are served level by level, most urgent
//! first, with running before waiting inside a level. Background work (batch jobs) is always
//! the last level; under [`SchedulingPolicy::Priority`] the request's `priority` (lower first)
//! orders the rest. A waiting sequence may preempt running ones of a less urgent level to get a
//! slot or blocks, so urgent work starts in the next step. Under FCFS with no background work
//! there is one level and the order is plain first come, first served.
//!
//! The scheduler owns the block manager and a lean per-sequence state (tokens, progress, block
//! table, arrival and admission order, priority, token stop rules, draft tokens): nothing about
//! sampling or text, so it can be tested with fake requests. After the runner's forward pass,
//! [`Scheduler::update_from_output`] appends the sampled tokens, rolls back the KV of rejected
//! draft tokens, applies the token stops and frees what ended (vLLM V1's `update_from_output`).
//!
//! Speculative decoding: a decoding sequence with draft tokens is scheduled for `1 + k`
//! positions (its last token and `k` drafts), budgeted like any other tokens; drafts are cut to
//! the budget and to what `max_tokens` and the context leave.

use std::collections::{HashMap, VecDeque};

use crate::block_manager::{BlockId, BlockManager, BlockTable, CacheScope};
use crate::step_output::{RunnerOutput, SampledSeq, SeqUpdate, Stopped};
use crate::token_stop::{stop_on_length, stop_on_token, TokenStops};

/// Engine-internal id of a sequence.
pub type SeqId = u64;

/// What the scheduler knows of one sequence.
#[derive(Debug)]
pub struct SeqState {
    /// Prompt followed by the generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose K/V are in the cache (prefix-cache hits included).
    num_computed: usize,
    /// KV blocks; `None` while waiting or after preemption.
    table: Option<BlockTable>,
    /// Order of admission to the running set; the most recent is preempted first.
    admitted_at: u64,
    /// How urgent it is; with the policy, its scheduling level.
    urgency: Urgency,
    /// Its prefix-cache namespace, and whether it may read cached blocks.
    cache: CacheScope,
    /// Logits are wanted at every prompt position (prompt logprobs).
    prompt_logits: bool,
    /// EOS / stop ids / length rules applied as tokens are appended.
    stops: TokenStops,
    /// Draft tokens proposed after the last token, verified in the next step (speculation).
    draft: Vec<u32>,
    /// The other `n - 1` choices, forked once this sequence's prompt is computed.
    children: Vec<SeqId>,
}

impl SeqState {
    /// Prompt followed by the generated tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// The prompt tokens (for repetition penalties).
    pub fn prompt_ids(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }

    /// The generated tokens so far.
    pub fn output_ids(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    pub fn num_output(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens whose K/V are in the cache.
    pub fn num_computed(&self) -> usize {
        self.num_computed
    }

    /// The sequence's KV blocks while it runs.
    pub fn table(&self) -> Option<&BlockTable> {
        self.table.as_ref()
    }

    pub fn urgency(&self) -> Urgency {
        self.urgency
    }

    /// Which admission the sequence's block table belongs to: changes when it is readmitted
    /// after a preemption (its KV is recomputed into new blocks).
    pub fn admission(&self) -> u64 {
        self.admitted_at
    }

    /// Whether the runner must return logits for every prompt position.
    pub fn wants_prompt_logits(&self) -> bool {
        self.prompt_logits
    }

    /// Draft tokens waiting to be verified (the step's entry says how many are scheduled).
    pub fn draft(&self) -> &[u32] {
        &self.draft
    }

    /// The token stop rules (the runner stops verifying drafts after a stop token).
    pub fn stops(&self) -> &TokenStops {
        &self.stops
    }

    /// Most tokens one step may compute: a prefill that returns logits at every position is
    /// cut into chunks of [`PROMPT_LOGITS_CHUNK`] (their logits rows are vocabulary-wide).
    fn max_chunk(&self) -> usize {
        if self.prompt_logits && self.num_computed < self.prompt_len {
            PROMPT_LOGITS_CHUNK
        } else {
            usize::MAX
        }
    }

    /// Tokens still to run through the model before the next token can be sampled.
    fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }
}

/// The order in which waiting and running sequences are served (`--scheduling-policy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SchedulingPolicy {
    /// First come, first served (vLLM's default); `priority` is not used.
    #[default]
    Fcfs,
    /// Lower `priority` first, then arrival; a waiting request preempts less urgent running ones.
    Priority,
}

/// How urgent a sequence is. Background work (batch-job lines) yields to every interactive
/// request under either policy; `priority` (lower first, vLLM's convention) matters only under
/// [`SchedulingPolicy::Priority`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Urgency {
    pub background: bool,
    pub priority: i32,
}

/// Prompt tokens per step of a sequence that wants logits at every prompt position: bounds
/// the step's logits to this many vocabulary-wide rows.
pub const PROMPT_LOGITS_CHUNK: usize = 256;

/// What a sequence brings besides its tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqOptions {
    pub urgency: Urgency,
    /// Prefix-cache namespace (cache salt) and whether cached blocks may be read.
    pub cache: CacheScope,
    /// Return logits at every prompt position (prompt logprobs; implies not reading the cache).
    pub prompt_logits: bool,
    /// EOS / stop ids / `max_tokens`, applied when tokens are appended.
    pub stops: TokenStops,
    /// Ids of the request's other `n - 1` choices: started on this sequence's prompt blocks in
    /// the step that completes its prompt, sampling from its row.
    pub children: Vec<SeqId>,
}

/// After interactive work pauses, background work stays at its share for this many steps.
pub const BACKGROUND_GRACE_STEPS: usize = 8;

/// A scheduling level: lower is served first.
type Level = (bool, i32);

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: SeqId,
    /// Tokens computed this step, starting at position `num_computed`.
    pub num_new_tokens: usize,
    /// Tokens already in the cache before this step (prefix-cache hits on first admission).
    pub num_computed: usize,
    /// This step reaches the end of the sequence, so its last row's logits are sampled.
    pub samples: bool,
    /// Of `num_new_tokens`, the last ones are the sequence's first `num_draft` draft tokens:
    /// the runner samples at each of the last `1 + num_draft` positions to verify them.
    pub num_draft: usize,
}

impl ScheduledSeq {
    /// `n` new tokens of `seq` (`id`) from where its computed tokens end, the last `num_draft`
    /// of them drafts.
    fn new(id: SeqId, n: usize, num_draft: usize, seq: &SeqState) -> Self {
        Self {
            id,
            num_new_tokens: n,
            num_computed: seq.num_computed,
            samples: seq.num_computed + n - num_draft == seq.tokens.len(),
            num_draft,
        }
    }
}

/// What one step runs, and what scheduling decided besides.
#[derive(Debug, Default)]
pub struct SchedulerOutput {
    /// The batch, in order.
    pub scheduled: Vec<ScheduledSeq>,
    /// KV block copies (copy-on-write) to perform before the forward pass.
    pub copies: Vec<(BlockId, BlockId)>,
    /// Sequences preempted while scheduling this step (they wait to be recomputed).
    pub preempted: Vec<SeqId>,
    /// Sequences that can never fit the KV cache; already removed, the caller finishes them.
    pub refused: Vec<SeqId>,
    /// `(parent, child)`: choices started this step on their parent's prompt; each samples its
    /// first token from its parent's row.
    pub forked: Vec<(SeqId, SeqId)>,
}

impl SchedulerOutput {
    /// Total tokens of the batch.
    pub fn num_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.num_new_tokens).sum()
    }
}

/// The waiting queue, the running set and the KV blocks behind them.
pub struct Scheduler {
    blocks: BlockManager,
    seqs: HashMap<SeqId, SeqState>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    next_admission: u64,
    policy: SchedulingPolicy,
    /// Background tokens allowed per interactive token in a step that runs both.
    background_share: f64,
    /// Steps since the last one with interactive work, and its interactive tokens.
    steps_since_interactive: usize,
    last_interactive_tokens: usize,
    /// The window of a model whose every layer slides: blocks that leave it are released.
    sliding_window: Option<usize>,
    /// The model's EOS ids and context, for the token stops.
    eos_ids: Vec<u32>,
    max_model_len: usize,
    /// Slots reserved past each step's positions (a draft model writes its drafts' KV there).
    lookahead: usize,
}

impl Scheduler {
    pub fn new(
        blocks: BlockManager,
        max_num_seqs: usize,
        max_num_batched_tokens: usize,
        policy: SchedulingPolicy,
    ) -> Self {
        Self {
            blocks,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            max_num_seqs: max_num_seqs.max(1),
            max_num_batched_tokens: max_num_batched_tokens.max(1),
            next_admission: 0,
            policy,
            background_share: f64::INFINITY,
            steps_since_interactive: usize::MAX,
            last_interactive_tokens: 0,
            sliding_window: None,
            eos_ids: Vec::new(),
            max_model_len: usize::MAX,
            lookahead: 0,
        }
    }

    /// Reserve `k` slots past every scheduled sequence's positions (within the context), so a
    /// draft model can write the KV of the `k` tokens it proposes after the step.
    pub fn with_lookahead(mut self, k: usize) -> Self {
        self.lookahead = k;
        self
    }

    /// The model's EOS ids and context length, which end sequences as tokens are appended.
    pub fn with_stop_limits(mut self, eos_ids: Vec<u32>, max_model_len: usize) -> Self {
        self.eos_ids = eos_ids;
        self.max_model_len = max_model_len;
        self
    }

    /// The model attends to the last `window` tokens in every layer (Mistral-7B-v0.1): blocks
    /// that leave the window are released after each step, so a sequence holds about
    /// `window / block_size + 1` blocks however long it grows. Mixed models (Gemma) keep all.
    pub fn with_sliding_window(mut self, window: usize) -> Self {
        self.sliding_window = Some(window.max(1));
        self
    }

    /// In steps that also run interactive work, limit background work to `share` of the
    /// interactive tokens (at least one token); the rest of the budget stays unused, keeping
    /// those steps short. Unlimited by default.
    pub fn with_background_share(mut self, share: f64) -> Self {
        self.background_share = share.max(0.0);
        self
    }

    /// The level a sequence is served at under this scheduler's policy.
    fn level_of(&self, id: SeqId) -> Level {
        let Some(seq) = self.seqs.get(&id) else {
            return (true, i32::MAX);
        };
        let u = seq.urgency;
        match self.policy {
            SchedulingPolicy::Fcfs => (u.background, 0),
            SchedulingPolicy::Priority => (u.background, u.priority),
        }
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Waiting sequences that are background work.
    pub fn num_waiting_background(&self) -> usize {
        self.waiting
            .iter()
            .filter(|id| self.seqs.get(id).is_some_and(|s| s.urgency.background))
            .count()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// KV-cache events recorded since the last call (see [`BlockManager::with_events`]).
    pub fn take_kv_events(&mut self) -> Vec<crate::kv_events::KvCacheEvent> {
        self.blocks.take_events()
    }

    /// The KV blocks, for gauges (usage, prefix-cache counters).
    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    pub fn seq(&self, id: SeqId) -> Option<&SeqState> {
        self.seqs.get(&id)
    }

    /// Queue a new sequence behind every waiting one.
    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>, urgency: Urgency) {
        self.add_with(
            id,
            prompt,
            SeqOptions {
                urgency,
                ..SeqOptions::default()
            },
        );
    }

    /// Queue a new sequence with its cache scope and logits needs.
    pub fn add_with(&mut self, id: SeqId, prompt: Vec<u32>, options: SeqOptions) {
        debug_assert!(!prompt.is_empty(), "validated requests have a prompt");
        let prompt_len = prompt.len();
        let mut cache = options.cache;
        cache.skip_reads |= options.prompt_logits;
        self.seqs.insert(
            id,
            SeqState {
                tokens: prompt,
                prompt_len,
                num_computed: 0,
                table: None,
                admitted_at: 0,
                urgency: options.urgency,
                cache,
                prompt_logits: options.prompt_logits,
                stops: options.stops,
                draft: Vec::new(),
                children: options.children,
            },
        );
        self.waiting.push_back(id);
    }

    /// Start `child` already running on a copy of `parent`'s prompt, sharing its prompt blocks
    /// (an `n > 1` choice forked in the step that computes the prompt). False if the parent is
    /// gone.
    fn fork(&mut self, parent: SeqId, child: SeqId) -> bool {
        let Some(p) = self.seqs.get(&parent) else {
            return false;
        };
        let table = p.table.as_ref().map(|t| self.blocks.fork(t));
        let state = SeqState {
            tokens: p.tokens[..p.prompt_len].to_vec(),
            prompt_len: p.prompt_len,
            num_computed: p.prompt_len,
            table,
            admitted_at: self.next_admission,
            urgency: p.urgency,
            cache: p.cache.clone(),
            prompt_logits: false,
            stops: p.stops.clone(),
            draft: Vec::new(),
            children: Vec::new(),
        };
        self.next_admission += 1;
        self.seqs.insert(child, state);
        self.running.push(child);
        true
    }

    /// Fork the pending children of a sequence whose prompt this step completes.
    fn fork_pending(&mut self, out: &mut SchedulerOutput, entry: &ScheduledSeq) {
        if !entry.samples {
            return;
        }
        let Some(children) = self
            .seqs
            .get_mut(&entry.id)
            .map(|s| std::mem::take(&mut s.children))
        else {
            return;
        };
        for child in children {
            if self.fork(entry.id, child) {
                out.forked.push((entry.id, child));
            }
        }
    }

    /// Forget a sequence wherever it is (finished or aborted) and free its blocks.
    pub fn finish(&mut self, id: SeqId) {
        self.running.retain(|&s| s != id);
        self.waiting.retain(|&s| s != id);
        if let Some(mut seq) = self.seqs.remove(&id) {
            if let Some(table) = seq.table.take() {
                self.blocks.free(table);
            }
        }
    }

    /// After the forward pass: append what the runner sampled (drafts accepted plus one token),
    /// apply the token stops (EOS, stop ids, the constraint's end, length), roll back the KV of
    /// rejected drafts, register blocks that became full for prefix caching (under a sliding
    /// window, release blocks that left it), keep the next drafts, and free what ended.
    /// Returns each sampled sequence's new tokens for the output processor.
    pub fn update_from_output(
        &mut self,
        batch: &SchedulerOutput,
        output: &RunnerOutput,
    ) -> Vec<SeqUpdate> {
        let mut updates = Vec::with_capacity(output.sampled.len());
        let mut accepted: HashMap<SeqId, usize> = HashMap::new();
        for sampled in &output.sampled {
            accepted.insert(sampled.id, sampled.num_accepted);
            if let Some(update) = self.append_sampled(sampled) {
                updates.push(update);
            }
        }
        for s in &batch.scheduled {
            let Some(seq) = self.seqs.get_mut(&s.id) else {
                continue;
            };
            // Rejected drafts' KV stays in the slots, past num_computed: overwritten later. A
            // sequence that goes on keeps its last token to compute (when verification ended
            // on an accepted draft, that position is recomputed: same KV), so it is scheduled
            // again; one that ended is freed below.
            let rejected = s.num_draft - accepted.get(&s.id).copied().unwrap_or(0).min(s.num_draft);
            seq.num_computed = (seq.num_computed + s.num_new_tokens - rejected)
                .min(seq.tokens.len().saturating_sub(1));
            if let Some(table) = seq.table.as_mut() {
                self.blocks.commit(table, &seq.tokens[..seq.num_computed]);
                if let Some(w) = self.sliding_window {
                    // The next query (position num_computed) sees keys from here on.
                    let first = (seq.num_computed + 1).saturating_sub(w);
                    self.blocks.release_before(table, first);
                }
            }
        }
        for u in &updates {
            if u.stopped.is_some() {
                self.finish(u.id);
            }
        }
        updates
    }

    /// Append one sequence's sampled tokens up to the first that ends it.
    fn append_sampled(&mut self, sampled: &SampledSeq) -> Option<SeqUpdate> {
        let seq = self.seqs.get_mut(&sampled.id)?;
        let mut stopped = None;
        let mut n = 0;
        for &token in &sampled.tokens {
            seq.tokens.push(token);
            n += 1;
            let num_output = seq.num_output();
            let last = n == sampled.tokens.len();
            stopped = if let Some((_, reason)) =
                stop_on_token(token, num_output, &seq.stops, &self.eos_ids)
            {
                Some(Stopped::Token(reason))
            } else if last && sampled.constraint_finished {
                Some(Stopped::Complete)
            } else if stop_on_length(
                num_output,
                seq.tokens.len(),
                seq.stops.max_tokens,
                self.max_model_len,
            ) {
                Some(Stopped::Length)
            } else {
                None
            };
            if stopped.is_some() {
                break;
            }
        }
        seq.draft = if stopped.is_none() {
            sampled.next_draft.clone()
        } else {
            Vec::new()
        };
        let logprobs = sampled.logprobs.iter().take(n).cloned().collect();
        Some(SeqUpdate {
            id: sampled.id,
            tokens: sampled.tokens[..n].to_vec(),
            logprobs,
            stopped,
        })
    }

    /// Release a sequence's blocks and send it back to the front of the waiting queue; it will
    /// recompute its KV (prompt and output so far) when readmitted.
    fn preempt(&mut self, id: SeqId) {
        self.running.retain(|&s| s != id);
        if let Some(seq) = self.seqs.get_mut(&id) {
            if let Some(table) = seq.table.take() {
                self.blocks.free(table);
            }
            seq.num_computed = 0;
            seq.draft.clear();
        }
        self.waiting.push_front(id);
    }

    /// Pick this step's batch: level by level, running sequences then waiting ones. Once a
    /// waiting sequence cannot be admitted, no waiting sequence of a later level jumps ahead.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.max_num_batched_tokens;
        let mut levels: Vec<Level> = self
            .running
            .iter()
            .chain(self.waiting.iter())
            .map(|&id| self.level_of(id))
            .collect();
        levels.sort_unstable();
        levels.dedup();
        let mut admitting = true;
        let mut interactive_tokens = None;
        for level in levels {
            if level.0 && interactive_tokens.is_none() {
                // Background levels come last: what is scheduled so far is interactive work.
                let n = out.num_tokens();
                interactive_tokens = Some(n);
                if let Some(cap) = self.background_cap(n) {
                    budget = budget.min(cap);
                }
            }
            self.schedule_running(&mut out, &mut budget, level);
            if admitting {
                admitting = self.schedule_waiting(&mut out, &mut budget, level);
            }
        }
        self.note_interactive(interactive_tokens.unwrap_or_else(|| out.num_tokens()));
        if out.scheduled.is_empty() && self.running.is_empty() {
            // Nothing fits although nothing runs: the head of the queue can never be admitted.
            let head = self
                .waiting
                .iter()
                .copied()
                .min_by_key(|&id| self.level_of(id));
            if let Some(id) = head {
                tracing::warn!(
                    seq = id,
                    "sequence does not fit in the KV cache; refusing it"
                );
                let children = self
                    .seqs
                    .get_mut(&id)
                    .map(|s| std::mem::take(&mut s.children))
                    .unwrap_or_default();
                self.finish(id);
                out.refused.push(id);
                out.refused.extend(children);
            }
        }
        out
    }

    /// How many tokens background work may take in a step with `interactive` interactive
    /// tokens: a share of them (at least one) while interactive work runs, and for a few steps
    /// after it paused (a client's next request is usually on its way, and must not wait
    /// behind a full-budget background step); `None` (the whole budget) otherwise.
    fn background_cap(&self, interactive: usize) -> Option<usize> {
        let share = |n: usize| ((n as f64 * self.background_share).ceil() as usize).max(1);
        if interactive > 0 {
            Some(share(interactive))
        } else if self.steps_since_interactive < BACKGROUND_GRACE_STEPS {
            Some(share(self.last_interactive_tokens))
        } else {
            None
        }
    }

    fn note_interactive(&mut self, interactive: usize) {
        if interactive > 0 {
            self.steps_since_interactive = 0;
            self.last_interactive_tokens = interactive;
        } else {
            self.steps_since_interactive = self.steps_since_interactive.saturating_add(1);
        }
    }

    /// The running sequence to preempt: not scheduled this step, at a level no more urgent than
    /// `level` (strictly less urgent if `strict`), the least urgent and then the latest admitted.
    fn victim(&self, out: &SchedulerOutput, level: Level, strict: bool) -> Option<SeqId> {
        self.running
            .iter()
            .copied()
            .filter(|s| !out.scheduled.iter().any(|e| e.id == *s))
            .filter(|&s| {
                let l = self.level_of(s);
                if strict {
                    l > level
                } else {
                    l >= level
                }
            })
            .max_by_key(|&s| {
                (
                    self.level_of(s),
                    self.seqs.get(&s).map_or(0, |q| q.admitted_at),
                )
            })
    }

    /// How many of a decoding sequence's drafts to verify when `n` tokens are due and `budget`
    /// is left: within the budget, leaving room in `max_tokens` and the context for the token
    /// sampled after the last accepted draft.
    fn drafts_to_verify(&self, seq: &SeqState, n: usize, budget: usize) -> usize {
        if seq.draft.is_empty() || n != 1 || seq.num_uncomputed() != 1 {
            return 0;
        }
        let left_output = seq.stops.max_tokens.saturating_sub(seq.num_output());
        let left_context = self.max_model_len.saturating_sub(seq.tokens.len());
        seq.draft
            .len()
            .min(budget - n)
            .min(left_output.saturating_sub(1))
            .min(left_context.saturating_sub(1))
    }

    /// 1. Running sequences of `level`, oldest first, preempting the least urgent and newest when
    /// blocks run out.
    fn schedule_running(&mut self, out: &mut SchedulerOutput, budget: &mut usize, level: Level) {
        let (lookahead, max_model_len) = (self.lookahead, self.max_model_len);
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
            let id = self.running[i];
            if self.level_of(id) != level {
                i += 1;
                continue;
            }
            let Some(seq) = self.seqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let n = seq.num_uncomputed().min(*budget).min(seq.max_chunk());
            if n == 0 {
                i += 1;
                continue;
            }
            let num_draft = self.drafts_to_verify(seq, n, *budget);
            let n = n + num_draft;
            // Make room, preempting the least urgent, newest running sequences (possibly this one).
            let mut scheduled_self = true;
            loop {
                let Some(seq) = self.seqs.get(&id) else { break };
                let Some(table) = seq.table.as_ref() else {
                    break;
                };
                let end = reserved_slots(seq.num_computed + n, lookahead, max_model_len);
                let need = self.blocks.blocks_needed(table, end, seq.num_computed);
                if need <= self.blocks.num_free_blocks() {
                    break;
                }
                let victim = self.victim(out, level, false).unwrap_or(id);
                self.preempt(victim);
                out.preempted.push(victim);
                if victim == id {
                    scheduled_self = false;
                    break;
                }
            }
            if !scheduled_self {
                continue; // `running[i]` is now the next sequence
            }
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            let entry = ScheduledSeq::new(id, n, num_draft, seq);
            let end = reserved_slots(seq.num_computed + n, lookahead, max_model_len);
            let Some(table) = seq.table.as_mut() else {
                continue;
            };
            match self.blocks.grow(table, end, seq.num_computed) {
                Ok(copies) => {
                    out.copies.extend(copies);
                    out.scheduled.push(entry);
                    *budget -= n;
                    self.fork_pending(out, &entry);
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
    }

    /// 2. Waiting sequences of `level` in queue order while there is room, preempting running
    /// sequences of less urgent levels for a slot or blocks (never of this level or a more
    /// urgent one). False once one cannot be admitted.
    fn schedule_waiting(
        &mut self,
        out: &mut SchedulerOutput,
        budget: &mut usize,
        level: Level,
    ) -> bool {
        let (lookahead, max_model_len) = (self.lookahead, self.max_model_len);
        while *budget > 0 {
            let Some(id) = self
                .waiting
                .iter()
                .copied()
                .find(|&id| self.level_of(id) == level)
            else {
                return true;
            };
            if self.running.len() >= self.max_num_seqs {
                match self.victim(out, level, true) {
                    Some(victim) => {
                        self.preempt(victim);
                        out.preempted.push(victim);
                        continue;
                    }
                    None => return false,
                }
            }
            let Some(seq) = self.seqs.get_mut(&id) else {
                self.waiting.retain(|&s| s != id);
                continue;
            };
            if seq.table.is_none() {
                let (table, cached) = self.blocks.start_sequence_in(&seq.tokens, &seq.cache);
                seq.table = Some(table);
                seq.num_computed = cached;
            }
            let n = seq.num_uncomputed().min(*budget).min(seq.max_chunk());
            let entry = ScheduledSeq::new(id, n, 0, seq);
            let end = reserved_slots(seq.num_computed + n, lookahead, max_model_len);
            let Some(table) = seq.table.as_mut() else {
                return false;
            };
            match self.blocks.grow(table, end, seq.num_computed) {
                Ok(copies) => {
                    out.copies.extend(copies);
                    seq.admitted_at = self.next_admission;
                    self.next_admission += 1;
                    self.waiting.retain(|&s| s != id);
                    self.running.push(id);
                    out.scheduled.push(entry);
                    *budget -= n;
                    self.fork_pending(out, &entry);
                }
                Err(_) => {
                    // Not enough free blocks: preempt less urgent work, or give the prefix-cache
                    // references back and wait.
                    if let Some(victim) = self.victim(out, level, true) {
                        self.preempt(victim);
                        out.preempted.push(victim);
                        continue;
                    }
                    if let Some(seq) = self.seqs.get_mut(&id) {
                        if let Some(table) = seq.table.take() {
                            self.blocks.free(table);
                        }
                        seq.num_computed = 0;
                    }
                    return false;
                }
            }
        }
        true
    }
}

/// Slots a sequence computing up to position `end` (exclusive) holds: `end` plus the
/// lookahead a draft model writes into, within the context.
fn reserved_slots(end: usize, lookahead: usize, max_model_len: usize) -> usize {
    (end + lookahead).min(max_model_len.max(end))
}

#[cfg(test)]
mod tests;
