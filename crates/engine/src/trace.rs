//! A per-iteration record of what the scheduler put in the batch: tests assert on it
//! (continuous batching really batches) and the server turns it into metrics.

/// One engine iteration, as seen from outside.
#[derive(Debug, Clone, Default)]
pub struct StepTrace {
    pub step: u64,
    /// Caller request ids of the sequences in this batch (one entry per sequence).
    pub request_ids: Vec<String>,
    pub num_prefill_tokens: usize,
    pub num_decode_tokens: usize,
    /// Sequences preempted while scheduling this step.
    pub num_preempted: usize,
    /// Time spent in the forward pass and sampling, seconds.
    pub execute_seconds: f64,
}

/// Receives a [`StepTrace`] after every iteration, on the engine thread: keep it cheap.
pub trait StepObserver: Send + Sync {
    fn on_step(&self, trace: &StepTrace);
}
