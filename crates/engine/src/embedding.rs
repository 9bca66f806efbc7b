//! The embedding core of the engine thread, for encoder models: each step packs waiting inputs,
//! oldest first, up to the token budget (`--max-num-batched-tokens`, TEI's max-batch-tokens
//! idea) and `--max-num-seqs` inputs, runs one forward pass over the packed batch (no padding),
//! and answers each request once all its inputs are done. The inputs of one request may span
//! steps; many small requests share a step. An input longer than the budget runs alone.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use spindle_model::{BertModel, EncoderBatch, LoadedEncoder};
use tokio::sync::mpsc;

use crate::api::{
    CacheConfig, EmbedRequest, EngineError, EngineEvent, ModelKind, ModelLimits, RequestTimings,
    Usage,
};
use crate::config::EngineConfig;
use crate::core::{Core, Ready};
use crate::handle::EngineMessage;
use crate::stats::EngineStats;
use crate::trace::StepTrace;

/// One embedding request in flight.
struct Pending {
    request_id: String,
    inputs: Vec<Vec<u32>>,
    vectors: Vec<Option<Vec<f32>>>,
    remaining: usize,
    events: mpsc::UnboundedSender<EngineEvent>,
    prompt_tokens: usize,
    arrived: Instant,
    first_scheduled: Option<Instant>,
}

/// The encoder and the queue of inputs waiting for it.
pub(crate) struct EmbeddingCore {
    model: BertModel,
    ready: Ready,
    max_batch_tokens: usize,
    max_batch_inputs: usize,
    /// (request, input index), oldest first.
    queue: VecDeque<(u64, usize)>,
    requests: HashMap<u64, Pending>,
    stats: Arc<EngineStats>,
    observer: Option<Arc<dyn crate::trace::StepObserver>>,
    step_count: u64,
}

impl EmbeddingCore {
    pub(crate) fn new(
        loaded: LoadedEncoder,
        config: &EngineConfig,
        stats: Arc<EngineStats>,
    ) -> Self {
        let limits = ModelLimits {
            vocab_size: loaded.info.vocab_size,
            max_model_len: loaded.info.max_model_len,
        };
        let ready = Ready {
            kind: ModelKind::Embed {
                dimensions: loaded.model.hidden_size(),
            },
            tokenizer: Arc::new(loaded.tokenizer),
            info: Arc::new(loaded.info),
            limits,
            cache: CacheConfig {
                block_size: config.block_size,
                num_blocks: 0,
                enable_prefix_caching: false,
            },
        };
        tracing::info!(
            max_batch_tokens = config.max_num_batched_tokens,
            max_batch_inputs = config.max_num_seqs,
            "embedding model: inputs packed per step up to the token budget"
        );
        Self {
            model: loaded.model,
            ready,
            max_batch_tokens: config.max_num_batched_tokens.max(1),
            max_batch_inputs: config.max_num_seqs.max(1),
            queue: VecDeque::new(),
            requests: HashMap::new(),
            stats,
            observer: config.observer.clone(),
            step_count: 0,
        }
    }

    /// What the handle needs to know about the loaded engine.
    pub(crate) fn ready(&self) -> Ready {
        self.ready.clone()
    }

    fn add(&mut self, id: u64, request: EmbedRequest, events: mpsc::UnboundedSender<EngineEvent>) {
        let (request_id, inputs) = request.into_parts();
        let prompt_tokens = inputs.iter().map(Vec::len).sum();
        self.stats
            .prompt_tokens_total
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        self.queue.extend((0..inputs.len()).map(|i| (id, i)));
        self.requests.insert(
            id,
            Pending {
                request_id,
                vectors: vec![None; inputs.len()],
                remaining: inputs.len(),
                inputs,
                events,
                prompt_tokens,
                arrived: Instant::now(),
                first_scheduled: None,
            },
        );
    }

    /// Take inputs from the front of the queue while they fit the budget (at least one).
    fn pack(&mut self) -> (EncoderBatch, Vec<(u64, usize)>) {
        let mut batch = EncoderBatch::default();
        let mut taken = Vec::new();
        while let Some(&(id, index)) = self.queue.front() {
            let Some(ids) = self.requests.get(&id).and_then(|r| r.inputs.get(index)) else {
                self.queue.pop_front(); // aborted
                continue;
            };
            let full = batch.token_ids.len() + ids.len() > self.max_batch_tokens
                || taken.len() >= self.max_batch_inputs;
            if !taken.is_empty() && full {
                break;
            }
            self.queue.pop_front();
            batch.push(ids);
            taken.push((id, index));
        }
        (batch, taken)
    }

    fn finish(&mut self, id: u64, now: Instant) {
        let Some(r) = self.requests.remove(&id) else {
            return;
        };
        let vectors: Vec<Vec<f32>> = r
            .vectors
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect();
        let _ = r.events.send(EngineEvent::Embeddings(vectors));
        let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
        let scheduled = r.first_scheduled.unwrap_or(r.arrived);
        let timings = RequestTimings {
            queue: secs(r.arrived, scheduled),
            prefill: secs(scheduled, now),
            decode: 0.0,
            time_to_first_token: secs(r.arrived, now),
            e2e: secs(r.arrived, now),
        };
        let _ = r.events.send(EngineEvent::Finished {
            usage: Usage {
                prompt_tokens: r.prompt_tokens,
                completion_tokens: 0,
                cached_tokens: 0,
            },
            timings,
        });
    }
}

impl Core for EmbeddingCore {
    fn has_work(&self) -> bool {
        !self.queue.is_empty()
    }

    fn handle(&mut self, msg: EngineMessage) {
        match msg {
            EngineMessage::Embed {
                id,
                request,
                events,
            } => {
                self.add(id, request, events);
            }
            EngineMessage::Generate { events, .. } => {
                let _ = events.send(EngineEvent::Error(EngineError::WrongModelKind(
                    "this is an embedding model; it does not generate text",
                )));
            }
            EngineMessage::Abort { id } => {
                // Its queued inputs are skipped when they come up.
                self.requests.remove(&id);
            }
            EngineMessage::Shutdown => {}
        }
    }

    fn step(&mut self) -> Result<(), EngineError> {
        let (batch, taken) = self.pack();
        if taken.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut request_ids: Vec<String> = Vec::new();
        for &(id, _) in &taken {
            if let Some(r) = self.requests.get_mut(&id) {
                r.first_scheduled.get_or_insert(started);
                if self.observer.is_some() {
                    request_ids.push(r.request_id.clone());
                }
            }
        }
        let vectors = match self.model.forward(&batch) {
            Ok(v) => v,
            Err(e) => {
                // A failing batch fails its requests, not the engine.
                tracing::error!("embedding forward pass failed: {e}");
                let error = EngineError::model(e);
                for &(id, _) in &taken {
                    if let Some(r) = self.requests.remove(&id) {
                        let _ = r.events.send(EngineEvent::Error(error.clone()));
                    }
                }
                return Ok(());
            }
        };
        let now = Instant::now();
        let mut done = Vec::new();
        for (&(id, index), vector) in taken.iter().zip(vectors) {
            let Some(r) = self.requests.get_mut(&id) else {
                continue;
            };
            if let Some(slot) = r.vectors.get_mut(index) {
                *slot = Some(vector);
                r.remaining -= 1;
            }
            if r.remaining == 0 {
                done.push(id);
            }
        }
        for id in done {
            self.finish(id, now);
        }
        self.stats.iterations_total.fetch_add(1, Ordering::Relaxed);
        if let Some(observer) = &self.observer {
            observer.on_step(&StepTrace {
                step: self.step_count,
                request_ids,
                num_prefill_tokens: batch.token_ids.len(),
                num_decode_tokens: 0,
                num_preempted: 0,
                execute_seconds: started.elapsed().as_secs_f64(),
            });
        }
        self.step_count += 1;
        Ok(())
    }

    fn publish_gauges(&self) {
        let s = &self.stats;
        s.num_running.store(0, Ordering::Relaxed);
        s.num_waiting
            .store(self.requests.len() as u64, Ordering::Relaxed);
        s.kv_blocks_used.store(0, Ordering::Relaxed);
    }

    fn fail_all(&mut self, error: &EngineError) {
        for (_, r) in self.requests.drain() {
            let _ = r.events.send(EngineEvent::Error(error.clone()));
        }
        self.queue.clear();
    }
}
