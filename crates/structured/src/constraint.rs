//! One constrained sequence's matcher: masks a logits row, follows the sampled tokens, and says
//! when the constrained output is complete.

use llguidance::Matcher;

use crate::StructuredError;

/// The grammar state of one sequence. Cloning copies the state (an `n > 1` choice forked
/// before its first token starts from the same state).
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .field("error", &self.matcher.get_error())
            .finish()
    }
}

impl Constraint {
    pub(crate) fn new(matcher: Matcher) -> Self {
        Self { matcher }
    }

    /// Set every token the grammar does not allow next to -inf (end-of-sequence is allowed
    /// once the output is complete).
    pub fn mask_logits(&mut self, logits: &mut [f32]) -> Result<(), StructuredError> {
        let mask = self
            .matcher
            .compute_mask()
            .map_err(|e| StructuredError::Matcher(e.to_string()))?;
        if mask.is_zero() {
            return Err(StructuredError::Matcher(
                "no token can continue the output".into(),
            ));
        }
        for (i, l) in logits.iter_mut().enumerate() {
            if !mask.is_allowed(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Follow the sampled token.
    pub fn accept(&mut self, token: u32) -> Result<(), StructuredError> {
        self.matcher
            .consume_token(token)
            .map_err(|e| StructuredError::Matcher(e.to_string()))
    }

    /// The output is complete and nothing may follow (the sequence should stop).
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// The output so far is a complete match (end-of-sequence would be accepted).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }
}
