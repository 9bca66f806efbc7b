//! The model runner: turns a scheduled batch into the model's flattened input (token ids,
//! positions, cache slots, block tables), runs one forward pass, and hands back the logits rows
//! of the sequences that sample this step, plus every prompt position of the sequences that
//! want prompt logprobs ([`RowPlan`] says which row is whose). It owns the model and the KV
//! cache (through the attention backend); it knows nothing of requests, sampling or text.

use std::ops::Range;

use spindle_model::{
    AttentionBackend, AttentionMetadata, ForwardBatch, LlamaModel, ModelError, SequenceSlice,
};

use crate::api::EngineError;
use crate::scheduler::{Scheduler, SchedulerOutput, SeqId};

/// Logits rows of one sequence's prompt positions: row `rows.start + i` holds the logits at
/// position `first_position + i`, i.e. the distribution of prompt token `first_position + i + 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptRows {
    pub seq: SeqId,
    pub first_position: usize,
    pub rows: Range<usize>,
}

/// Which logits row of a step belongs to whom.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowPlan {
    /// Prompt positions of sequences that want prompt logprobs.
    pub prompt: Vec<PromptRows>,
    /// `(sequence, row)` of every sequence that samples its next token this step.
    pub sample: Vec<(SeqId, usize)>,
}

/// The model and its KV cache.
pub struct ModelRunner {
    model: LlamaModel,
    attention: Box<dyn AttentionBackend>,
    block_size: usize,
}

impl ModelRunner {
    pub fn new(model: LlamaModel, attention: Box<dyn AttentionBackend>) -> Self {
        let block_size = attention.shape().block_size;
        Self {
            model,
            attention,
            block_size,
        }
    }

    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// Copy the step's copy-on-write blocks and build the model input. Errors here mean the
    /// scheduler and the cache disagree (a bug), so they stop the engine.
    pub fn prepare(
        &mut self,
        batch: &SchedulerOutput,
        scheduler: &Scheduler,
    ) -> Result<(ForwardBatch, RowPlan), EngineError> {
        if !batch.copies.is_empty() {
            self.attention
                .copy_blocks(&batch.copies)
                .map_err(EngineError::model)?;
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
            for pos in from..from + n {
                let token = *seq
                    .tokens()
                    .get(pos)
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
                plan.sample.push((id, fb.logit_rows.len()));
                fb.logit_rows.push((fb.token_ids.len() - 1) as u32);
            }
        }
        fb.attention = md;
        Ok((fb, plan))
    }

    /// Run the forward pass; the rows are in the order of `input.logit_rows` (see the
    /// [`RowPlan`] from [`Self::prepare`]). A step that wants no row returns none.
    pub fn run(&mut self, mut input: ForwardBatch) -> Result<Vec<Vec<f32>>, ModelError> {
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
