//! Stops decided by token ids alone: EOS, stop token ids (both gated by `min_tokens`) and the
//! length bound. The scheduler applies them when it appends tokens, so a sequence's blocks are
//! freed in the step that ends it; stop strings, which need text, are the output processor's.

use crate::api::{FinishReason, SamplingParams, StopReason};

/// Why a sequence ends, as reported in its last delta.
pub type Finish = (FinishReason, Option<StopReason>);

/// A sequence's token-level stop rules (from its request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStops {
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<u32>,
    pub min_tokens: usize,
    /// Most tokens the sequence generates (resolved by `GenerateRequest::new`).
    pub max_tokens: usize,
}

impl Default for TokenStops {
    /// No stop but EOS and the model's context.
    fn default() -> Self {
        Self {
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            min_tokens: 0,
            max_tokens: usize::MAX,
        }
    }
}

impl TokenStops {
    pub fn new(params: &SamplingParams, max_tokens: usize) -> Self {
        Self {
            ignore_eos: params.ignore_eos,
            stop_token_ids: params.stop_token_ids.clone(),
            min_tokens: params.min_tokens,
            max_tokens,
        }
    }

    /// Whether `token` ends the sequence whatever `min_tokens` says (the sampler masks EOS and
    /// stop ids before `min_tokens`, so such a token is never followed by another in a step).
    pub fn is_stop_token(&self, token: u32, eos_ids: &[u32]) -> bool {
        (!self.ignore_eos && eos_ids.contains(&token)) || self.stop_token_ids.contains(&token)
    }
}

/// Whether `min_tokens` lets a sequence stop once it has `num_output` tokens: EOS is masked while
/// fewer than `min_tokens` tokens precede it, so the first token that may end a sequence is
/// number `min_tokens + 1` (vLLM's rule, for stop strings too).
pub fn min_tokens_passed(num_output: usize, min_tokens: usize) -> bool {
    min_tokens == 0 || num_output > min_tokens
}

/// Stop decided by the token alone: EOS (unless `ignore_eos`) or a stop token id, once
/// `min_tokens` is passed. EOS reports no stop reason, a stop token id reports itself.
pub fn stop_on_token(
    token: u32,
    num_output: usize,
    stops: &TokenStops,
    eos_ids: &[u32],
) -> Option<Finish> {
    let is_eos = !stops.ignore_eos && eos_ids.contains(&token);
    let is_stop_id = stops.stop_token_ids.contains(&token);
    if !(is_eos || is_stop_id) || !min_tokens_passed(num_output, stops.min_tokens) {
        return None;
    }
    let reason = (is_stop_id && !is_eos).then_some(StopReason::TokenId(token));
    Some((FinishReason::Stop, reason))
}

/// Whether a sequence of `seq_len` tokens with `num_output` generated is at its length bound.
pub fn stop_on_length(
    num_output: usize,
    seq_len: usize,
    max_tokens: usize,
    max_model_len: usize,
) -> bool {
    num_output >= max_tokens || seq_len >= max_model_len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_and_stop_ids_wait_for_min_tokens() {
        let stops = TokenStops {
            min_tokens: 2,
            stop_token_ids: vec![9],
            ..TokenStops::default()
        };
        let eos = [2];
        assert_eq!(stop_on_token(2, 2, &stops, &eos), None);
        assert_eq!(stop_on_token(9, 2, &stops, &eos), None);
        assert_eq!(
            stop_on_token(2, 3, &stops, &eos),
            Some((FinishReason::Stop, None))
        );
        assert_eq!(
            stop_on_token(9, 3, &stops, &eos),
            Some((FinishReason::Stop, Some(StopReason::TokenId(9))))
        );
        assert_eq!(stop_on_token(5, 3, &stops, &eos), None);
    }

    #[test]
    fn ignore_eos_keeps_stop_ids() {
        let stops = TokenStops {
            ignore_eos: true,
            stop_token_ids: vec![2],
            ..TokenStops::default()
        };
        // An EOS id listed as a stop id still stops, reported as the stop id.
        assert_eq!(
            stop_on_token(2, 1, &stops, &[2]),
            Some((FinishReason::Stop, Some(StopReason::TokenId(2))))
        );
        let ignore = TokenStops {
            ignore_eos: true,
            ..TokenStops::default()
        };
        assert_eq!(stop_on_token(3, 1, &ignore, &[3]), None);
        assert!(!ignore.is_stop_token(3, &[3]) && stops.is_stop_token(2, &[]));
    }

    #[test]
    fn length_bound_is_max_tokens_or_the_context() {
        assert!(!stop_on_length(3, 10, 4, 100));
        assert!(stop_on_length(4, 11, 4, 100));
        assert!(stop_on_length(1, 100, 50, 100));
        assert!(min_tokens_passed(1, 0) && !min_tokens_passed(3, 3) && min_tokens_passed(4, 3));
    }
}
