//! The engine thread: owns the model and the paged KV cache and loops
//! `step() = schedule -> execute -> update` while there is work, blocking on its channel (with a
//! heartbeat timeout) when there is none. If the loop fails or panics, every caller in flight
//! gets an error and the handle reports the engine dead.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use rand::{Rng, SeedableRng};
use spindle_model::{
    AttentionBackend, AttentionMetadata, CacheShape, ForwardBatch, LlamaModel, ModelInfo,
    SequenceSlice, TokenizerBundle,
};
use tokio::sync::mpsc;

use crate::api::{
    ChoiceDelta, EngineError, EngineEvent, FinishReason, GenerateRequest, RequestTimings,
    StepLogprobs, StopReason, Usage,
};
use crate::block_manager::BlockManager;
use crate::config::{EngineConfig, FaultInjection};
use crate::detokenizer::IncrementalDetokenizer;
use crate::handle::{EngineHandle, EngineMessage, Liveness};
use crate::sampler::{sample_batch, SampleInput, SequenceRng};
use crate::scheduler::Scheduler;
use crate::sequence::{RequestGroup, SeqId, Sequence};
use crate::stats::EngineStats;
use crate::stop::StopChecker;
use crate::trace::StepTrace;

/// Entry point: `Engine::spawn(config)` loads the model on a new thread and returns its handle.
pub struct Engine;

/// What the engine thread reports back once the model is loaded.
struct Ready {
    tokenizer: Arc<TokenizerBundle>,
    info: Arc<ModelInfo>,
}

impl Engine {
    /// Start the engine thread, load the model there, and return a handle once it is ready.
    /// Load errors (missing file, bad config, cache too small) come back here.
    pub fn spawn(config: EngineConfig) -> Result<EngineHandle, EngineError> {
        let (sender, receiver) = crossbeam_channel::unbounded();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Ready, EngineError>>();
        let stats = Arc::new(EngineStats::default());
        let liveness = Arc::new(Liveness::new());
        let thread_stats = stats.clone();
        let thread_liveness = liveness.clone();
        let thread_config = config.clone();
        let spawned = std::thread::Builder::new()
            .name("spindle-engine".into())
            .spawn(move || {
                let core = match EngineCore::new(
                    thread_config,
                    receiver,
                    thread_stats,
                    thread_liveness.clone(),
                ) {
                    Ok(core) => core,
                    Err(e) => {
                        thread_liveness.mark_dead(e.to_string());
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                // Beat before reporting ready: loading took a while, and the watchdog starts now.
                thread_liveness.beat();
                let _ = ready_tx.send(Ok(Ready {
                    tokenizer: core.tokenizer.clone(),
                    info: core.info.clone(),
                }));
                core.run_until_exit();
            });
        if let Err(e) = spawned {
            return Err(EngineError::EngineDead(format!(
                "cannot start the engine thread: {e}"
            )));
        }
        let ready = ready_rx.recv().map_err(|_| {
            EngineError::EngineDead("the engine thread died while loading".into())
        })??;
        if let Some(timeout) = config.stall_timeout {
            let timeout = timeout.max(config.heartbeat_interval * 2);
            let watched = liveness.clone();
            let spawned = std::thread::Builder::new()
                .name("spindle-watchdog".into())
                .spawn(move || watchdog(&watched, timeout));
            if let Err(e) = spawned {
                liveness.mark_dead(format!("cannot start the engine watchdog: {e}"));
                let _ = sender.send(EngineMessage::Shutdown);
                return Err(EngineError::EngineDead(format!(
                    "cannot start the engine watchdog: {e}"
                )));
            }
        }
        Ok(EngineHandle {
            sender,
            next_id: Arc::new(AtomicU64::new(1)),
            liveness,
            stats,
            tokenizer: ready.tokenizer,
            model_info: ready.info,
            max_waiting_requests: config.max_waiting_requests,
            heartbeat_interval: config.heartbeat_interval,
        })
    }
}

/// Declare the engine dead once its heartbeat is older than `timeout` (a hang: a forward pass or
/// lock that never returns). The engine thread beats every iteration and at least every
/// heartbeat interval while idle, so only a stuck thread goes quiet. Exits once the engine is
/// dead for any reason.
fn watchdog(liveness: &Liveness, timeout: Duration) {
    let tick = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
    while !liveness.is_dead() {
        let quiet = liveness.since_last_beat();
        if quiet > timeout {
            let reason = format!(
                "the engine made no progress for {:.1} s (stall timeout {:.1} s)",
                quiet.as_secs_f64(),
                timeout.as_secs_f64()
            );
            tracing::error!("{reason}; declaring the engine dead");
            liveness.mark_dead(reason);
            return;
        }
        std::thread::sleep(tick);
    }
}

/// State owned by the engine thread.
struct EngineCore {
    config: EngineConfig,
    model: LlamaModel,
    attention: Box<dyn AttentionBackend>,
    tokenizer: Arc<TokenizerBundle>,
    info: Arc<ModelInfo>,
    blocks: BlockManager,
    scheduler: Scheduler,
    seqs: HashMap<SeqId, Sequence>,
    groups: HashMap<u64, RequestGroup>,
    next_seq: SeqId,
    receiver: Receiver<EngineMessage>,
    stats: Arc<EngineStats>,
    liveness: Arc<Liveness>,
    step_count: u64,
    seed_rng: rand::rngs::StdRng,
    /// Set when a request carrying the fault-injection marker arrived; the next step fails.
    fault_armed: bool,
}

/// Whether the loop continues after a message.
#[derive(PartialEq)]
enum Flow {
    Continue,
    Shutdown,
}

impl EngineCore {
    fn new(
        config: EngineConfig,
        receiver: Receiver<EngineMessage>,
        stats: Arc<EngineStats>,
        liveness: Arc<Liveness>,
    ) -> Result<Self, EngineError> {
        let loaded = spindle_model::load(&config.model)
            .map_err(|e| EngineError::EngineDead(e.to_string()))?;
        let mc = loaded.model.config().clone();
        let block_size = config.block_size.max(1);
        let shape = CacheShape {
            num_layers: mc.num_layers,
            num_blocks: 0,
            block_size,
            num_kv_heads: mc.num_kv_heads,
            head_dim: mc.head_dim,
        };
        let max_model_len = loaded.info.max_model_len;
        let (attention, shape) =
            crate::kv_cache::build(&loaded.model, &config, shape, max_model_len)?;
        let bytes_per_block = crate::kv_cache::bytes_per_block(&loaded.model, &shape);
        if shape.capacity_tokens() < max_model_len {
            return Err(EngineError::EngineDead(format!(
                "the KV cache holds {} tokens ({} blocks of {block_size}), less than max_model_len {max_model_len}: \
                 raise --kv-cache-memory / --gpu-memory-utilization (each block needs {} KiB) or lower --max-model-len",
                shape.capacity_tokens(),
                shape.num_blocks,
                bytes_per_block / 1024
            )));
        }
        tracing::info!(
            "KV cache: {} blocks x {} tokens = {} tokens ({} MiB), prefix caching {}",
            shape.num_blocks,
            block_size,
            shape.capacity_tokens(),
            shape.num_blocks * bytes_per_block >> 20,
            if config.enable_prefix_caching {
                "on"
            } else {
                "off"
            }
        );
        stats
            .kv_blocks_total
            .store(shape.num_blocks as u64, Ordering::Relaxed);
        stats
            .kv_capacity_tokens
            .store(shape.capacity_tokens() as u64, Ordering::Relaxed);
        let blocks = BlockManager::new(shape.num_blocks, block_size, config.enable_prefix_caching);
        let scheduler = Scheduler::new(config.max_num_seqs, config.max_num_batched_tokens);
        let seed_rng = rand::rngs::StdRng::seed_from_u64(config.seed);
        Ok(Self {
            model: loaded.model,
            attention,
            tokenizer: Arc::new(loaded.tokenizer),
            info: Arc::new(loaded.info),
            blocks,
            scheduler,
            seqs: HashMap::new(),
            groups: HashMap::new(),
            next_seq: 0,
            receiver,
            stats,
            liveness,
            step_count: 0,
            seed_rng,
            fault_armed: false,
            config,
        })
    }

    /// Run the loop; whatever ends it (shutdown, error, panic), fail what is in flight and mark
    /// the engine dead so handles refuse new work.
    fn run_until_exit(mut self) {
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.run()));
        let reason = match outcome {
            Ok(Ok(())) => "the engine has shut down".to_string(),
            Ok(Err(e)) => {
                tracing::error!("engine failed: {e}");
                format!("the engine failed: {e}")
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!("engine thread panicked: {msg}");
                format!("the engine thread panicked: {msg}")
            }
        };
        self.liveness.mark_dead(reason.clone());
        let groups: Vec<u64> = self.groups.keys().copied().collect();
        for g in groups {
            self.fail_group(g, EngineError::EngineDead(reason.clone()));
        }
        while let Ok(msg) = self.receiver.try_recv() {
            if let EngineMessage::Generate { events, .. } = msg {
                let _ = events.send(EngineEvent::Error(EngineError::EngineDead(reason.clone())));
            }
        }
        self.publish_gauges();
    }

    fn run(&mut self) -> Result<(), EngineError> {
        loop {
            if self.liveness.is_dead() {
                // The watchdog gave up on us while we were stuck: callers already got errors.
                return Err(EngineError::EngineDead(self.liveness.death_reason()));
            }
            self.liveness.beat();
            if !self.scheduler.has_work() {
                match self.receiver.recv_timeout(self.config.heartbeat_interval) {
                    Ok(msg) => {
                        if self.handle_message(msg) == Flow::Shutdown {
                            return Ok(());
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                }
            }
            loop {
                match self.receiver.try_recv() {
                    Ok(msg) => {
                        if self.handle_message(msg) == Flow::Shutdown {
                            return Ok(());
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if !self.scheduler.has_work() {
                            return Ok(());
                        }
                        break;
                    }
                }
            }
            self.abort_abandoned();
            if self.scheduler.has_work() {
                // Run the whole step on a rayon worker: the forward pass makes hundreds of
                // small parallel calls, and from a worker each is a cheap local fork instead of
                // a cross-thread injection with a sleep and a wake-up (measured: half the
                // single-stream decode time went to those round trips).
                rayon::scope(|_| self.step())?;
            }
            self.publish_gauges();
        }
    }

    fn handle_message(&mut self, msg: EngineMessage) -> Flow {
        match msg {
            EngineMessage::Generate {
                id,
                request,
                events,
            } => {
                self.stats.received.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = self.add_request(id, request, events.clone()) {
                    let _ = events.send(EngineEvent::Error(e));
                }
                Flow::Continue
            }
            EngineMessage::Abort { id } => {
                self.abort_group(id);
                Flow::Continue
            }
            EngineMessage::Shutdown => Flow::Shutdown,
        }
    }

    fn add_request(
        &mut self,
        id: u64,
        request: GenerateRequest,
        events: mpsc::UnboundedSender<EngineEvent>,
    ) -> Result<(), EngineError> {
        let GenerateRequest {
            request_id,
            prompt_token_ids: prompt,
            params,
        } = request;
        let max_len = self.info.max_model_len;
        let vocab = self.model.config().vocab_size as u32;
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t >= vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "prompt token id {bad} is out of range for a vocabulary of {vocab}"
            )));
        }
        if prompt.len() >= max_len {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens, the model's context is {max_len}",
                prompt.len()
            )));
        }
        if params.n == 0 {
            return Err(EngineError::InvalidRequest("n must be at least 1".into()));
        }
        let max_tokens = params.max_tokens.min(max_len - prompt.len());
        if max_tokens == 0 {
            return Err(EngineError::InvalidRequest(
                "max_tokens must be at least 1".into(),
            ));
        }
        self.arm_fault_if_marked(&prompt);
        let fallback_seed: u64 = self.seed_rng.random();
        let seq = self.new_sequence(id, 0, &prompt, &params, fallback_seed);
        let seq_id = seq.id;
        self.seqs.insert(seq_id, seq);
        self.scheduler.waiting.push_back(seq_id);
        self.stats
            .prompt_tokens_total
            .fetch_add(prompt.len() as u64, Ordering::Relaxed);
        self.groups.insert(
            id,
            RequestGroup {
                request_id,
                pending_children: params.n > 1,
                params,
                events,
                usage: Usage {
                    prompt_tokens: prompt.len(),
                    ..Usage::default()
                },
                prompt,
                max_tokens,
                fallback_seed,
                num_live: 1,
                arrived: Instant::now(),
                first_scheduled: None,
                first_token: None,
            },
        );
        Ok(())
    }

    fn new_sequence(
        &mut self,
        group: u64,
        choice: usize,
        prompt: &[u32],
        params: &crate::api::SamplingParams,
        fallback_seed: u64,
    ) -> Sequence {
        let id = self.next_seq;
        self.next_seq += 1;
        Sequence {
            id,
            group,
            choice,
            tokens: prompt.to_vec(),
            prompt_len: prompt.len(),
            num_computed: 0,
            table: None,
            rng: SequenceRng::new(params.seed, choice, fallback_seed),
            detokenizer: IncrementalDetokenizer::new(prompt, params.skip_special_tokens),
            stop: StopChecker::new(&params.stop, params.include_stop_str_in_output),
            admitted_at: 0,
            finished: None,
        }
    }

    /// Abort requests whose caller has gone away (receiver dropped).
    fn abort_abandoned(&mut self) {
        let gone: Vec<u64> = self
            .groups
            .iter()
            .filter(|(_, g)| g.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.abort_group(id);
        }
    }

    /// Remove a request and free its blocks without telling the caller (it is gone or asked).
    fn abort_group(&mut self, group: u64) {
        if self.groups.remove(&group).is_none() {
            return;
        }
        let ids: Vec<SeqId> = self
            .seqs
            .values()
            .filter(|s| s.group == group)
            .map(|s| s.id)
            .collect();
        for id in ids {
            self.release_sequence(id);
        }
    }

    fn fail_group(&mut self, group: u64, error: EngineError) {
        if let Some(g) = self.groups.get(&group) {
            let _ = g.events.send(EngineEvent::Error(error));
        }
        self.abort_group(group);
    }

    fn release_sequence(&mut self, id: SeqId) {
        self.scheduler.remove(id);
        if let Some(mut seq) = self.seqs.remove(&id) {
            if let Some(table) = seq.table.take() {
                self.blocks.free(table);
            }
        }
    }

    fn publish_gauges(&self) {
        let s = &self.stats;
        s.num_running
            .store(self.scheduler.running.len() as u64, Ordering::Relaxed);
        s.num_waiting
            .store(self.scheduler.waiting.len() as u64, Ordering::Relaxed);
        s.kv_blocks_used
            .store(self.blocks.num_used_blocks() as u64, Ordering::Relaxed);
        let (queries, hits) = self.blocks.prefix_cache_stats();
        s.prefix_cache_queries_total
            .store(queries, Ordering::Relaxed);
        s.prefix_cache_hits_total.store(hits, Ordering::Relaxed);
    }

    /// Test-only fault injection: arm the configured fault when the prompt has the marker.
    fn arm_fault_if_marked(&mut self, prompt: &[u32]) {
        let Some(fault) = &self.config.fault_injection else {
            return;
        };
        let marked = self
            .tokenizer
            .decode(prompt, false)
            .is_ok_and(|text| text.contains(fault.marker()));
        if marked {
            tracing::warn!(
                ?fault,
                "fault-injection marker seen; the next engine step fails"
            );
            self.fault_armed = true;
        }
    }

    /// Inflict the armed fault (see [`FaultInjection`]).
    fn inject_fault(&mut self) -> Result<(), EngineError> {
        self.fault_armed = false;
        match &self.config.fault_injection {
            None => Ok(()),
            Some(FaultInjection::Panic { .. }) => panic!("injected fault: engine panic"),
            Some(FaultInjection::Error { .. }) => Err(EngineError::Execution(
                "injected fault: engine error".into(),
            )),
            Some(FaultInjection::Stall { .. }) => {
                // Hang without beating until the watchdog notices (forever without one).
                while !self.liveness.is_dead() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(EngineError::EngineDead(self.liveness.death_reason()))
            }
        }
    }

    /// One iteration: schedule -> execute -> update.
    fn step(&mut self) -> Result<(), EngineError> {
        if self.fault_armed {
            self.inject_fault()?;
        }
        let batch = self.scheduler.schedule(&mut self.seqs, &mut self.blocks);
        self.stats
            .preemptions_total
            .fetch_add(batch.preempted.len() as u64, Ordering::Relaxed);
        // Publish before any token of this step goes out, so that a client who has seen a
        // token also sees the blocks that produced it counted.
        self.publish_gauges();
        if batch.entries.is_empty() {
            // Nothing fits although nothing runs: the head of the queue can never be admitted.
            if self.scheduler.running.is_empty() {
                if let Some(&id) = self.scheduler.waiting.front() {
                    tracing::warn!(
                        seq = id,
                        "sequence does not fit in the KV cache; finishing it"
                    );
                    self.finish_unschedulable(id);
                }
            }
            return Ok(());
        }
        if !batch.copies.is_empty() {
            self.attention
                .copy_blocks(&batch.copies)
                .map_err(|e| EngineError::Execution(e.to_string()))?;
        }
        let started = Instant::now();

        // Build the flattened batch.
        let mut fb = ForwardBatch::default();
        let mut md = AttentionMetadata::default();
        let block_size = self.blocks.block_size();
        let mut sampling: Vec<SeqId> = Vec::new();
        let mut trace = StepTrace {
            step: self.step_count,
            ..StepTrace::default()
        };
        for &(id, n) in &batch.entries {
            let Some(seq) = self.seqs.get(&id) else {
                continue;
            };
            let Some(table) = seq.table.as_ref() else {
                continue;
            };
            let start = fb.token_ids.len();
            let from = seq.num_computed;
            for pos in from..from + n {
                fb.token_ids.push(seq.tokens[pos]);
                fb.positions.push(pos as u32);
                let slot = table.slot(pos, block_size).ok_or_else(|| {
                    EngineError::Execution(format!("sequence {id} has no slot for position {pos}"))
                })?;
                md.slot_mapping.push(slot as u32);
            }
            md.sequences.push(SequenceSlice {
                query_start: start,
                query_len: n,
                context_len: from + n,
                block_table: table.blocks.clone(),
            });
            if from + n == seq.tokens.len() {
                fb.logit_rows.push((fb.token_ids.len() - 1) as u32);
                sampling.push(id);
            }
            if let Some(g) = self.groups.get(&seq.group) {
                trace.request_ids.push(g.request_id.clone());
            }
            if n == 1 && seq.num_output() > 0 {
                trace.num_decode_tokens += 1;
            } else {
                trace.num_prefill_tokens += n;
            }
        }
        fb.attention = md;

        // Execute.
        let logits = if fb.logit_rows.is_empty() {
            // Only partial prefill chunks: run for the KV writes, no logits wanted. The model
            // always returns at least one row, so ask for the last token's and ignore it.
            fb.logit_rows.push((fb.token_ids.len() - 1) as u32);
            self.model
                .forward(&fb, self.attention.as_mut())
                .map(|_| Vec::new())
        } else {
            self.model
                .forward(&fb, self.attention.as_mut())
                .and_then(|t| Ok(t.to_vec2::<f32>()?))
        };
        let rows = match logits {
            Ok(rows) => rows,
            Err(e) => {
                // A failing batch fails its requests, not the engine.
                tracing::error!("forward pass failed: {e}");
                let groups: Vec<u64> = batch
                    .entries
                    .iter()
                    .filter_map(|(id, _)| self.seqs.get(id).map(|s| s.group))
                    .collect();
                for g in groups {
                    self.fail_group(g, EngineError::Execution(e.to_string()));
                }
                return Ok(());
            }
        };

        // Update: KV now holds the scheduled tokens.
        let now = Instant::now();
        for &(id, n) in &batch.entries {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            if let Some(g) = self.groups.get_mut(&seq.group) {
                if g.first_scheduled.is_none() {
                    g.first_scheduled = Some(started);
                    g.usage.cached_tokens = seq.num_computed;
                }
            }
            seq.num_computed += n;
            if let Some(table) = seq.table.as_mut() {
                self.blocks.commit(table, &seq.tokens[..seq.num_computed]);
            }
        }
        self.sample_and_emit(&sampling, &rows, now);

        trace.num_preempted = batch.preempted.len();
        trace.execute_seconds = started.elapsed().as_secs_f64();
        self.step_count += 1;
        self.stats.iterations_total.fetch_add(1, Ordering::Relaxed);
        if let Some(observer) = &self.config.observer {
            observer.on_step(&trace);
        }
        Ok(())
    }

    /// Sample the next token of every sequence in `ids` (row `i` of `rows` belongs to `ids[i]`),
    /// fork `n > 1` children after their parent's prefill, and stream the results.
    fn sample_and_emit(&mut self, ids: &[SeqId], rows: &[Vec<f32>], now: Instant) {
        // Children of n > 1 requests start from their parent's prompt logits.
        let mut work: Vec<(SeqId, usize)> = ids.iter().copied().zip(0..).collect();
        for (i, &id) in ids.iter().enumerate() {
            let Some(seq) = self.seqs.get(&id) else {
                continue;
            };
            let group_id = seq.group;
            let Some(group) = self.groups.get_mut(&group_id) else {
                continue;
            };
            if seq.choice != 0 || !group.pending_children {
                continue;
            }
            group.pending_children = false;
            let (n, prompt, params, fallback) = (
                group.params.n,
                group.prompt.clone(),
                group.params.clone(),
                group.fallback_seed,
            );
            group.num_live += n - 1;
            for choice in 1..n {
                let mut child = self.new_sequence(group_id, choice, &prompt, &params, fallback);
                let parent_table = self.seqs.get(&id).and_then(|s| s.table.as_ref());
                child.table = parent_table.map(|t| self.blocks.fork(t));
                child.num_computed = prompt.len();
                self.scheduler.add_running(&mut child);
                work.push((child.id, i));
                self.seqs.insert(child.id, child);
            }
        }

        // Sample all rows in parallel; each sequence has its own RNG.
        let eos = self.tokenizer.eos_token_ids.clone();
        let mut picked: Vec<(SeqId, Result<(u32, Option<StepLogprobs>), String>)> =
            Vec::with_capacity(work.len());
        {
            let mut inputs = Vec::with_capacity(work.len());
            let mut order = Vec::with_capacity(work.len());
            let mut seq_refs: HashMap<SeqId, &mut Sequence> =
                self.seqs.iter_mut().map(|(k, v)| (*k, v)).collect();
            for &(id, row) in &work {
                let Some(seq) = seq_refs.remove(&id) else {
                    continue;
                };
                let Some(group) = self.groups.get(&seq.group) else {
                    continue;
                };
                let Some(logits) = rows.get(row) else {
                    continue;
                };
                let (prompt, output) = seq.tokens.split_at(seq.prompt_len);
                inputs.push(SampleInput {
                    logits,
                    params: &group.params,
                    prompt_ids: prompt,
                    output_ids: output,
                    eos_ids: &eos,
                    rng: &mut seq.rng,
                });
                order.push(id);
            }
            let results = sample_batch(&mut inputs);
            for (id, r) in order.into_iter().zip(results) {
                picked.push((id, r.map_err(|e| e.to_string())));
            }
        }
        for (id, result) in picked {
            match result {
                Ok((token, logprobs)) => self.append_token(id, token, logprobs, now),
                Err(e) => {
                    if let Some(group) = self.seqs.get(&id).map(|s| s.group) {
                        self.fail_group(
                            group,
                            EngineError::Execution(format!("sampling failed: {e}")),
                        );
                    }
                }
            }
        }
    }

    /// Add a sampled token to a sequence, detokenize, check stops, and send the delta.
    fn append_token(
        &mut self,
        id: SeqId,
        token: u32,
        logprobs: Option<StepLogprobs>,
        now: Instant,
    ) {
        let max_len = self.info.max_model_len;
        let tokenizer = self.tokenizer.clone();
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        let Some(group) = self.groups.get_mut(&seq.group) else {
            return;
        };
        seq.tokens.push(token);
        group.usage.completion_tokens += 1;
        group.first_token.get_or_insert(now);
        self.stats
            .generation_tokens_total
            .fetch_add(1, Ordering::Relaxed);

        let params = &group.params;
        let min_reached = seq.num_output() > params.min_tokens || params.min_tokens == 0;
        let is_eos = !params.ignore_eos && tokenizer.eos_token_ids.contains(&token);
        let is_stop_id = params.stop_token_ids.contains(&token);
        let mut text = String::new();
        let mut finish: Option<(FinishReason, Option<StopReason>)> = None;
        let mut error = None;
        if (is_eos || is_stop_id) && min_reached {
            let reason = if is_stop_id && !is_eos {
                Some(StopReason::TokenId(token))
            } else {
                None
            };
            finish = Some((FinishReason::Stop, reason));
        } else {
            match seq.detokenizer.push(&tokenizer.tokenizer, token) {
                Ok(piece) => {
                    let (emit, hit) = seq.stop.push(&piece);
                    text.push_str(&emit);
                    if let Some(stop) = hit {
                        finish = Some((FinishReason::Stop, Some(StopReason::Text(stop))));
                    }
                }
                Err(e) => error = Some(e.to_string()),
            }
            if finish.is_none()
                && (seq.num_output() >= group.max_tokens || seq.tokens.len() >= max_len)
            {
                finish = Some((FinishReason::Length, None));
            }
        }
        if let Some(e) = error {
            let group_id = seq.group;
            self.fail_group(
                group_id,
                EngineError::Execution(format!("detokenization failed: {e}")),
            );
            return;
        }
        // At the end, release text held back for split characters or possible stop strings.
        if let Some((_, None)) | Some((FinishReason::Length, _)) = finish {
            if let Ok(tail) = seq.detokenizer.finish(&tokenizer.tokenizer) {
                let (emit, hit) = seq.stop.push(&tail);
                text.push_str(&emit);
                if let Some(stop) = hit {
                    finish = Some((FinishReason::Stop, Some(StopReason::Text(stop))));
                } else {
                    text.push_str(&seq.stop.finish());
                }
            }
        }
        let delta = ChoiceDelta {
            index: seq.choice,
            token_ids: vec![token],
            text,
            logprobs: logprobs.into_iter().collect(),
            finish_reason: finish.as_ref().map(|f| f.0),
            stop_reason: finish.as_ref().and_then(|f| f.1.clone()),
        };
        let _ = group.events.send(EngineEvent::Delta(delta));
        if finish.is_some() {
            seq.finished = finish;
            let group_id = seq.group;
            self.release_sequence(id);
            self.finish_if_done(group_id, now);
        }
    }

    /// Send `Finished` once every choice of a request is done.
    fn finish_if_done(&mut self, group_id: u64, now: Instant) {
        let Some(group) = self.groups.get_mut(&group_id) else {
            return;
        };
        group.num_live = group.num_live.saturating_sub(1);
        if group.num_live > 0 || group.pending_children {
            return;
        }
        let Some(group) = self.groups.remove(&group_id) else {
            return;
        };
        let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
        let scheduled = group.first_scheduled.unwrap_or(group.arrived);
        let first = group.first_token.unwrap_or(now);
        let timings = RequestTimings {
            queue: secs(group.arrived, scheduled),
            prefill: secs(scheduled, first),
            decode: secs(first, now),
            time_to_first_token: secs(group.arrived, first),
            e2e: secs(group.arrived, now),
        };
        let _ = group.events.send(EngineEvent::Finished {
            usage: group.usage,
            timings,
        });
    }

    /// A waiting sequence that cannot fit even in an empty cache ends with `length`.
    fn finish_unschedulable(&mut self, id: SeqId) {
        let Some(seq) = self.seqs.get(&id) else {
            self.scheduler.remove(id);
            return;
        };
        let group_id = seq.group;
        let delta = ChoiceDelta {
            index: seq.choice,
            token_ids: Vec::new(),
            text: String::new(),
            logprobs: Vec::new(),
            finish_reason: Some(FinishReason::Length),
            stop_reason: None,
        };
        if let Some(g) = self.groups.get(&group_id) {
            let _ = g.events.send(EngineEvent::Delta(delta));
        }
        self.release_sequence(id);
        self.finish_if_done(group_id, Instant::now());
    }
}
