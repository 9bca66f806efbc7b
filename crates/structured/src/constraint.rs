//! One constrained sequence's matcher: masks a logits row, follows the sampled tokens, and says
//! when the constrained output is complete. A reasoning model's constraint can wait behind a
//! gate: every token is free until the output contains the end-of-thinking tokens, and the
//! grammar applies from there on (as vLLM applies structured outputs after the reasoning).

use llguidance::Matcher;
use toktrie::TokEnv;

use crate::StructuredError;

/// The grammar state of one sequence. Cloning copies the state (an `n > 1` choice forked
/// before its first token starts from the same state).
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    gate: Option<Gate>,
}

/// Text the output must contain before the grammar applies, matched on the tokens' bytes (so
/// it is found however the tokenizer merged it with its neighbours), and the output's last
/// bytes that may begin it.
#[derive(Clone)]
struct Gate {
    marker: Vec<u8>,
    recent: Vec<u8>,
    env: TokEnv,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .field("gated", &self.gate.is_some())
            .field("error", &self.matcher.get_error())
            .finish()
    }
}

impl Constraint {
    pub(crate) fn new(matcher: Matcher) -> Self {
        Self {
            matcher,
            gate: None,
        }
    }

    /// This constraint applied only once the output contains `marker` (e.g. `</think>`):
    /// until then every token is allowed. The grammar starts at the token after the one that
    /// completes the marker. `env` gives the tokens' bytes (the compiler's).
    pub(crate) fn gated(mut self, marker: &str, env: TokEnv) -> Self {
        self.gate = (!marker.is_empty()).then(|| Gate {
            marker: marker.as_bytes().to_vec(),
            recent: Vec::new(),
            env,
        });
        self
    }

    /// Set every token the grammar does not allow next to -inf (end-of-sequence is allowed
    /// once the output is complete).
    pub fn mask_logits(&mut self, logits: &mut [f32]) -> Result<(), StructuredError> {
        if self.gate.is_some() {
            return Ok(());
        }
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
        if let Some(gate) = self.gate.as_mut() {
            let bytes = gate.env.tok_trie().decode_ext(&[token], true);
            gate.recent.extend_from_slice(&bytes);
            let found = gate
                .recent
                .windows(gate.marker.len())
                .any(|w| w == gate.marker.as_slice());
            if found {
                self.gate = None;
            } else {
                let keep = gate.marker.len() - 1;
                let cut = gate.recent.len().saturating_sub(keep);
                gate.recent.drain(..cut);
            }
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| StructuredError::Matcher(e.to_string()))
    }

    /// The output is complete and nothing may follow (the sequence should stop).
    pub fn is_finished(&self) -> bool {
        self.gate.is_none() && self.matcher.is_stopped()
    }

    /// The output so far is a complete match (end-of-sequence would be accepted).
    pub fn is_accepting(&mut self) -> bool {
        self.gate.is_none() && self.matcher.is_accepting().unwrap_or(false)
    }
}
