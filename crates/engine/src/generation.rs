//! The generation core of the engine thread: `step() = schedule -> execute (forward pass and
//! sampling) -> update (append, stop, free) -> emit`, over the scheduler, the model runner and
//! the output processor. Each stage hands plain data to the next; none calls back into an
//! earlier one. What the output processor ends (stop strings, errors) and what requests abort
//! is released here, in the scheduler and the runner alike.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use spindle_model::{CacheShape, LoadedModel, ModelInfo, TokenizerBundle};

use crate::api::{CacheConfig, EngineError, EngineEvent, ModelKind, ModelLimits};
use crate::block_manager::{BlockManager, CacheScope};
use crate::config::EngineConfig;
use crate::core::{Core, Ready};
use crate::fault::FaultInjector;
use crate::handle::{EngineMessage, Liveness};
use crate::model_runner::{ExecuteError, ModelRunner};
use crate::output_processor::OutputProcessor;
use crate::scheduler::{Scheduler, SchedulerOutput, SeqId, SeqOptions};
use crate::spec::{DraftModel, DraftModelError, SpecMethod};
use crate::stats::EngineStats;
use crate::step_output::RunnerOutput;
use crate::token_stop::TokenStops;
use crate::trace::StepTrace;

/// The generation core: the scheduler (queues, KV blocks), the model runner (model, KV cache)
/// and the output processor (requests, sampling, text).
pub(crate) struct GenerationCore {
    config: EngineConfig,
    scheduler: Scheduler,
    runner: ModelRunner,
    outputs: OutputProcessor,
    tokenizer: Arc<TokenizerBundle>,
    info: Arc<ModelInfo>,
    cache: CacheConfig,
    stats: Arc<EngineStats>,
    liveness: Arc<Liveness>,
    faults: FaultInjector,
    step_count: u64,
}

impl GenerationCore {
    pub(crate) fn new(
        loaded: LoadedModel,
        config: EngineConfig,
        stats: Arc<EngineStats>,
        liveness: Arc<Liveness>,
    ) -> Result<Self, EngineError> {
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
        let bytes_per_block = crate::kv_cache::bytes_per_block(&loaded.model, &config, &shape);
        // One sequence must fit: all of it, or under a window every layer slides by, the window
        // plus one step's chunk (blocks that leave the window are released after each step).
        let window = mc
            .family
            .sliding_window
            .filter(|_| mc.family.all_sliding(mc.num_layers));
        let needed = match window {
            Some(w) => max_model_len.min(w + config.max_num_batched_tokens + 2 * block_size),
            None => max_model_len,
        };
        if shape.capacity_tokens() < needed {
            return Err(EngineError::KvCacheTooSmall {
                capacity_tokens: shape.capacity_tokens(),
                num_blocks: shape.num_blocks,
                block_size,
                needed_tokens: needed,
                max_model_len,
                block_kib: bytes_per_block / 1024,
            });
        }
        tracing::info!(
            "KV cache: {} blocks x {} tokens = {} tokens ({} MiB), prefix caching {}",
            shape.num_blocks,
            block_size,
            shape.capacity_tokens(),
            (shape.num_blocks * bytes_per_block) >> 20,
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
        let mut blocks =
            BlockManager::new(shape.num_blocks, block_size, config.enable_prefix_caching);
        if config.kv_event_sink.is_some() && config.enable_prefix_caching {
            blocks = blocks.with_events(crate::kv_events::BlockHasher::new(
                config.kv_hash_seed.as_deref(),
            ));
        }
        let scheduler = Scheduler::new(
            blocks,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.scheduling_policy,
        )
        .with_background_share(config.background_share)
        .with_stop_limits(loaded.tokenizer.eos_token_ids.clone(), max_model_len);
        let scheduler = match window {
            Some(w) => {
                tracing::info!(
                    window = w,
                    "every layer slides: blocks that leave the window are freed"
                );
                scheduler.with_sliding_window(w)
            }
            None => scheduler,
        };
        let eos_ids = loaded.tokenizer.eos_token_ids.clone();
        let draft = match config.speculative.as_ref().map(|s| &s.method) {
            Some(SpecMethod::DraftModel { model }) => {
                if window.is_some() {
                    return Err(EngineError::DraftModel(Arc::new(
                        DraftModelError::SlidingWindow,
                    )));
                }
                let vocab = loaded.tokenizer.tokenizer.get_vocab(true);
                let path = model.display().to_string();
                Some(DraftModel::load(
                    &path,
                    &vocab,
                    &config,
                    shape,
                    max_model_len,
                )?)
            }
            _ => None,
        };
        let scheduler = match (&draft, &config.speculative) {
            (Some(_), Some(spec)) => scheduler.with_lookahead(spec.num_speculative_tokens),
            _ => scheduler,
        };
        let tokenizer = Arc::new(loaded.tokenizer);
        let outputs = OutputProcessor::new(tokenizer.clone(), stats.clone());
        if let Some(spec) = &config.speculative {
            tracing::info!(
                method = ?spec.method,
                k = spec.num_speculative_tokens,
                disable_by_batch_size = spec.disable_by_batch_size,
                "speculative decoding on"
            );
        }
        let runner = ModelRunner::new(
            loaded.model,
            attention,
            config.seed,
            eos_ids,
            config.speculative.clone(),
            draft,
        );
        Ok(Self {
            scheduler,
            runner,
            outputs,
            tokenizer,
            info: Arc::new(loaded.info),
            cache: CacheConfig {
                block_size,
                num_blocks: shape.num_blocks,
                enable_prefix_caching: config.enable_prefix_caching,
            },
            stats,
            liveness,
            faults: FaultInjector::new(config.fault_injection.clone()),
            step_count: 0,
            config,
        })
    }

    /// What the handle needs to know about the loaded engine.
    pub(crate) fn ready(&self) -> Ready {
        Ready {
            kind: ModelKind::Generate,
            tokenizer: self.tokenizer.clone(),
            info: self.info.clone(),
            limits: ModelLimits {
                vocab_size: self.runner.model().config().vocab_size,
                max_model_len: self.info.max_model_len,
            },
            cache: self.cache,
        }
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
            if s.num_new_tokens == 1 + s.num_draft && decoding {
                trace.num_decode_tokens += s.num_new_tokens;
            } else {
                trace.num_prefill_tokens += s.num_new_tokens;
            }
        }
        trace
    }
}

impl Core for GenerationCore {
    fn has_work(&self) -> bool {
        self.scheduler.has_work()
    }

    fn handle(&mut self, msg: EngineMessage) {
        match msg {
            EngineMessage::Generate {
                id,
                request,
                events,
            } => {
                self.faults
                    .arm_if_marked(&self.tokenizer, request.prompt_token_ids());
                let urgency = request.urgency();
                let salt = request.cache_salt().map(Into::into);
                let (request_id, prompt, params, max_tokens, constraint) = request.into_parts();
                let seqs =
                    self.outputs
                        .add_request(id, request_id, &prompt, params.clone(), events);
                self.runner.add_request(&seqs, &params, constraint);
                let options = SeqOptions {
                    urgency,
                    cache: CacheScope {
                        salt,
                        skip_reads: false,
                    },
                    prompt_logits: params.prompt_logprobs.is_some(),
                    stops: TokenStops::new(&params, max_tokens),
                    children: seqs.get(1..).unwrap_or_default().to_vec(),
                };
                if let Some(&first) = seqs.first() {
                    self.scheduler.add_with(first, prompt, options);
                }
            }
            EngineMessage::Embed { events, .. } => {
                let _ = events.send(EngineEvent::Error(EngineError::WrongModelKind(
                    "this model generates text; it is not an embedding model",
                )));
            }
            EngineMessage::Abort { id } => {
                let ended = self.outputs.abort_request(id);
                self.release(&ended);
            }
            EngineMessage::Shutdown => {}
        }
    }

    fn fail_all(&mut self, error: &EngineError) {
        for id in self.outputs.request_ids() {
            let ended = self.outputs.fail_request(id, error.clone());
            self.release(&ended);
        }
    }

    /// One iteration: schedule -> run the model -> process the outputs; then hand the step's
    /// KV-cache events to the sink.
    fn step(&mut self) -> Result<(), EngineError> {
        let result = self.run_step();
        self.publish_kv_events();
        result
    }

    fn publish_gauges(&self) {
        let s = &self.stats;
        let blocks = self.scheduler.blocks();
        s.num_running
            .store(self.scheduler.num_running() as u64, Ordering::Relaxed);
        s.num_waiting
            .store(self.scheduler.num_waiting() as u64, Ordering::Relaxed);
        s.num_waiting_background.store(
            self.scheduler.num_waiting_background() as u64,
            Ordering::Relaxed,
        );
        s.kv_blocks_used
            .store(blocks.num_used_blocks() as u64, Ordering::Relaxed);
        let (queries, hits) = blocks.prefix_cache_stats();
        s.prefix_cache_queries_total
            .store(queries, Ordering::Relaxed);
        s.prefix_cache_hits_total.store(hits, Ordering::Relaxed);
    }
}

impl GenerationCore {
    fn publish_kv_events(&mut self) {
        let Some(sink) = &self.config.kv_event_sink else {
            return;
        };
        let events = self.scheduler.take_kv_events();
        if events.is_empty() {
            return;
        }
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        sink.publish(crate::kv_events::KvEventBatch { ts, events });
    }

    /// Forget ended sequences in the scheduler (freeing their blocks) and the runner.
    fn release(&mut self, seqs: &[SeqId]) {
        for &id in seqs {
            self.scheduler.finish(id);
            self.runner.remove(id);
        }
    }

    fn run_step(&mut self) -> Result<(), EngineError> {
        self.faults.inject_if_armed(&self.liveness)?;
        // 1. Schedule.
        let batch = self.scheduler.schedule();
        self.stats
            .preemptions_total
            .fetch_add(batch.preempted.len() as u64, Ordering::Relaxed);
        // Publish before any token of this step goes out, so that a client who has seen a
        // token also sees the blocks that produced it counted.
        self.publish_gauges();
        for &id in &batch.refused {
            let ended = self.outputs.refuse(id);
            self.release(&ended);
        }
        if batch.scheduled.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut trace = self.config.observer.is_some().then(|| self.trace(&batch));

        // 2. Execute: forward pass, sampling (draft verification), next drafts.
        let output = match self.runner.execute(&batch, &self.scheduler) {
            Ok(output) => output,
            Err(ExecuteError::Engine(e)) => return Err(e),
            Err(ExecuteError::Forward(e)) => {
                // A failing batch fails its requests, not the engine.
                tracing::error!("forward pass failed: {e}");
                let error = EngineError::model(e);
                for s in &batch.scheduled {
                    let ended = self.outputs.fail_seq_request(s.id, error.clone());
                    self.release(&ended);
                }
                return Ok(());
            }
        };
        self.count_speculation(&output);
        // 3. Update: append, token stops, KV rollback of rejected drafts, free what ended.
        let updates = self.scheduler.update_from_output(&batch, &output);
        // 4. Emit: prompt logprobs, text, stop strings, events.
        self.outputs.note_scheduled(&batch.scheduled, started);
        self.outputs.record_prompt_logprobs(&output.prompt_logprobs);
        let mut ended = self.outputs.process(updates, Instant::now());
        for (id, error) in output.failed {
            ended.extend(self.outputs.fail_seq_request(id, error));
        }
        self.release(&ended);

        self.step_count += 1;
        self.stats.iterations_total.fetch_add(1, Ordering::Relaxed);
        if let (Some(observer), Some(trace)) = (&self.config.observer, trace.as_mut()) {
            trace.execute_seconds = started.elapsed().as_secs_f64();
            observer.on_step(trace);
        }
        Ok(())
    }

    /// vLLM's speculative-decoding counters: drafts verified, their tokens, and the accepted
    /// ones overall and by position.
    fn count_speculation(&self, output: &RunnerOutput) {
        for s in output.sampled.iter().filter(|s| s.num_draft > 0) {
            self.stats.spec_drafts.fetch_add(1, Ordering::Relaxed);
            self.stats
                .spec_draft_tokens
                .fetch_add(s.num_draft as u64, Ordering::Relaxed);
            self.stats
                .spec_accepted_tokens
                .fetch_add(s.num_accepted as u64, Ordering::Relaxed);
            for pos in self.stats.spec_accepted_per_pos.iter().take(s.num_accepted) {
                pos.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
