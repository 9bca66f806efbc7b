//! Speculative decoding: what `--speculative-config` asks for (vLLM's JSON), the proposers that
//! draft tokens after each step, and the per-sequence bookkeeping that switches speculation off
//! where it does not pay. Verification is the runner's (it samples at every drafted position
//! and keeps the drafts up to the first one the target would not have produced), so the output
//! is the target's own: token-identical under greedy and seeded sampling.

mod config;
mod draft_model;
mod ngram;

pub use config::{
    SpecConfigError, SpecMethod, SpeculativeConfig, DEFAULT_DISABLE_BY_BATCH_SIZE,
    MAX_SPECULATIVE_TOKENS,
};
pub use draft_model::{DraftModel, DraftModelError, DraftRequest};
pub use ngram::propose_ngram;

/// Drafting steps without acceptance before a sequence pauses speculation.
const PATIENCE: u32 = 2;
/// The longest pause, in steps, after repeated misses.
const MAX_PAUSE: u32 = 64;

/// One sequence's speculation record: drafts that find nothing accepted pause it, for a number
/// of steps that doubles with every further miss (reset by the first accepted draft), so
/// non-repetitive text costs at most an occasional verification.
#[derive(Debug, Clone, Default)]
pub struct Acceptance {
    misses: u32,
    pause: u32,
    paused_for: u32,
}

impl Acceptance {
    /// Whether to draft this step (counts down a pause).
    pub fn should_draft(&mut self) -> bool {
        if self.paused_for > 0 {
            self.paused_for -= 1;
            return false;
        }
        true
    }

    /// Record a verified draft.
    pub fn record(&mut self, num_draft: usize, num_accepted: usize) {
        if num_draft == 0 {
            return;
        }
        if num_accepted > 0 {
            self.misses = 0;
            self.pause = 0;
            return;
        }
        self.misses += 1;
        if self.misses >= PATIENCE {
            self.pause = (self.pause * 2).clamp(4, MAX_PAUSE);
            self.paused_for = self.pause;
            self.misses = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misses_pause_drafting_longer_each_time_and_a_hit_resets() {
        let mut a = Acceptance::default();
        assert!(a.should_draft());
        a.record(3, 0);
        assert!(a.should_draft(), "one miss is tolerated");
        a.record(3, 0);
        let paused = (0..4).filter(|_| !a.should_draft()).count();
        assert_eq!(paused, 4);
        assert!(a.should_draft());
        a.record(3, 0);
        a.record(3, 0);
        let paused = (0..8).filter(|_| !a.should_draft()).count();
        assert_eq!(paused, 8, "the pause doubles");
        a.record(3, 2);
        a.record(3, 0);
        assert!(a.should_draft(), "an accepted draft resets the count");
        a.record(0, 0);
        assert!(a.should_draft(), "no draft, no record");
    }
}
