//! The engine thread: owns the model and the paged KV cache and loops
//! `step() = schedule -> run the model -> process outputs` while there is work, blocking on its channel (with a
//! heartbeat timeout) when there is none. If the loop fails or panics, every caller in flight
//! gets an error and the handle reports the engine dead.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use spindle_model::Loaded;

use crate::api::{EngineError, EngineEvent};
use crate::config::EngineConfig;
use crate::core::{Core, Ready};
use crate::embedding::EmbeddingCore;
use crate::generation::GenerationCore;
use crate::handle::{EngineHandle, EngineMessage, Liveness};
use crate::stats::EngineStats;

/// Entry point: `Engine::spawn(config)` loads the model on a new thread and returns its handle.
pub struct Engine;

impl Engine {
    /// Start the engine thread, load the model there, and return a handle once it is ready.
    /// Load errors (missing file, bad config, cache too small) come back here.
    pub fn spawn(config: EngineConfig) -> Result<EngineHandle, EngineError> {
        let (sender, receiver) = crossbeam_channel::unbounded();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Ready, EngineError>>();
        let stats = Arc::new(EngineStats::default());
        let liveness = Arc::new(Liveness::new());
        let thread_stats = stats.clone();
        let loop_stats = stats.clone();
        let thread_liveness = liveness.clone();
        let thread_config = config.clone();
        let spawned = std::thread::Builder::new()
            .name("spindle-engine".into())
            .spawn(move || {
                let heartbeat = thread_config.heartbeat_interval;
                let liveness = thread_liveness.clone();
                let started = spindle_model::load_any(&thread_config.model)
                    .map_err(EngineError::load)
                    .and_then(|loaded| match loaded {
                        Loaded::Decoder(model) => {
                            GenerationCore::new(model, thread_config, thread_stats, liveness)
                                .map(|core| (core.ready(), CoreKind::Generation(Box::new(core))))
                        }
                        Loaded::Encoder(model) => {
                            let core = EmbeddingCore::new(model, &thread_config, thread_stats);
                            Ok((core.ready(), CoreKind::Embedding(core)))
                        }
                    });
                let (ready, core) = match started {
                    Ok(started) => started,
                    Err(e) => {
                        thread_liveness.mark_dead(e.to_string());
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                // Beat before reporting ready: loading took a while, and the watchdog starts now.
                thread_liveness.beat();
                let _ = ready_tx.send(Ok(ready));
                match core {
                    CoreKind::Generation(core) => {
                        EngineLoop::new(*core, receiver, loop_stats, thread_liveness, heartbeat)
                            .run_until_exit()
                    }
                    CoreKind::Embedding(core) => {
                        EngineLoop::new(core, receiver, loop_stats, thread_liveness, heartbeat)
                            .run_until_exit()
                    }
                }
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
            kind: ready.kind,
            tokenizer: ready.tokenizer,
            model_info: ready.info,
            limits: ready.limits,
            cache: ready.cache,
            max_waiting_requests: config.max_waiting_requests,
            scheduling_policy: config.scheduling_policy,
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

/// The two cores the engine thread can run, chosen by what the model is.
enum CoreKind {
    Generation(Box<GenerationCore>),
    Embedding(EmbeddingCore),
}

/// Whether the loop continues after a message.
#[derive(PartialEq)]
enum Flow {
    Continue,
    Shutdown,
}

/// The engine thread's loop around a core: take messages, beat, step while there is work, and
/// fail whatever is in flight when it ends.
struct EngineLoop<C: Core> {
    core: C,
    receiver: Receiver<EngineMessage>,
    stats: Arc<EngineStats>,
    liveness: Arc<Liveness>,
    heartbeat_interval: Duration,
}

impl<C: Core> EngineLoop<C> {
    fn new(
        core: C,
        receiver: Receiver<EngineMessage>,
        stats: Arc<EngineStats>,
        liveness: Arc<Liveness>,
        heartbeat_interval: Duration,
    ) -> Self {
        Self {
            core,
            receiver,
            stats,
            liveness,
            heartbeat_interval,
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
        let error = EngineError::EngineDead(reason);
        self.core.fail_all(&error);
        while let Ok(msg) = self.receiver.try_recv() {
            match msg {
                EngineMessage::Generate { events, .. } | EngineMessage::Embed { events, .. } => {
                    let _ = events.send(EngineEvent::Error(error.clone()));
                }
                EngineMessage::Abort { .. } | EngineMessage::Shutdown => {}
            }
        }
        self.core.publish_gauges();
    }

    fn run(&mut self) -> Result<(), EngineError> {
        loop {
            if self.liveness.is_dead() {
                // The watchdog gave up on us while we were stuck: callers already got errors.
                return Err(EngineError::EngineDead(self.liveness.death_reason()));
            }
            self.liveness.beat();
            if self.drain_messages() == Flow::Shutdown {
                return Ok(());
            }
            if self.core.has_work() {
                // Run the whole step on a rayon worker: the forward pass makes hundreds of
                // small parallel calls, and from a worker each is a cheap local fork instead of
                // a cross-thread injection with a sleep and a wake-up (measured: half the
                // single-stream decode time went to those round trips).
                let core = &mut self.core;
                rayon::scope(|_| core.step())?;
            }
            self.core.publish_gauges();
        }
    }

    /// Take every pending message; block (up to a heartbeat) for one when there is no work.
    fn drain_messages(&mut self) -> Flow {
        if !self.core.has_work() {
            match self.receiver.recv_timeout(self.heartbeat_interval) {
                Ok(msg) => {
                    if self.handle(msg) == Flow::Shutdown {
                        return Flow::Shutdown;
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Flow::Continue,
                Err(RecvTimeoutError::Disconnected) => return Flow::Shutdown,
            }
        }
        loop {
            match self.receiver.try_recv() {
                Ok(msg) => {
                    if self.handle(msg) == Flow::Shutdown {
                        return Flow::Shutdown;
                    }
                }
                Err(TryRecvError::Empty) => return Flow::Continue,
                Err(TryRecvError::Disconnected) if !self.core.has_work() => return Flow::Shutdown,
                Err(TryRecvError::Disconnected) => return Flow::Continue,
            }
        }
    }

    fn handle(&mut self, msg: EngineMessage) -> Flow {
        match msg {
            EngineMessage::Shutdown => return Flow::Shutdown,
            EngineMessage::Generate { .. } | EngineMessage::Embed { .. } => {
                // Seen by the engine: no longer counted as waiting in the channel.
                self.stats.received.fetch_add(1, Ordering::Relaxed);
            }
            EngineMessage::Abort { .. } => {}
        }
        self.core.handle(msg);
        Flow::Continue
    }
}
