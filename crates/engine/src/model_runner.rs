//! The model runner: turns a scheduled batch into the model's flattened input (token ids,
//! positions, cache slots, block tables), runs one forward pass, and hands back the logits rows
//! of the sequences that sample this step. It owns the model and the KV cache (through the
//! attention backend); it knows nothing of requests, sampling or text.

use spindle_model::{
    AttentionBackend, AttentionMetadata, ForwardBatch, LlamaModel, ModelError, SequenceSlice,
};

use crate::api::EngineError;
use crate::scheduler::{Scheduler, SchedulerOutput};

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
    ) -> Result<ForwardBatch, EngineError> {
        if !batch.copies.is_empty() {
            self.attention
                .copy_blocks(&batch.copies)
                .map_err(EngineError::model)?;
        }
        let mut fb = ForwardBatch::default();
        let mut md = AttentionMetadata::default();
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
            if entry.samples {
                fb.logit_rows.push((fb.token_ids.len() - 1) as u32);
            }
        }
        fb.attention = md;
        Ok(fb)
    }

    /// Run the forward pass; row `i` of the result belongs to the `i`-th sampling entry of the
    /// batch. A step of partial prefill chunks only (no row wanted) returns no rows.
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
