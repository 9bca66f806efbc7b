//! The model runner executes a scheduled batch: it turns it into the model's flattened input
//! (token ids, positions, cache slots, block tables; a decoding sequence's draft tokens follow
//! its last token), runs one forward pass, samples (verifying drafts: `sampling.rs`), computes
//! prompt logprobs, and drafts the next step's tokens (speculative decoding). [`RowPlan`] says
//! which logits row is whose. It owns the model, the KV cache (through the attention backend)
//! and each sequence's sampling state; it returns plain data ([`RunnerOutput`]) and changes
//! nothing of the scheduler's. It knows nothing of requests or text.

mod sampling;

use std::ops::Range;

use rayon::prelude::*;
use spindle_model::{
    AttentionBackend, AttentionMetadata, ForwardBatch, LlamaModel, ModelError, SequenceSlice,
};
use spindle_structured::Constraint;

use crate::api::{EngineError, SamplingParams};
use crate::sampler::prompt_logprob;
use crate::scheduler::{Scheduler, SchedulerOutput, SeqId};
use crate::spec::{propose_ngram, DraftModel, DraftRequest, SpecMethod, SpeculativeConfig};
use crate::step_output::{PromptLogprobsPart, RunnerOutput, SampledSeq};
use sampling::Sampling;

/// Logits rows of one sequence's prompt positions: row `rows.start + i` holds the logits at
/// position `first_position + i`, i.e. the distribution of prompt token `first_position + i + 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptRows {
    pub seq: SeqId,
    pub first_position: usize,
    pub rows: Range<usize>,
}

/// Rows a sequence samples from: `first_row` holds the distribution after its last token, and
/// each of the next `num_draft` rows the one after the corresponding draft token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleRows {
    pub seq: SeqId,
    pub first_row: usize,
    pub num_draft: usize,
}

/// Which logits row of a step belongs to whom.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowPlan {
    /// Prompt positions of sequences that want prompt logprobs.
    pub prompt: Vec<PromptRows>,
    /// Every sequence that samples its next token(s) this step.
    pub sample: Vec<SampleRows>,
}

/// Why a step's execution failed: a disagreement with the scheduler (a bug: the engine stops)
/// or the forward pass (the batch's requests fail, the engine goes on).
#[derive(Debug)]
pub enum ExecuteError {
    Engine(EngineError),
    Forward(ModelError),
}

/// The model, its KV cache, and the sequences' sampling state.
pub struct ModelRunner {
    model: LlamaModel,
    attention: Box<dyn AttentionBackend>,
    block_size: usize,
    sampling: Sampling,
    spec: Option<SpeculativeConfig>,
    /// The draft model, when `spec` names one.
    draft: Option<DraftModel>,
}

impl ModelRunner {
    /// `seed` draws each unseeded request's seed; `eos_ids` are masked under `min_tokens`.
    pub fn new(
        model: LlamaModel,
        attention: Box<dyn AttentionBackend>,
        seed: u64,
        eos_ids: Vec<u32>,
        spec: Option<SpeculativeConfig>,
        draft: Option<DraftModel>,
    ) -> Self {
        let block_size = attention.shape().block_size;
        Self {
            model,
            attention,
            block_size,
            sampling: Sampling::new(seed, eos_ids),
            spec,
            draft,
        }
    }

    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// Register a request's sequences (its `n` choices, in order) for sampling.
    pub fn add_request(
        &mut self,
        seqs: &[SeqId],
        params: &SamplingParams,
        constraint: Option<Constraint>,
    ) {
        self.sampling.add_request(seqs, params, constraint);
    }

    /// Forget an ended sequence's sampling state.
    pub fn remove(&mut self, seq: SeqId) {
        self.sampling.remove(seq);
        if let Some(draft) = self.draft.as_mut() {
            draft.forget(seq);
        }
    }

    /// One step's work: input, forward pass, prompt logprobs, sampling (with draft
    /// verification), and the next drafts.
    pub fn execute(
        &mut self,
        batch: &SchedulerOutput,
        scheduler: &Scheduler,
    ) -> Result<RunnerOutput, ExecuteError> {
        let (input, plan) = self
            .prepare(batch, scheduler)
            .map_err(ExecuteError::Engine)?;
        let rows = self.run(input).map_err(ExecuteError::Forward)?;
        let prompt_logprobs = self.prompt_logprobs(&plan.prompt, &rows, scheduler);
        let (mut sampled, failed) =
            self.sampling
                .sample(&plan.sample, &batch.forked, &rows, scheduler);
        self.propose(&mut sampled, scheduler);
        Ok(RunnerOutput {
            sampled,
            prompt_logprobs,
            failed,
        })
    }

    /// Logprobs of the prompt tokens whose logits this step computed, in parallel.
    fn prompt_logprobs(
        &self,
        plan: &[PromptRows],
        rows: &[Vec<f32>],
        scheduler: &Scheduler,
    ) -> Vec<PromptLogprobsPart> {
        plan.iter()
            .filter_map(|part| {
                let seq = scheduler.seq(part.seq)?;
                let k = self.sampling.params(part.seq)?.prompt_logprobs?;
                let tokens = seq.tokens();
                let logprobs = part
                    .rows
                    .clone()
                    .into_par_iter()
                    .enumerate()
                    .filter_map(|(i, row)| {
                        let target = *tokens.get(part.first_position + i + 1)?;
                        Some(prompt_logprob(rows.get(row)?, target, k))
                    })
                    .collect();
                Some(PromptLogprobsPart {
                    seq: part.seq,
                    first_position: part.first_position,
                    prompt_len: seq.prompt_len(),
                    logprobs,
                })
            })
            .collect()
    }

    /// Draft the next step's tokens for the sequences that go on, unless the batch is too
    /// large for speculation to pay or a sequence's drafts keep missing.
    fn propose(&mut self, sampled: &mut [SampledSeq], scheduler: &Scheduler) {
        let Some(spec) = &self.spec else {
            return;
        };
        let batch_allows = scheduler.num_running() <= spec.disable_by_batch_size;
        let k = spec.num_speculative_tokens;
        let mut wanted = Vec::new();
        for (i, s) in sampled.iter_mut().enumerate() {
            let Some(seq) = scheduler.seq(s.id) else {
                continue;
            };
            let ends = s.constraint_finished
                || s.tokens
                    .last()
                    .is_some_and(|&t| self.sampling.is_stop_token(t, seq.stops()));
            if !self
                .sampling
                .should_draft(s.id, s.num_draft, s.num_accepted)
                || ends
                || !batch_allows
            {
                continue;
            }
            let mut history = Vec::with_capacity(seq.tokens().len() + s.tokens.len());
            history.extend_from_slice(seq.tokens());
            history.extend_from_slice(&s.tokens);
            match &spec.method {
                SpecMethod::Ngram { min_n, max_n } => {
                    s.next_draft = propose_ngram(&history, k, *min_n, *max_n);
                }
                SpecMethod::DraftModel { .. } => wanted.push((i, history)),
            }
        }
        let Some(draft) = self.draft.as_mut() else {
            return;
        };
        let (indices, requests): (Vec<usize>, Vec<DraftRequest<'_>>) = wanted
            .iter()
            .filter_map(|(i, history)| {
                let seq = scheduler.seq(sampled[*i].id)?;
                let request = DraftRequest {
                    seq: sampled[*i].id,
                    admission: seq.admission(),
                    history,
                    table: seq.table()?,
                };
                Some((*i, request))
            })
            .unzip();
        match draft.propose(&requests, k) {
            Ok(drafts) => {
                for (i, d) in indices.into_iter().zip(drafts) {
                    sampled[i].next_draft = d;
                }
            }
            // Drafting is an optimization: a failure costs the drafts, not the requests.
            Err(e) => tracing::warn!("the draft model failed; no drafts this step: {e}"),
        }
    }

    /// Copy the step's copy-on-write blocks and build the model input. Errors here mean the
    /// scheduler and the cache disagree (a bug), so they stop the engine.
    fn prepare(
        &mut self,
        batch: &SchedulerOutput,
        scheduler: &Scheduler,
    ) -> Result<(ForwardBatch, RowPlan), EngineError> {
        if !batch.copies.is_empty() {
            self.attention
                .copy_blocks(&batch.copies)
                .map_err(EngineError::model)?;
            if let Some(draft) = self.draft.as_mut() {
                draft
                    .copy_blocks(&batch.copies)
                    .map_err(EngineError::model)?;
            }
        }
        let mut fb = ForwardBatch::default();
        let mut md = AttentionMetadata::default();
        let mut plan = RowPlan::default();
        for entry in &batch.scheduled {
            let (id, n, from) = (entry.id, entry.num_new_tokens, entry.num_computed);
            let seq = scheduler.seq(id).ok_or(EngineError::SchedulerMismatch {
                seq: id,
                position: from,
            })?;
            let table = seq.table().ok_or(EngineError::SchedulerMismatch {
                seq: id,
                position: from,
            })?;
            let start = fb.token_ids.len();
            let (tokens, draft) = (seq.tokens(), seq.draft());
            for pos in from..from + n {
                let token = tokens
                    .get(pos)
                    .or_else(|| draft.get(pos - tokens.len()))
                    .copied()
                    .ok_or(EngineError::SchedulerMismatch {
                        seq: id,
                        position: pos,
                    })?;
                let slot =
                    table
                        .slot(pos, self.block_size)
                        .ok_or(EngineError::SchedulerMismatch {
                            seq: id,
                            position: pos,
                        })?;
                fb.token_ids.push(token);
                fb.positions.push(pos as u32);
                md.slot_mapping.push(slot as u32);
            }
            md.sequences.push(SequenceSlice {
                query_start: start,
                query_len: n,
                context_len: from + n,
                block_table: table.blocks.clone(),
            });
            if seq.wants_prompt_logits() {
                // Positions before the prompt's last one predict a prompt token.
                let end = (from + n).min(seq.prompt_len().saturating_sub(1));
                if from < end {
                    let first_row = fb.logit_rows.len();
                    for pos in from..end {
                        fb.logit_rows.push((start + pos - from) as u32);
                    }
                    plan.prompt.push(PromptRows {
                        seq: id,
                        first_position: from,
                        rows: first_row..fb.logit_rows.len(),
                    });
                }
            }
            if entry.samples {
                plan.sample.push(SampleRows {
                    seq: id,
                    first_row: fb.logit_rows.len(),
                    num_draft: entry.num_draft,
                });
                let end = fb.token_ids.len();
                for row in end - 1 - entry.num_draft..end {
                    fb.logit_rows.push(row as u32);
                }
            }
        }
        fb.attention = md;
        Ok((fb, plan))
    }

    /// Run the forward pass; the rows are in the order of `input.logit_rows` (see the
    /// [`RowPlan`] from [`Self::prepare`]). A step that wants no row returns none.
    fn run(&mut self, mut input: ForwardBatch) -> Result<Vec<Vec<f32>>, ModelError> {
        if input.logit_rows.is_empty() {
            // Run for the KV writes. The model always returns at least one row, so ask for the
            // last token's and ignore it.
            input
                .logit_rows
                .push((input.token_ids.len().saturating_sub(1)) as u32);
            self.model.forward(&input, self.attention.as_mut())?;
            return Ok(Vec::new());
        }
        let logits = self.model.forward(&input, self.attention.as_mut())?;
        Ok(logits.to_vec2::<f32>()?)
    }
}
