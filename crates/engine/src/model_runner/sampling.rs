//! The runner's sampling: each sequence's sampling state (its request's settings, private RNG
//! and structured-output constraint) and the sampling of a step's rows. A sequence with `k`
//! draft tokens samples at each of its `k + 1` rows in order, as if it decoded them one by one,
//! and keeps the drafts up to the first the sampled token disagrees with, plus that token: the
//! result is the target's own output (identical under greedy and seeded sampling: one RNG draw
//! per kept token, as without drafts) and a draft-free run's distribution at every position.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use spindle_structured::Constraint;

use crate::api::{EngineError, SamplingParams, StepLogprobs};
use crate::sampler::{sample_token, SequenceRng};
use crate::scheduler::{Scheduler, SeqId};
use crate::spec::Acceptance;
use crate::step_output::SampledSeq;
use crate::token_stop::TokenStops;

use super::SampleRows;

/// What one sequence samples with.
struct SeqSampling {
    params: Arc<SamplingParams>,
    rng: SequenceRng,
    /// Masks its rows and follows its tokens.
    constraint: Option<Constraint>,
    acceptance: Acceptance,
}

/// Every live sequence's sampling state.
pub(super) struct Sampling {
    seqs: HashMap<SeqId, SeqSampling>,
    /// Draws the fallback seed of each unseeded request.
    seed_rng: rand::rngs::StdRng,
    eos_ids: Vec<u32>,
}

/// One sequence's share of a step: its rows (the first and one per draft) and its drafts.
struct Work<'a> {
    id: SeqId,
    rows: Vec<&'a [f32]>,
    draft: &'a [u32],
    prompt_ids: &'a [u32],
    output_ids: &'a [u32],
    stops: &'a TokenStops,
}

impl Sampling {
    pub(super) fn new(seed: u64, eos_ids: Vec<u32>) -> Self {
        Self {
            seqs: HashMap::new(),
            seed_rng: rand::rngs::StdRng::seed_from_u64(seed),
            eos_ids,
        }
    }

    /// Register a request's choices (in order: choice `i` seeds its RNG with `seed + i`).
    pub(super) fn add_request(
        &mut self,
        seqs: &[SeqId],
        params: &SamplingParams,
        constraint: Option<Constraint>,
    ) {
        let fallback_seed: u64 = self.seed_rng.random();
        let params = Arc::new(params.clone());
        for (choice, &id) in seqs.iter().enumerate() {
            self.seqs.insert(
                id,
                SeqSampling {
                    params: params.clone(),
                    rng: SequenceRng::new(params.seed, choice, fallback_seed),
                    constraint: constraint.clone(),
                    acceptance: Acceptance::default(),
                },
            );
        }
    }

    pub(super) fn remove(&mut self, id: SeqId) {
        self.seqs.remove(&id);
    }

    pub(super) fn params(&self, id: SeqId) -> Option<&SamplingParams> {
        self.seqs.get(&id).map(|s| s.params.as_ref())
    }

    /// Whether `token` ends a sequence with `stops` (its last token then needs no draft).
    pub(super) fn is_stop_token(&self, token: u32, stops: &TokenStops) -> bool {
        stops.is_stop_token(token, &self.eos_ids)
    }

    /// Record a sequence's verified draft and say whether it drafts again now.
    pub(super) fn should_draft(&mut self, id: SeqId, num_draft: usize, accepted: usize) -> bool {
        self.seqs.get_mut(&id).is_some_and(|s| {
            s.acceptance.record(num_draft, accepted);
            s.acceptance.should_draft()
        })
    }

    /// Sample every sequence of `plan` (and the choices `forked` from them, from their parent's
    /// first row), in parallel across sequences. Results are in plan order, each parent's
    /// children after it; failures (constraint errors, unusable rows) come apart.
    pub(super) fn sample(
        &mut self,
        plan: &[SampleRows],
        forked: &[(SeqId, SeqId)],
        rows: &[Vec<f32>],
        scheduler: &Scheduler,
    ) -> (Vec<SampledSeq>, Vec<(SeqId, EngineError)>) {
        let mut work = Vec::with_capacity(plan.len() + forked.len());
        for p in plan {
            let children = forked.iter().filter(|f| f.0 == p.seq).map(|f| f.1);
            for id in std::iter::once(p.seq).chain(children) {
                let Some(seq) = scheduler.seq(id) else {
                    continue;
                };
                let num_draft = if id == p.seq { p.num_draft } else { 0 };
                let rows: Option<Vec<&[f32]>> = (p.first_row..=p.first_row + num_draft)
                    .map(|r| rows.get(r).map(Vec::as_slice))
                    .collect();
                let (Some(rows), Some(draft)) = (rows, seq.draft().get(..num_draft)) else {
                    continue;
                };
                work.push(Work {
                    id,
                    rows,
                    draft,
                    prompt_ids: seq.prompt_ids(),
                    output_ids: seq.output_ids(),
                    stops: seq.stops(),
                });
            }
        }
        // Take the states out so each sequence is sampled on its own thread.
        let mut states: Vec<Option<SeqSampling>> =
            work.iter().map(|w| self.seqs.remove(&w.id)).collect();
        let eos = &self.eos_ids;
        let run = |(w, state): (&Work<'_>, &mut Option<SeqSampling>)| {
            state.as_mut().map(|s| sample_seq(w, s, eos))
        };
        let results: Vec<Option<Result<SampledSeq, EngineError>>> = if work.len() <= 1 {
            work.iter().zip(states.iter_mut()).map(run).collect()
        } else {
            work.par_iter()
                .zip(states.par_iter_mut())
                .map(run)
                .collect()
        };
        let mut sampled = Vec::with_capacity(work.len());
        let mut failed = Vec::new();
        for ((w, state), result) in work.iter().zip(states).zip(results) {
            if let Some(state) = state {
                self.seqs.insert(w.id, state);
            }
            match result {
                Some(Ok(s)) => sampled.push(s),
                Some(Err(e)) => failed.push((w.id, e)),
                None => {}
            }
        }
        (sampled, failed)
    }
}

/// Sample one sequence's rows in order, keeping drafts while the sampled token equals them.
fn sample_seq(
    w: &Work<'_>,
    state: &mut SeqSampling,
    eos: &[u32],
) -> Result<SampledSeq, EngineError> {
    let k = w.draft.len();
    let mut tokens = Vec::with_capacity(k + 1);
    let mut logprobs: Vec<StepLogprobs> = Vec::new();
    // Penalties and `min_tokens` see the tokens kept so far this step too.
    let mut output_ids = Cow::Borrowed(w.output_ids);
    let mut constraint_finished = false;
    for (i, &row) in w.rows.iter().enumerate() {
        let masked;
        let logits = match state.constraint.as_mut() {
            Some(c) => {
                let mut m = row.to_vec();
                c.mask_logits(&mut m)?;
                masked = m;
                masked.as_slice()
            }
            None => row,
        };
        let (token, lp) = sample_token(
            logits,
            &state.params,
            w.prompt_ids,
            &output_ids,
            eos,
            &mut state.rng,
        )?;
        tokens.push(token);
        logprobs.extend(lp);
        if let Some(c) = state.constraint.as_mut() {
            c.accept(token)?;
            constraint_finished = c.is_finished();
        }
        let keep_going = i < k && w.draft[i] == token;
        if !keep_going || constraint_finished || w.stops.is_stop_token(token, eos) {
            break;
        }
        output_ids.to_mut().push(token);
    }
    let num_accepted = tokens
        .iter()
        .zip(w.draft)
        .take_while(|(t, d)| t == d)
        .count();
    Ok(SampledSeq {
        id: w.id,
        tokens,
        logprobs,
        num_draft: k,
        num_accepted,
        constraint_finished,
        next_draft: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Natural-log logits whose softmax is `probs`.
    fn logits(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    fn state(seed: u64, temperature: f32) -> SeqSampling {
        let params = SamplingParams {
            temperature,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        SeqSampling {
            rng: SequenceRng::new(params.seed, 0, 0),
            params: Arc::new(params),
            constraint: None,
            acceptance: Acceptance::default(),
        }
    }

    /// Pearson's chi-square of `counts` against `probs` (all expected counts are large here).
    fn chi_square(counts: &[u64], probs: &[f64]) -> f64 {
        let n: u64 = counts.iter().sum();
        counts
            .iter()
            .zip(probs)
            .map(|(&c, &p)| {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    /// Verification keeps the target's distribution: over many seeds, the first token follows
    /// row 0 whatever the draft, and the token after an accepted draft follows row 1. (5
    /// degrees of freedom: 20.5 is the 0.999 quantile.)
    #[test]
    fn verified_tokens_follow_the_target_distribution() {
        let p0 = [0.1, 0.3, 0.05, 0.25, 0.2, 0.1];
        let p1 = [0.4, 0.1, 0.1, 0.1, 0.2, 0.1];
        let (r0, r1, r2) = (logits(&p0), logits(&p1), logits(&p0));
        let draft = [1u32, 4];
        let stops = TokenStops::default();
        let work = Work {
            id: 0,
            rows: vec![&r0, &r1, &r2],
            draft: &draft,
            prompt_ids: &[0],
            output_ids: &[],
            stops: &stops,
        };
        let (mut first, mut second) = ([0u64; 6], [0u64; 6]);
        let mut accepted_first = 0;
        let samples = 30_000;
        for seed in 0..samples {
            let mut s = state(seed, 1.0);
            let out = sample_seq(&work, &mut s, &[]).expect("samples");
            first[out.tokens[0] as usize] += 1;
            if out.tokens[0] == draft[0] {
                accepted_first += 1;
                second[out.tokens[1] as usize] += 1;
                assert_eq!(out.num_accepted, 1 + usize::from(out.tokens[1] == draft[1]));
            } else {
                assert_eq!((out.tokens.len(), out.num_accepted), (1, 0));
            }
            // Identical to decoding the same positions one by one with the same seed.
            let mut alone = state(seed, 1.0);
            let solo = Work {
                rows: vec![&r0],
                draft: &[],
                ..work.clone_shallow()
            };
            let one = sample_seq(&solo, &mut alone, &[]).expect("samples");
            assert_eq!(one.tokens[0], out.tokens[0]);
        }
        assert!(chi_square(&first, &p0) < 20.5, "{first:?}");
        assert!(chi_square(&second, &p1) < 20.5, "{second:?}");
        let rate = accepted_first as f64 / samples as f64;
        assert!((rate - p0[1]).abs() < 0.02, "acceptance {rate}");
    }

    #[test]
    fn greedy_keeps_drafts_up_to_the_first_disagreement() {
        let peaked = |t: usize| {
            let mut p = [0.01f64; 6];
            p[t] = 0.95;
            logits(&p)
        };
        let (a, b, c) = (peaked(2), peaked(3), peaked(5));
        let stops = TokenStops::default();
        let draft = [2u32, 4];
        let work = Work {
            id: 7,
            rows: vec![&a, &b, &c],
            draft: &draft,
            prompt_ids: &[0],
            output_ids: &[],
            stops: &stops,
        };
        let out = sample_seq(&work, &mut state(1, 0.0), &[]).expect("samples");
        assert_eq!(
            out.tokens,
            vec![2, 3],
            "draft 2 kept, 4 replaced by the target's 3"
        );
        assert_eq!((out.num_draft, out.num_accepted), (2, 1));
        // A stop token ends verification even where it matches the draft.
        let draft = [2u32, 3];
        let work = Work {
            draft: &draft,
            ..work.clone_shallow()
        };
        let out = sample_seq(&work, &mut state(1, 0.0), &[2]).expect("samples");
        assert_eq!((out.tokens.clone(), out.num_accepted), (vec![2], 1));
    }

    impl<'a> Work<'a> {
        fn clone_shallow(&self) -> Work<'a> {
            Work {
                id: self.id,
                rows: self.rows.clone(),
                draft: self.draft,
                prompt_ids: self.prompt_ids,
                output_ids: self.output_ids,
                stops: self.stops,
            }
        }
    }
}
