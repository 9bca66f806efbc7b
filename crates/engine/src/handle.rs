//! The cheap, clonable handle front ends use to talk to the engine thread. Requests go over a
//! crossbeam channel; each request gets its own tokio channel back, so an async task can await
//! tokens without ever blocking the runtime, and a plain thread can use `blocking_recv`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use spindle_model::{ModelInfo, TokenizerBundle};
use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::sync::Notify;

use crate::api::{
    CacheConfig, EmbedRequest, EngineError, EngineEvent, GenerateRequest, ModelKind, ModelLimits,
};
use crate::scheduler::SchedulingPolicy;
use crate::stats::EngineStats;

/// Messages the engine thread receives. A request ends early only through `Abort`, which its
/// [`RequestStream`] sends when dropped or aborted.
pub(crate) enum EngineMessage {
    Generate {
        id: u64,
        request: GenerateRequest,
        events: mpsc::UnboundedSender<EngineEvent>,
    },
    Embed {
        id: u64,
        request: EmbedRequest,
        events: mpsc::UnboundedSender<EngineEvent>,
    },
    Abort {
        id: u64,
    },
    Shutdown,
}

/// Liveness shared between the engine thread and its handles: the thread bumps the heartbeat on
/// every iteration and on every idle wake-up, so `/health` can tell "alive and making progress"
/// from "thread exists but is stuck".
#[derive(Debug)]
pub(crate) struct Liveness {
    started: Instant,
    heartbeat_ms: AtomicU64,
    dead: AtomicBool,
    death_reason: std::sync::Mutex<Option<String>>,
    /// Woken when the engine is marked dead, so waiting callers learn of a death the engine
    /// thread cannot report itself (a hang declared by the watchdog).
    died: Notify,
}

impl Liveness {
    pub(crate) fn new() -> Self {
        Self {
            started: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            dead: AtomicBool::new(false),
            death_reason: std::sync::Mutex::new(None),
            died: Notify::new(),
        }
    }

    pub(crate) fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.heartbeat_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn mark_dead(&self, reason: String) {
        if let Ok(mut slot) = self.death_reason.lock() {
            slot.get_or_insert(reason);
        }
        self.dead.store(true, Ordering::SeqCst);
        self.died.notify_waiters();
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Resolves once the engine is marked dead.
    async fn wait_dead(&self) {
        loop {
            let notified = self.died.notified();
            let mut notified = std::pin::pin!(notified);
            // Register before checking the flag, so a death in between is not missed.
            notified.as_mut().enable();
            if self.is_dead() {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn since_last_beat(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed)))
    }

    pub(crate) fn death_reason(&self) -> String {
        self.death_reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_else(|| "engine thread exited".to_string())
    }
}

/// A front end's view of a running engine. Clone it freely.
#[derive(Clone)]
pub struct EngineHandle {
    pub(crate) kind: ModelKind,
    pub(crate) sender: Sender<EngineMessage>,
    pub(crate) next_id: Arc<AtomicU64>,
    pub(crate) liveness: Arc<Liveness>,
    pub(crate) stats: Arc<EngineStats>,
    pub(crate) tokenizer: Arc<TokenizerBundle>,
    pub(crate) model_info: Arc<ModelInfo>,
    pub(crate) limits: ModelLimits,
    pub(crate) cache: CacheConfig,
    pub(crate) max_waiting_requests: usize,
    pub(crate) scheduling_policy: SchedulingPolicy,
    /// The engine is idle-blocked at most this long between heartbeats.
    pub(crate) heartbeat_interval: Duration,
}

impl EngineHandle {
    /// Submit a request. Fails fast when the engine is dead or its waiting queue is full; the
    /// returned stream yields deltas, then `Finished` or `Error`. Dropping the stream aborts the
    /// request and frees its KV blocks on the engine's next iteration.
    pub fn generate(&self, request: GenerateRequest) -> Result<RequestStream, EngineError> {
        let background = request.urgency().background;
        self.submit(background, |id, events| EngineMessage::Generate {
            id,
            request,
            events,
        })
    }

    /// Submit an embedding request (embedding models only). The stream yields one
    /// `Embeddings` event, then `Finished` (or `Error`); dropping it aborts the request.
    pub fn embed(&self, request: EmbedRequest) -> Result<RequestStream, EngineError> {
        self.submit(false, |id, events| EngineMessage::Embed {
            id,
            request,
            events,
        })
    }

    /// Hand a request to the engine thread. `--max-waiting-requests` applies to interactive
    /// requests and counts only interactive waiting ones: background work is bounded by its
    /// feeder and must never cause a 429.
    fn submit(
        &self,
        background: bool,
        message: impl FnOnce(u64, mpsc::UnboundedSender<EngineEvent>) -> EngineMessage,
    ) -> Result<RequestStream, EngineError> {
        if self.liveness.dead.load(Ordering::SeqCst) {
            return Err(EngineError::EngineDead(self.liveness.death_reason()));
        }
        if self.max_waiting_requests > 0 && !background {
            let waiting = self
                .stats
                .num_waiting_total()
                .saturating_sub(self.stats.num_waiting_background.load(Ordering::Relaxed) as usize);
            if waiting >= self.max_waiting_requests {
                return Err(EngineError::QueueFull(waiting));
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.stats.submitted.fetch_add(1, Ordering::Relaxed);
        self.sender
            .send(message(id, tx))
            .map_err(|_| EngineError::EngineDead(self.liveness.death_reason()))?;
        Ok(RequestStream {
            id,
            events: rx,
            sender: self.sender.clone(),
            liveness: self.liveness.clone(),
            finished: false,
        })
    }

    /// Whether the model generates text or computes embeddings.
    pub fn model_kind(&self) -> ModelKind {
        self.kind
    }

    /// True while the engine thread runs and has shown progress recently (`stall_timeout`).
    pub fn is_healthy(&self, stall_timeout: Duration) -> bool {
        !self.liveness.dead.load(Ordering::SeqCst)
            && self.liveness.since_last_beat() <= stall_timeout.max(self.heartbeat_interval * 2)
    }

    /// True once the engine thread has stopped for good (error, panic, hang or shutdown).
    pub fn is_dead(&self) -> bool {
        self.liveness.is_dead()
    }

    /// Why the engine stopped, once it has (for logs and the process exit message).
    pub fn death_reason(&self) -> Option<String> {
        self.is_dead().then(|| self.liveness.death_reason())
    }

    /// Resolves once the engine is dead, so a server can stop and exit non-zero (an
    /// orchestrator then restarts it) instead of lingering with a broken engine.
    pub async fn wait_dead(&self) {
        self.liveness.wait_dead().await
    }

    /// Live counters and gauges the metrics endpoint exports.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The model's tokenizer, chat template and special tokens.
    pub fn tokenizer(&self) -> &Arc<TokenizerBundle> {
        &self.tokenizer
    }

    /// What was loaded: architecture, context length, vocabulary, dtype, device.
    pub fn model_info(&self) -> &ModelInfo {
        &self.model_info
    }

    /// What every request must fit: build [`GenerateRequest`]s against these.
    pub fn limits(&self) -> ModelLimits {
        self.limits
    }

    /// The scheduling policy in use (whether `priority` means anything).
    pub fn scheduling_policy(&self) -> SchedulingPolicy {
        self.scheduling_policy
    }

    /// The KV-cache settings in use (block size, block count after sizing, prefix caching).
    pub fn cache_config(&self) -> CacheConfig {
        self.cache
    }

    /// Ask the engine thread to stop after aborting what is in flight.
    pub fn shutdown(&self) {
        let _ = self.sender.send(EngineMessage::Shutdown);
    }
}

/// The receiving end of one request. Dropping it before `Finished` aborts the request.
pub struct RequestStream {
    id: u64,
    events: mpsc::UnboundedReceiver<EngineEvent>,
    sender: Sender<EngineMessage>,
    liveness: Arc<Liveness>,
    finished: bool,
}

impl RequestStream {
    /// Next event, awaiting it; `None` only if the engine vanished without a final event.
    /// Once the engine is dead and nothing more is queued, this yields `Error(EngineDead)` even
    /// if the engine thread could not send it (a hung engine declared dead by the watchdog).
    /// Cancel-safe: dropping the future loses no event.
    pub async fn recv(&mut self) -> Option<EngineEvent> {
        let event = loop {
            match self.events.try_recv() {
                Ok(event) => break Some(event),
                Err(TryRecvError::Disconnected) => break None,
                Err(TryRecvError::Empty) => {}
            }
            // Register for the death notice before checking the flag, so none is missed.
            let died = self.liveness.died.notified();
            let mut died = std::pin::pin!(died);
            died.as_mut().enable();
            if self.liveness.is_dead() {
                // Events sent before the death are delivered first.
                if let Ok(event) = self.events.try_recv() {
                    break Some(event);
                }
                break Some(EngineEvent::Error(EngineError::EngineDead(
                    self.liveness.death_reason(),
                )));
            }
            tokio::select! {
                biased;
                event = self.events.recv() => break event,
                _ = died.as_mut() => continue,
            }
        };
        self.note(&event);
        event
    }

    /// Same as `recv` for callers outside an async runtime (`spindle generate`, tests).
    pub fn blocking_recv(&mut self) -> Option<EngineEvent> {
        let event = self.events.blocking_recv();
        self.note(&event);
        event
    }

    /// Abort explicitly (dropping the stream does the same).
    pub fn abort(&mut self) {
        if !self.finished {
            self.finished = true;
            let _ = self.sender.send(EngineMessage::Abort { id: self.id });
        }
    }

    fn note(&mut self, event: &Option<EngineEvent>) {
        if matches!(
            event,
            None | Some(EngineEvent::Finished { .. }) | Some(EngineEvent::Error(_))
        ) {
            self.finished = true;
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.abort();
    }
}
