//! The engine thread: owns the model and the paged KV cache and loops
//! `step() = schedule -> run the model -> process outputs` while there is work, blocking on its channel (with a
//! heartbeat timeout) when there is none. If the loop fails or panics, every caller in flight
//! gets an error and the handle reports the engine dead.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use spindle_model::{CacheShape, ModelInfo, TokenizerBundle};

use crate::api::{CacheConfig, EngineError, EngineEvent, ModelLimits};
use crate::block_manager::BlockManager;
use crate::config::EngineConfig;
use crate::fault::FaultInjector;
use crate::handle::{EngineHandle, EngineMessage, Liveness};
use crate::model_runner::ModelRunner;
use crate::output_processor::OutputProcessor;
use crate::scheduler::{Scheduler, SchedulerOutput};
use crate::stats::EngineStats;
use crate::trace::StepTrace;

/// Entry point: `Engine::spawn(config)` loads the model on a new thread and returns its handle.
pub struct Engine;

/// What the engine thread reports back once the model is loaded.
struct Ready {
    tokenizer: Arc<TokenizerBundle>,
    info: Arc<ModelInfo>,
    limits: ModelLimits,
    cache: CacheConfig,
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
                let _ = ready_tx.send(Ok(core.ready()));
                core.run_until_exit();
            });
        if let Err(e) = spawned {
            return Err(EngineError::Spawn(e.to_string()));
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
                return Err(EngineError::Spawn(format!("the watchdog: {e}")));
            }
        }
        Ok(EngineHandle {
            sender,
            next_id: Arc::new(AtomicU64::new(1)),
            liveness,
            stats,
            tokenizer: ready.tokenizer,
            model_info: ready.info,
            limits: ready.limits,
            cache: ready.cache,
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

/// State owned by the engine thread: the scheduler (queues, KV blocks), the model runner
/// (model, KV cache) and the output processor (requests, sampling, text).
struct EngineCore {
    config: EngineConfig,
    scheduler: Scheduler,
    runner: ModelRunner,
    outputs: OutputProcessor,
    tokenizer: Arc<TokenizerBundle>,
    info: Arc<ModelInfo>,
    cache: CacheConfig,
    receiver: Receiver<EngineMessage>,
    stats: Arc<EngineStats>,
    liveness: Arc<Liveness>,
    faults: FaultInjector,
    step_count: u64,
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
        let loaded = spindle_model::load(&config.model).map_err(EngineError::load)?;
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
            return Err(EngineError::KvCacheTooSmall {
                capacity_tokens: shape.capacity_tokens(),
                num_blocks: shape.num_blocks,
                block_size,
                max_model_len,
                block_kib: bytes_per_block / 1024,
            });
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
        let scheduler = Scheduler::new(blocks, config.max_num_seqs, config.max_num_batched_tokens);
        let tokenizer = Arc::new(loaded.tokenizer);
        let outputs =
            OutputProcessor::new(tokenizer.clone(), max_model_len, config.seed, stats.clone());
        Ok(Self {
            scheduler,
            runner: ModelRunner::new(loaded.model, attention),
            outputs,
            tokenizer,
            info: Arc::new(loaded.info),
            cache: CacheConfig {
                block_size,
                num_blocks: shape.num_blocks,
                enable_prefix_caching: config.enable_prefix_caching,
            },
            receiver,
            stats,
            liveness,
            faults: FaultInjector::new(config.fault_injection.clone()),
            step_count: 0,
            config,
        })
    }

    /// What the handle needs to know about the loaded engine.
    fn ready(&self) -> Ready {
        Ready {
            tokenizer: self.tokenizer.clone(),
            info: self.info.clone(),
            limits: ModelLimits {
                vocab_size: self.runner.model().config().vocab_size,
                max_model_len: self.info.max_model_len,
            },
            cache: self.cache,
        }
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
        for id in self.outputs.request_ids() {
            let error = EngineError::EngineDead(reason.clone());
            self.outputs.fail_request(id, error, &mut self.scheduler);
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
            if self.drain_messages()? == Flow::Shutdown {
                return Ok(());
            }
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

    /// Take every pending message; block (up to a heartbeat) for one when there is no work.
    fn drain_messages(&mut self) -> Result<Flow, EngineError> {
        if !self.scheduler.has_work() {
            match self.receiver.recv_timeout(self.config.heartbeat_interval) {
                Ok(msg) => {
                    if self.handle_message(msg) == Flow::Shutdown {
                        return Ok(Flow::Shutdown);
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Ok(Flow::Continue),
                Err(RecvTimeoutError::Disconnected) => return Ok(Flow::Shutdown),
            }
        }
        loop {
            match self.receiver.try_recv() {
                Ok(msg) => {
                    if self.handle_message(msg) == Flow::Shutdown {
                        return Ok(Flow::Shutdown);
                    }
                }
                Err(TryRecvError::Empty) => return Ok(Flow::Continue),
                Err(TryRecvError::Disconnected) if !self.scheduler.has_work() => {
                    return Ok(Flow::Shutdown)
                }
                Err(TryRecvError::Disconnected) => return Ok(Flow::Continue),
            }
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
                self.faults
                    .arm_if_marked(&self.tokenizer, request.prompt_token_ids());
                let priority = 0;
                let (seq, prompt) = self.outputs.add_request(id, request, events);
                self.scheduler.add(seq, prompt, priority);
                Flow::Continue
            }
            EngineMessage::Abort { id } => {
                self.outputs.abort_request(id, &mut self.scheduler);
                Flow::Continue
            }
            EngineMessage::Shutdown => Flow::Shutdown,
        }
    }

    /// One iteration: schedule -> run the model -> process the outputs.
    fn step(&mut self) -> Result<(), EngineError> {
        self.faults.inject_if_armed(&self.liveness)?;
        let batch = self.scheduler.schedule();
        self.stats
            .preemptions_total
            .fetch_add(batch.preempted.len() as u64, Ordering::Relaxed);
        // Publish before any token of this step goes out, so that a client who has seen a
        // token also sees the blocks that produced it counted.
        self.publish_gauges();
        for &id in &batch.refused {
            self.outputs.refuse(id, &mut self.scheduler);
        }
        if batch.scheduled.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut trace = self.config.observer.is_some().then(|| self.trace(&batch));

        let input = self.runner.prepare(&batch, &self.scheduler)?;
        let rows = match self.runner.run(input) {
            Ok(rows) => rows,
            Err(e) => {
                // A failing batch fails its requests, not the engine.
                tracing::error!("forward pass failed: {e}");
                let error = EngineError::model(e);
                for s in &batch.scheduled {
                    self.outputs
                        .fail_seq_request(s.id, error.clone(), &mut self.scheduler);
                }
                return Ok(());
            }
        };
        self.scheduler.on_step_done(&batch.scheduled);
        self.outputs.note_scheduled(&batch.scheduled, started);
        let sampled: Vec<_> = batch
            .scheduled
            .iter()
            .filter(|s| s.samples)
            .map(|s| s.id)
            .collect();
        self.outputs
            .process(&sampled, &rows, &mut self.scheduler, Instant::now());

        self.step_count += 1;
        self.stats.iterations_total.fetch_add(1, Ordering::Relaxed);
        if let (Some(observer), Some(trace)) = (&self.config.observer, trace.as_mut()) {
            trace.execute_seconds = started.elapsed().as_secs_f64();
            observer.on_step(trace);
        }
        Ok(())
    }

    /// What a step observer sees of a batch (taken before the outputs change it).
    fn trace(&self, batch: &SchedulerOutput) -> StepTrace {
        let mut trace = StepTrace {
            step: self.step_count,
            num_preempted: batch.preempted.len(),
            ..StepTrace::default()
        };
        for s in &batch.scheduled {
            if let Some(request_id) = self.outputs.request_id_of(s.id) {
                trace.request_ids.push(request_id.to_string());
            }
            let decoding = self.scheduler.seq(s.id).is_some_and(|q| q.num_output() > 0);
            if s.num_new_tokens == 1 && decoding {
                trace.num_decode_tokens += 1;
            } else {
                trace.num_prefill_tokens += s.num_new_tokens;
            }
        }
        trace
    }

    fn publish_gauges(&self) {
        let s = &self.stats;
        let blocks = self.scheduler.blocks();
        s.num_running
            .store(self.scheduler.num_running() as u64, Ordering::Relaxed);
        s.num_waiting
            .store(self.scheduler.num_waiting() as u64, Ordering::Relaxed);
        s.kv_blocks_used
            .store(blocks.num_used_blocks() as u64, Ordering::Relaxed);
        let (queries, hits) = blocks.prefix_cache_stats();
        s.prefix_cache_queries_total
            .store(queries, Ordering::Relaxed);
        s.prefix_cache_hits_total.store(hits, Ordering::Relaxed);
    }
}
