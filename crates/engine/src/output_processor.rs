//! The output processor, the last stage of a step: it turns each sequence's new tokens (from
//! the scheduler's `update_from_output`) into text (detokenize, stop strings), streams the delta
//! to the request's channel, sends prompt logprobs and the final usage. It owns the requests
//! (their channels, settings and accounting) and each sequence's detokenizer and stop checker;
//! tokens and KV blocks stay with the scheduler, sampling with the runner. It calls back into
//! neither: the sequences it ends (a stop string, an error) are returned for the engine core
//! to release.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use spindle_model::TokenizerBundle;
use tokio::sync::mpsc;

use crate::api::{
    ChoiceDelta, EngineError, EngineEvent, FinishReason, RequestTimings, SamplingParams,
    StopReason, Usage,
};
use crate::scheduler::{ScheduledSeq, SeqId};
use crate::sequence::{RequestGroup, SeqOutput};
use crate::stats::EngineStats;
use crate::step_output::{PromptLogprobsPart, SeqUpdate, Stopped};
use crate::token_stop::{min_tokens_passed, Finish};

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
    stats: Arc<EngineStats>,
    requests: HashMap<u64, RequestGroup>,
    seqs: HashMap<SeqId, SeqOutput>,
    next_seq: SeqId,
}

impl OutputProcessor {
    pub fn new(tokenizer: Arc<TokenizerBundle>, stats: Arc<EngineStats>) -> Self {
        Self {
            tokenizer,
            stats,
            requests: HashMap::new(),
            seqs: HashMap::new(),
            next_seq: 0,
        }
    }

    /// Register request `id` and its `n` choices; returns their sequence ids (the first is
    /// scheduled, the others are forked from it once its prompt is computed).
    pub fn add_request(
        &mut self,
        id: u64,
        request_id: String,
        prompt: &[u32],
        params: SamplingParams,
        events: mpsc::UnboundedSender<EngineEvent>,
    ) -> Vec<SeqId> {
        let n = params.n.max(1);
        let seqs: Vec<SeqId> = (0..n)
            .map(|choice| {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.seqs
                    .insert(seq, SeqOutput::new(id, choice, prompt, &params));
                seq
            })
            .collect();
        self.stats
            .prompt_tokens_total
            .fetch_add(prompt.len() as u64, Ordering::Relaxed);
        self.requests.insert(
            id,
            RequestGroup {
                request_id,
                // The first prompt token has no logprob: nothing precedes it.
                prompt_logprobs: params.prompt_logprobs.map(|_| vec![None]),
                params,
                events,
                usage: Usage {
                    prompt_tokens: prompt.len(),
                    ..Usage::default()
                },
                num_live: n,
                arrived: Instant::now(),
                first_scheduled: None,
                first_token: None,
            },
        );
        if let Some(g) = self.requests.get_mut(&id) {
            // A one-token prompt is complete already: its only token has no logprob.
            send_prompt_logprobs_if_complete(g, prompt.len());
        }
        seqs
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

    /// Prompt logprobs the runner computed; once a request's prompt is complete they go out as
    /// one event, before its first delta. Positions recomputed after a preemption are not
    /// counted twice.
    pub fn record_prompt_logprobs(&mut self, parts: &[PromptLogprobsPart]) {
        for part in parts {
            let Some(out) = self.seqs.get(&part.seq) else {
                continue;
            };
            let Some(group) = self.requests.get_mut(&out.group) else {
                continue;
            };
            let Some(done) = group.prompt_logprobs.as_mut() else {
                continue;
            };
            // Entry i is the logprob of token first_position + i + 1; keep the ones not seen yet
            // (a recomputation after preemption repeats positions; a gap cannot happen).
            let skip = done.len().saturating_sub(part.first_position + 1);
            if part.first_position + skip + 1 != done.len() {
                continue;
            }
            done.extend(part.logprobs.iter().skip(skip).cloned().map(Some));
            send_prompt_logprobs_if_complete(group, part.prompt_len);
        }
    }

    /// Turn each sequence's new tokens into a delta: detokenize, check stop strings (which may
    /// end it before its last token), and send. Returns the sequences that ended.
    pub fn process(&mut self, updates: Vec<SeqUpdate>, now: Instant) -> Vec<SeqId> {
        let mut ended = Vec::new();
        for update in updates {
            match self.emit(&update, now) {
                Ok(true) => ended.push(update.id),
                Ok(false) => {}
                Err(e) => ended.extend(self.fail_seq_request(update.id, e)),
            }
        }
        ended
    }

    /// Stream one sequence's new tokens; `Ok(true)` once it ended.
    fn emit(&mut self, update: &SeqUpdate, now: Instant) -> Result<bool, EngineError> {
        let (Some(out), tokenizer) = (self.seqs.get_mut(&update.id), &self.tokenizer) else {
            return Ok(false);
        };
        let Some(group) = self.requests.get_mut(&out.group) else {
            return Ok(false);
        };
        group.first_token.get_or_insert(now);
        let params = &group.params;
        let mut delta = ChoiceDelta {
            index: out.choice,
            token_ids: Vec::with_capacity(update.tokens.len()),
            text: String::new(),
            logprobs: Vec::new(),
            finish_reason: None,
            stop_reason: None,
        };
        let mut finish: Option<Finish> = None;
        for (i, &token) in update.tokens.iter().enumerate() {
            out.num_output += 1;
            group.usage.completion_tokens += 1;
            delta.token_ids.push(token);
            delta.logprobs.extend(update.logprobs.get(i).cloned());
            let stopped = if i + 1 == update.tokens.len() {
                update.stopped.as_ref()
            } else {
                None
            };
            if let Some(Stopped::Token(reason)) = stopped {
                // EOS or a stop id: the token itself is not shown.
                finish = Some((FinishReason::Stop, reason.clone()));
                break;
            }
            let may_stop = min_tokens_passed(out.num_output, params.min_tokens);
            let piece = out.detokenizer.push(&tokenizer.tokenizer, token)?;
            let (emit, hit) = out.stop.feed(&piece, may_stop);
            delta.text.push_str(&emit);
            if let Some(stop) = hit {
                finish = Some((FinishReason::Stop, Some(StopReason::Text(stop))));
                break;
            }
            finish = match stopped {
                Some(Stopped::Complete) => Some((FinishReason::Stop, None)),
                Some(Stopped::Length) => Some((FinishReason::Length, None)),
                _ => None,
            };
        }
        self.stats
            .generation_tokens_total
            .fetch_add(delta.token_ids.len() as u64, Ordering::Relaxed);
        // At the end, release text held back for split characters or possible stop strings:
        // at EOS, a stop token id, the length limit or a complete constraint, not after a stop
        // string (the checker already cut the text there).
        if finish.is_some() && !matches!(finish, Some((_, Some(StopReason::Text(_))))) {
            if let Ok(tail) = out.detokenizer.finish(&tokenizer.tokenizer) {
                let may_stop = min_tokens_passed(out.num_output, params.min_tokens);
                let (emit, hit) = out.stop.feed(&tail, may_stop);
                delta.text.push_str(&emit);
                match hit {
                    Some(stop) => finish = Some((FinishReason::Stop, Some(StopReason::Text(stop)))),
                    None => delta.text.push_str(&out.stop.finish()),
                }
            }
        }
        delta.finish_reason = finish.as_ref().map(|f| f.0);
        delta.stop_reason = finish.as_ref().and_then(|f| f.1.clone());
        let _ = group.events.send(EngineEvent::Delta(delta));
        if finish.is_some() {
            let group_id = out.group;
            self.seqs.remove(&update.id);
            self.finish_if_done(group_id, now);
        }
        Ok(finish.is_some())
    }

    /// Send `Finished` once every choice of a request is done.
    fn finish_if_done(&mut self, group_id: u64, now: Instant) {
        let Some(group) = self.requests.get_mut(&group_id) else {
            return;
        };
        group.num_live = group.num_live.saturating_sub(1);
        if group.num_live > 0 {
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
    /// Returns it, to be released.
    pub fn refuse(&mut self, id: SeqId) -> Vec<SeqId> {
        let Some(out) = self.seqs.remove(&id) else {
            return vec![id];
        };
        let delta = ChoiceDelta {
            index: out.choice,
            token_ids: Vec::new(),
            text: String::new(),
            logprobs: Vec::new(),
            finish_reason: Some(FinishReason::Length),
            stop_reason: None,
        };
        if let Some(g) = self.requests.get(&out.group) {
            let _ = g.events.send(EngineEvent::Delta(delta));
        }
        self.finish_if_done(out.group, Instant::now());
        vec![id]
    }

    /// Remove a request without telling the caller (it is gone or asked); returns its
    /// sequences, to be released.
    pub fn abort_request(&mut self, group: u64) -> Vec<SeqId> {
        if self.requests.remove(&group).is_none() {
            return Vec::new();
        }
        let ids: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.group == group)
            .map(|(&id, _)| id)
            .collect();
        for id in &ids {
            self.seqs.remove(id);
        }
        ids
    }

    /// End a request with an error event; returns its sequences, to be released.
    pub fn fail_request(&mut self, group: u64, error: EngineError) -> Vec<SeqId> {
        if let Some(g) = self.requests.get(&group) {
            let _ = g.events.send(EngineEvent::Error(error));
        }
        self.abort_request(group)
    }

    /// End the request a sequence belongs to with an error event; returns its sequences.
    pub fn fail_seq_request(&mut self, seq: SeqId, error: EngineError) -> Vec<SeqId> {
        match self.seqs.get(&seq).map(|s| s.group) {
            Some(group) => self.fail_request(group, error),
            None => Vec::new(),
        }
    }
}
