//! Engine settings: the scheduler and KV-cache knobs vLLM users know, plus the model to load.

use std::sync::Arc;
use std::time::Duration;

use spindle_model::LoadOptions;

use crate::trace::StepObserver;

/// Default of [`EngineConfig::background_share`] (measured in benches/RESULTS.md, issue 16).
pub const DEFAULT_BACKGROUND_SHARE: f64 = 0.25;

/// How the engine thread is set up. Defaults follow `vllm serve`.
#[derive(Clone)]
pub struct EngineConfig {
    pub model: LoadOptions,
    /// Most sequences in one batch (`--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Token budget of one iteration, prefill and decode together (`--max-num-batched-tokens`).
    pub max_num_batched_tokens: usize,
    /// Order of service (`--scheduling-policy fcfs|priority`); background work always goes last.
    pub scheduling_policy: crate::scheduler::SchedulingPolicy,
    /// Background (batch-job) tokens allowed per interactive token in a step that runs both
    /// (`--background-share`; at least one token): every background token makes that step, and
    /// so every interactive token in it, slower, so with a step cost roughly linear in its tokens
    /// interactive latency grows by at most about this fraction. With no interactive work,
    /// background work gets the whole budget.
    pub background_share: f64,
    /// Tokens per KV block (`--block-size`).
    pub block_size: usize,
    /// KV-cache size in bytes on CPU (`--kv-cache-memory`); `None` picks a default.
    pub kv_cache_memory_bytes: Option<u64>,
    /// Fraction of GPU memory for weights + activations + KV (`--gpu-memory-utilization`).
    pub gpu_memory_utilization: f32,
    /// Explicit number of KV blocks, overriding the memory-based sizing.
    pub num_blocks_override: Option<usize>,
    /// What the KV cache stores (`--kv-cache-dtype`): the model's dtype, or bf16/f16 on the CPU.
    pub kv_cache_dtype: spindle_model::KvCacheDtypeChoice,
    pub enable_prefix_caching: bool,
    /// Global seed for requests that bring none.
    pub seed: u64,
    /// New requests are refused (`QueueFull`) while this many wait; 0 means unbounded.
    pub max_waiting_requests: usize,
    /// Where each step's KV-cache events go (`--kv-events-config`); `None`: not recorded.
    pub kv_event_sink: Option<Arc<dyn crate::kv_events::KvEventSink>>,
    /// Seed of the block hashes in KV events (vLLM's `PYTHONHASHSEED`); `None`: random, so
    /// only the events themselves reveal them.
    pub kv_hash_seed: Option<String>,
    /// Optional per-step callback (metrics, tests' traces).
    pub observer: Option<Arc<dyn StepObserver>>,
    /// The engine wakes at least this often while idle, to refresh its heartbeat.
    pub heartbeat_interval: Duration,
    /// A watchdog declares the engine dead once its heartbeat is older than this (a hang counts
    /// as death: callers get errors and the server can exit). `None`: no watchdog.
    pub stall_timeout: Option<Duration>,
    /// Speculative decoding (`--speculative-config`); `None`: off.
    pub speculative: Option<crate::spec::SpeculativeConfig>,
    /// Test-only fault injection, so tests can prove engine death and hangs are handled.
    /// `None` in normal operation.
    pub fault_injection: Option<FaultInjection>,
}

/// A fault the engine thread inflicts on itself when a request whose prompt contains `marker`
/// arrives. It exists so the failure paths (panic, error, hang) can be tested end to end; set it
/// through [`EngineConfig::fault_injection`] or, for `spindle serve`, the
/// [`FaultInjection::ENV_VAR`] environment variable (`panic:<marker>`, `error:<marker>` or
/// `stall:<marker>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultInjection {
    /// The next engine step panics.
    Panic {
        /// Text that arms the fault when it appears in a prompt.
        marker: String,
    },
    /// The next engine step returns an error, ending the engine loop.
    Error {
        /// Text that arms the fault when it appears in a prompt.
        marker: String,
    },
    /// The next engine step hangs (no heartbeat) until the watchdog declares the engine dead.
    Stall {
        /// Text that arms the fault when it appears in a prompt.
        marker: String,
    },
}

/// A fault-injection spec that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid fault injection `{0}`: expected panic:<marker>, error:<marker> or stall:<marker>")]
pub struct FaultSpecError(pub String);

impl FaultInjection {
    /// The environment variable `spindle serve` reads once at start-up.
    pub const ENV_VAR: &'static str = "SPINDLE_FAULT_INJECT";

    /// Parse `panic:<marker>`, `error:<marker>` or `stall:<marker>` (the marker is non-empty).
    pub fn parse(spec: &str) -> Result<Self, FaultSpecError> {
        let bad = || FaultSpecError(spec.to_string());
        let (kind, marker) = spec.split_once(':').ok_or_else(bad)?;
        if marker.is_empty() {
            return Err(bad());
        }
        let marker = marker.to_string();
        match kind {
            "panic" => Ok(Self::Panic { marker }),
            "error" => Ok(Self::Error { marker }),
            "stall" => Ok(Self::Stall { marker }),
            _ => Err(bad()),
        }
    }

    /// Read [`Self::ENV_VAR`]; unset or empty means no fault.
    pub fn from_env() -> Result<Option<Self>, FaultSpecError> {
        match std::env::var(Self::ENV_VAR) {
            Ok(spec) if !spec.is_empty() => Self::parse(&spec).map(Some),
            _ => Ok(None),
        }
    }

    /// The text that arms this fault.
    pub fn marker(&self) -> &str {
        match self {
            Self::Panic { marker } | Self::Error { marker } | Self::Stall { marker } => marker,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            model: LoadOptions::default(),
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            scheduling_policy: Default::default(),
            background_share: DEFAULT_BACKGROUND_SHARE,
            block_size: 16,
            kv_cache_memory_bytes: None,
            gpu_memory_utilization: 0.9,
            num_blocks_override: None,
            kv_cache_dtype: spindle_model::KvCacheDtypeChoice::Auto,
            enable_prefix_caching: true,
            seed: 0,
            max_waiting_requests: 0,
            kv_event_sink: None,
            kv_hash_seed: None,
            observer: None,
            heartbeat_interval: Duration::from_millis(250),
            stall_timeout: None,
            speculative: None,
            fault_injection: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse() {
        assert_eq!(
            FaultInjection::parse("panic:XYZ").unwrap(),
            FaultInjection::Panic {
                marker: "XYZ".into()
            }
        );
        assert_eq!(FaultInjection::parse("stall:a:b").unwrap().marker(), "a:b");
        assert!(matches!(
            FaultInjection::parse("error:e"),
            Ok(FaultInjection::Error { .. })
        ));
        for bad in ["", "panic", "panic:", "boom:x"] {
            assert!(FaultInjection::parse(bad).is_err(), "{bad}");
        }
    }
}
