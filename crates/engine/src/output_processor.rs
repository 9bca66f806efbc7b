//! The output processor: after a forward pass it samples the next token of every sequence that
//! reached its end, forks `n > 1` choices after their prompt, appends each token to the
//! scheduler's sequence, detokenizes, checks stops and streams the delta to the request's
//! channel. It owns the requests (their channels, settings and accounting) and each sequence's
//! RNG, detokenizer and stop checker; tokens and KV blocks stay with the scheduler.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use spindle_model::TokenizerBundle;
use tokio::sync::mpsc;

use crate::api::{
    ChoiceDelta, EngineError, EngineEvent, FinishReason, GenerateRequest, RequestTimings,
    SamplingParams, StepLogprobs, StopReason, Usage,
};
use rayon::prelude::*;
use spindle_structured::{Constraint, StructuredError};

use crate::model_runner::PromptRows;
use crate::sampler::{prompt_logprob, sample_batch, SampleInput, SequenceRng};
use crate::scheduler::{ScheduledSeq, Scheduler, SeqId};
use crate::sequence::{RequestGroup, SeqOutput};
use crate::stats::EngineStats;

/// Why a sequence ends, as reported in its last delta.
pub type Finish = (FinishReason, Option<StopReason>);

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
    params: &SamplingParams,
    eos_ids: &[u32],
) -> Option<Finish> {
    let is_eos = !params.ignore_eos && eos_ids.contains(&token);
    let is_stop_id = params.stop_token_ids.contains(&token);
    if !(is_eos || is_stop_id) || !min_tokens_passed(num_output, params.min_tokens) {
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

/// Send a request's prompt logprobs once all `prompt_len` positions are in (one event, before
/// its first delta).
fn send_prompt_logprobs_if_complete(group: &mut RequestGroup, prompt_len: usize) {
    if group
        .prompt_logprobs
        .as_ref()
        .is_some_and(|done| done.len() >= prompt_len)
    {
        if let Some(all) = group.prompt_logprobs.take() {
            let _ = group.events.send(EngineEvent::PromptLogprobs(all));
        }
    }
}

/// Requests in flight and what turns their tokens into events.
pub struct OutputProcessor {
    tokenizer: Arc<TokenizerBundle>,
    max_model_len: usize,
    stats: Arc<EngineStats>,
    requests: HashMap<u64, RequestGroup>,
    seqs: HashMap<SeqId, SeqOutput>,
    next_seq: SeqId,
    /// Draws the fallback seed of each unseeded request.
    seed_rng: rand::rngs::StdRng,
}

impl OutputProcessor {
    pub fn new(
        tokenizer: Arc<TokenizerBundle>,
        max_model_len: usize,
        seed: u64,
        stats: Arc<EngineStats>,
    ) -> Self {
        Self {
            tokenizer,
            max_model_len,
            stats,
            requests: HashMap::new(),
            seqs: HashMap::new(),
            next_seq: 0,
            seed_rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// Register request `id` with its first sequence; returns that sequence's id for the
    /// scheduler.
    pub fn add_request(
        &mut self,
        id: u64,
        request: GenerateRequest,
        events: mpsc::UnboundedSender<EngineEvent>,
    ) -> (SeqId, Vec<u32>) {
        let (request_id, prompt, params, max_tokens, constraint) = request.into_parts();
        debug_assert!(!prompt.is_empty() && prompt.len() + max_tokens <= self.max_model_len);
        let fallback_seed: u64 = self.seed_rng.random();
        let seq_id = self.new_seq(SeqOutput::new(
            id,
            0,
            &prompt,
            &params,
            fallback_seed,
            constraint.clone(),
        ));
        self.stats
            .prompt_tokens_total
            .fetch_add(prompt.len() as u64, Ordering::Relaxed);
        self.requests.insert(
            id,
            RequestGroup {
                request_id,
                pending_children: params.n > 1,
                // The first prompt token has no logprob: nothing precedes it.
                prompt_logprobs: params.prompt_logprobs.map(|_| vec![None]),
                params,
                events,
                usage: Usage {
                    prompt_tokens: prompt.len(),
                    ..Usage::default()
                },
                max_tokens,
                first_seq: seq_id,
                constraint,
                fallback_seed,
                num_live: 1,
                arrived: Instant::now(),
                first_scheduled: None,
                first_token: None,
            },
        );
        if let Some(g) = self.requests.get_mut(&id) {
            // A one-token prompt is complete already: its only token has no logprob.
            send_prompt_logprobs_if_complete(g, prompt.len());
        }
        (seq_id, prompt)
    }

    fn new_seq(&mut self, output: SeqOutput) -> SeqId {
        let id = self.next_seq;
        self.next_seq += 1;
        self.seqs.insert(id, output);
        id
    }

    /// The caller's id of the request a sequence belongs to (for step traces).
    pub fn request_id_of(&self, seq: SeqId) -> Option<&str> {
        let group = self.seqs.get(&seq)?.group;
        self.requests.get(&group).map(|g| g.request_id.as_str())
    }

    /// Every request in flight, so a dying engine can fail them all.
    pub fn request_ids(&self) -> Vec<u64> {
        self.requests.keys().copied().collect()
    }

    /// Note when each request was first scheduled and how much of its prompt was cached.
    pub fn note_scheduled(&mut self, scheduled: &[ScheduledSeq], started: Instant) {
        for s in scheduled {
            let Some(group) = self.seqs.get(&s.id).map(|q| q.group) else {
                continue;
            };
            if let Some(g) = self.requests.get_mut(&group) {
                if g.first_scheduled.is_none() {
                    g.first_scheduled = Some(started);
                    g.usage.cached_tokens = s.num_computed;
                }
            }
        }
    }

    /// Logprobs of the prompt tokens whose logits this step computed (`plan` says which rows),
    /// in parallel; once a request's prompt is complete they go out as one event, before its
    /// first delta. Positions recomputed after a preemption are not counted twice.
    pub fn record_prompt_logprobs(
        &mut self,
        plan: &[PromptRows],
        rows: &[Vec<f32>],
        scheduler: &Scheduler,
    ) {
        for part in plan {
            let (Some(out), Some(seq)) = (self.seqs.get(&part.seq), scheduler.seq(part.seq)) else {
                continue;
            };
            let Some(group) = self.requests.get_mut(&out.group) else {
                continue;
            };
            let (Some(k), Some(done)) =
                (group.params.prompt_logprobs, group.prompt_logprobs.as_mut())
            else {
                continue;
            };
            // Row i predicts the token at first_position + i + 1; keep the ones not seen yet
            // (a recomputation after preemption repeats positions; a gap cannot happen).
            let skip = done.len().saturating_sub(part.first_position + 1);
            if part.first_position + skip + 1 != done.len() {
                continue;
            }
            let tokens = seq.tokens();
            let fresh: Vec<(usize, u32)> = part
                .rows
                .clone()
                .enumerate()
                .skip(skip)
                .filter_map(|(i, row)| Some((row, *tokens.get(part.first_position + i + 1)?)))
                .collect();
            let computed: Vec<_> = fresh
                .par_iter()
                .filter_map(|&(row, target)| rows.get(row).map(|r| prompt_logprob(r, target, k)))
                .collect();
            done.extend(computed.into_iter().map(Some));
            send_prompt_logprobs_if_complete(group, seq.prompt_len());
        }
    }

    /// Sample the next token of every `(sequence, row)` in `sample`, fork `n > 1` children
    /// after their parent's prefill, and stream the results.
    pub fn process(
        &mut self,
        sample: &[(SeqId, usize)],
        rows: &[Vec<f32>],
        scheduler: &mut Scheduler,
        now: Instant,
    ) {
        let mut work: Vec<(SeqId, usize)> = sample.to_vec();
        for &(id, row) in sample {
            self.fork_children(id, row, scheduler, &mut work);
        }
        let results = self.sample(&work, rows, scheduler);
        for (id, result) in results {
            match result {
                Ok((token, logprobs)) => self.append_token(id, token, logprobs, scheduler, now),
                Err(e) => self.fail_seq_request(id, e, scheduler),
            }
        }
    }

    /// After the prompt of a request's first choice is computed, start its other `n - 1`
    /// choices on the same prompt blocks; they sample from the parent's row.
    fn fork_children(
        &mut self,
        parent: SeqId,
        row: usize,
        scheduler: &mut Scheduler,
        work: &mut Vec<(SeqId, usize)>,
    ) {
        let Some(group_id) = self.seqs.get(&parent).map(|s| s.group) else {
            return;
        };
        let Some(group) = self.requests.get_mut(&group_id) else {
            return;
        };
        if group.first_seq != parent || !group.pending_children {
            return;
        }
        group.pending_children = false;
        let n = group.params.n;
        group.num_live += n - 1;
        let (params, fallback, constraint) = (
            group.params.clone(),
            group.fallback_seed,
            group.constraint.clone(),
        );
        let prompt = scheduler
            .seq(parent)
            .map(|s| s.prompt_ids().to_vec())
            .unwrap_or_default();
        for choice in 1..n {
            let child = self.new_seq(SeqOutput::new(
                group_id,
                choice,
                &prompt,
                &params,
                fallback,
                constraint.clone(),
            ));
            scheduler.fork(parent, child);
            work.push((child, row));
        }
    }

    /// Sample every work item in parallel; each sequence advances its own RNG. Constrained
    /// sequences sample from a copy of their row with disallowed tokens at -inf (masks computed
    /// in parallel); unconstrained ones read the row as it is.
    fn sample(
        &mut self,
        work: &[(SeqId, usize)],
        rows: &[Vec<f32>],
        scheduler: &Scheduler,
    ) -> Vec<(SeqId, Result<(u32, Option<StepLogprobs>), EngineError>)> {
        let eos = &self.tokenizer.eos_token_ids;
        let mut order = Vec::with_capacity(work.len());
        let mut rngs: Vec<SequenceRng> = Vec::with_capacity(work.len());
        let mut constraints: Vec<Option<Constraint>> = Vec::with_capacity(work.len());
        for &(id, row) in work {
            let (Some(out), Some(_), Some(_)) =
                (self.seqs.get_mut(&id), scheduler.seq(id), rows.get(row))
            else {
                continue;
            };
            if !self.requests.contains_key(&out.group) {
                continue;
            }
            order.push((id, row, out.group));
            rngs.push(out.rng.clone());
            constraints.push(out.constraint.take());
        }
        let masked: Vec<Option<Result<Vec<f32>, StructuredError>>> = constraints
            .par_iter_mut()
            .zip(order.par_iter())
            .map(|(c, &(_, row, _))| {
                let c = c.as_mut()?;
                let mut logits = rows.get(row)?.clone();
                Some(c.mask_logits(&mut logits).map(|()| logits))
            })
            .collect();
        let mut results: Vec<Option<Result<(u32, Option<StepLogprobs>), EngineError>>> =
            (0..order.len()).map(|_| None).collect();
        {
            let mut inputs = Vec::with_capacity(order.len());
            let mut sampled = Vec::with_capacity(order.len());
            for (k, (&(id, row, group), rng)) in order.iter().zip(rngs.iter_mut()).enumerate() {
                let (Some(seq), Some(group), Some(row)) =
                    (scheduler.seq(id), self.requests.get(&group), rows.get(row))
                else {
                    continue; // checked above
                };
                let logits = match &masked[k] {
                    None => row.as_slice(),
                    Some(Ok(m)) => m.as_slice(),
                    Some(Err(e)) => {
                        results[k] = Some(Err(EngineError::Constraint(e.clone())));
                        continue;
                    }
                };
                inputs.push(SampleInput {
                    logits,
                    params: &group.params,
                    prompt_ids: seq.prompt_ids(),
                    output_ids: seq.output_ids(),
                    eos_ids: eos,
                    rng,
                });
                sampled.push(k);
            }
            for (k, r) in sampled.into_iter().zip(sample_batch(&mut inputs)) {
                results[k] = Some(r.map_err(EngineError::Sampler));
            }
        }
        for ((&(id, _, _), rng), constraint) in order.iter().zip(rngs).zip(constraints) {
            if let Some(out) = self.seqs.get_mut(&id) {
                out.rng = rng;
                out.constraint = constraint;
            }
        }
        order
            .into_iter()
            .zip(results)
            .filter_map(|((id, _, _), r)| r.map(|r| (id, r)))
            .collect()
    }

    /// Add a sampled token to a sequence, detokenize, check stops, and send the delta.
    fn append_token(
        &mut self,
        id: SeqId,
        token: u32,
        logprobs: Option<StepLogprobs>,
        scheduler: &mut Scheduler,
        now: Instant,
    ) {
        scheduler.append_token(id, token);
        let (Some(out), Some(seq)) = (self.seqs.get_mut(&id), scheduler.seq(id)) else {
            return;
        };
        let Some(group) = self.requests.get_mut(&out.group) else {
            return;
        };
        group.usage.completion_tokens += 1;
        group.first_token.get_or_insert(now);
        self.stats
            .generation_tokens_total
            .fetch_add(1, Ordering::Relaxed);

        let mut constraint_done = false;
        if let Some(c) = out.constraint.as_mut() {
            if let Err(e) = c.accept(token) {
                let group_id = out.group;
                self.fail_request(group_id, EngineError::Constraint(e), scheduler);
                return;
            }
            constraint_done = c.is_finished();
        }
        let params = &group.params;
        let tokenizer = &self.tokenizer.tokenizer;
        let num_output = seq.num_output();
        let may_stop = min_tokens_passed(num_output, params.min_tokens);
        let mut text = String::new();
        let mut finish = stop_on_token(token, num_output, params, &self.tokenizer.eos_token_ids);
        if finish.is_none() {
            let piece = match out.detokenizer.push(tokenizer, token) {
                Ok(piece) => piece,
                Err(e) => {
                    let group_id = out.group;
                    self.fail_request(group_id, EngineError::Detokenize(e), scheduler);
                    return;
                }
            };
            let (emit, hit) = out.stop.feed(&piece, may_stop);
            text.push_str(&emit);
            finish = hit.map(|s| (FinishReason::Stop, Some(StopReason::Text(s))));
            if finish.is_none() && constraint_done {
                // The structured output is complete: nothing may follow it.
                finish = Some((FinishReason::Stop, None));
            }
            if finish.is_none()
                && stop_on_length(
                    num_output,
                    seq.tokens().len(),
                    group.max_tokens,
                    self.max_model_len,
                )
            {
                finish = Some((FinishReason::Length, None));
            }
        }
        // At the end, release text held back for split characters or possible stop strings:
        // at EOS, a stop token id, the length limit or a complete constraint, not after a stop
        // string (the checker already cut the text there).
        if finish.is_some() && !matches!(finish, Some((_, Some(StopReason::Text(_))))) {
            if let Ok(tail) = out.detokenizer.finish(tokenizer) {
                let (emit, hit) = out.stop.feed(&tail, may_stop);
                text.push_str(&emit);
                match hit {
                    Some(stop) => finish = Some((FinishReason::Stop, Some(StopReason::Text(stop)))),
                    None => text.push_str(&out.stop.finish()),
                }
            }
        }
        let delta = ChoiceDelta {
            index: out.choice,
            token_ids: vec![token],
            text,
            logprobs: logprobs.into_iter().collect(),
            finish_reason: finish.as_ref().map(|f| f.0),
            stop_reason: finish.as_ref().and_then(|f| f.1.clone()),
        };
        let _ = group.events.send(EngineEvent::Delta(delta));
        if finish.is_some() {
            let group_id = out.group;
            self.release_seq(id, scheduler);
            self.finish_if_done(group_id, now);
        }
    }

    /// Send `Finished` once every choice of a request is done.
    fn finish_if_done(&mut self, group_id: u64, now: Instant) {
        let Some(group) = self.requests.get_mut(&group_id) else {
            return;
        };
        group.num_live = group.num_live.saturating_sub(1);
        if group.num_live > 0 || group.pending_children {
            return;
        }
        let Some(group) = self.requests.remove(&group_id) else {
            return;
        };
        let secs = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64();
        let scheduled = group.first_scheduled.unwrap_or(group.arrived);
        let first = group.first_token.unwrap_or(now);
        let timings = RequestTimings {
            queue: secs(group.arrived, scheduled),
            prefill: secs(scheduled, first),
            decode: secs(first, now),
            time_to_first_token: secs(group.arrived, first),
            e2e: secs(group.arrived, now),
        };
        let _ = group.events.send(EngineEvent::Finished {
            usage: group.usage,
            timings,
        });
    }

    /// A sequence the scheduler refused (it can never fit the KV cache) ends with `length`.
    pub fn refuse(&mut self, id: SeqId, scheduler: &mut Scheduler) {
        let Some(out) = self.seqs.get(&id) else {
            scheduler.finish(id);
            return;
        };
        let group_id = out.group;
        let delta = ChoiceDelta {
            index: out.choice,
            token_ids: Vec::new(),
            text: String::new(),
            logprobs: Vec::new(),
            finish_reason: Some(FinishReason::Length),
            stop_reason: None,
        };
        if let Some(g) = self.requests.get(&group_id) {
            let _ = g.events.send(EngineEvent::Delta(delta));
        }
        self.release_seq(id, scheduler);
        self.finish_if_done(group_id, Instant::now());
    }

    /// Remove a request and free its blocks without telling the caller (it is gone or asked).
    pub fn abort_request(&mut self, group: u64, scheduler: &mut Scheduler) {
        if self.requests.remove(&group).is_none() {
            return;
        }
        let ids: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.group == group)
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.release_seq(id, scheduler);
        }
    }

    /// End a request with an error event.
    pub fn fail_request(&mut self, group: u64, error: EngineError, scheduler: &mut Scheduler) {
        if let Some(g) = self.requests.get(&group) {
            let _ = g.events.send(EngineEvent::Error(error));
        }
        self.abort_request(group, scheduler);
    }

    /// End the request a sequence belongs to with an error event.
    pub fn fail_seq_request(&mut self, seq: SeqId, error: EngineError, scheduler: &mut Scheduler) {
        if let Some(group) = self.seqs.get(&seq).map(|s| s.group) {
            self.fail_request(group, error, scheduler);
        }
    }

    fn release_seq(&mut self, id: SeqId, scheduler: &mut Scheduler) {
        scheduler.finish(id);
        self.seqs.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_and_stop_ids_wait_for_min_tokens() {
        let params = SamplingParams {
            min_tokens: 2,
            stop_token_ids: vec![9],
            ..SamplingParams::default()
        };
        let eos = [2];
        assert_eq!(stop_on_token(2, 2, &params, &eos), None);
        assert_eq!(stop_on_token(9, 2, &params, &eos), None);
        assert_eq!(
            stop_on_token(2, 3, &params, &eos),
            Some((FinishReason::Stop, None))
        );
        assert_eq!(
            stop_on_token(9, 3, &params, &eos),
            Some((FinishReason::Stop, Some(StopReason::TokenId(9))))
        );
        assert_eq!(stop_on_token(5, 3, &params, &eos), None);
    }

    #[test]
    fn ignore_eos_keeps_stop_ids() {
        let params = SamplingParams {
            ignore_eos: true,
            stop_token_ids: vec![2],
            ..SamplingParams::default()
        };
        // An EOS id listed as a stop id still stops, reported as the stop id.
        assert_eq!(
            stop_on_token(2, 1, &params, &[2]),
            Some((FinishReason::Stop, Some(StopReason::TokenId(2))))
        );
        assert_eq!(
            stop_on_token(
                3,
                1,
                &SamplingParams {
                    ignore_eos: true,
                    ..SamplingParams::default()
                },
                &[3]
            ),
            None
        );
    }

    #[test]
    fn length_bound_is_max_tokens_or_the_context() {
        assert!(!stop_on_length(3, 10, 4, 100));
        assert!(stop_on_length(4, 11, 4, 100));
        assert!(stop_on_length(1, 100, 50, 100));
        assert!(min_tokens_passed(1, 0) && !min_tokens_passed(3, 3) && min_tokens_passed(4, 3));
    }
}
