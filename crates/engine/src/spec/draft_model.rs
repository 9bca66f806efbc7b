//! Draft-model speculation: a smaller model sharing the target's tokenizer proposes `k` tokens
//! greedily after each step. Its KV cache has the target's blocks (same count and size, the
//! draft's own layer shape), so a sequence's block table addresses both caches; the scheduler
//! reserves `k` slots of lookahead so drafting can write past the target's positions. Per
//! sequence, the draft remembers how many positions of its cache hold its KV for the current
//! admission and catches up over the new tokens before drafting (a preempted or new sequence
//! starts from its first token: a block taken from the prefix cache holds the target's KV, not
//! necessarily the draft's).

use std::collections::HashMap;
use std::sync::Arc;

use spindle_model::{
    AttentionBackend, AttentionMetadata, CacheShape, ForwardBatch, LlamaModel, LoadOptions,
    ModelError, SequenceSlice,
};

use crate::api::EngineError;
use crate::block_manager::{BlockId, BlockTable};
use crate::config::EngineConfig;
use crate::sampler::greedy_token;
use crate::scheduler::SeqId;

/// A loaded draft model and its KV cache.
pub struct DraftModel {
    model: LlamaModel,
    attention: Box<dyn AttentionBackend>,
    block_size: usize,
    /// Per sequence: the admission its draft KV belongs to, and how many positions it covers.
    computed: HashMap<SeqId, (u64, usize)>,
}

/// One sequence to draft for: its tokens so far (prompt, output, this step's new tokens) and
/// the block table both caches share.
pub struct DraftRequest<'a> {
    pub seq: SeqId,
    /// Changes whenever the sequence gets a new block table (admission after preemption).
    pub admission: u64,
    pub history: &'a [u32],
    pub table: &'a BlockTable,
}

/// Why a draft model cannot serve a target.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DraftModelError {
    #[error("loading the draft model {path} failed: {source}")]
    Load {
        path: String,
        source: Arc<ModelError>,
    },
    #[error("the draft model {0} is an encoder; it cannot draft tokens")]
    Encoder(String),
    #[error(
        "the draft model's vocabulary differs from the target's ({draft} vs {target} tokens, or the same size with other tokens): a draft must share the target's tokenizer"
    )]
    VocabularyMismatch { target: usize, draft: usize },
    #[error(
        "draft-model speculation needs a target with full attention in some layer (every layer of this one slides, so its blocks leave the window)"
    )]
    SlidingWindow,
}

impl DraftModel {
    /// Load the draft at `path` for a target with `target_vocab` (its tokenizer's tokens, by
    /// id) and a cache of `num_blocks` blocks shaped like `target_shape`.
    pub fn load(
        path: &str,
        target_vocab: &HashMap<String, u32>,
        config: &EngineConfig,
        target_shape: CacheShape,
        max_model_len: usize,
    ) -> Result<Self, EngineError> {
        let err = |e: DraftModelError| EngineError::DraftModel(Arc::new(e));
        let options = LoadOptions {
            model: path.to_string(),
            device: config.model.device,
            max_model_len: Some(max_model_len),
            seed: config.model.seed,
            ..LoadOptions::default()
        };
        let loaded = match spindle_model::load_any(&options) {
            Ok(spindle_model::Loaded::Decoder(m)) => m,
            Ok(spindle_model::Loaded::Encoder(_)) => {
                return Err(err(DraftModelError::Encoder(path.into())))
            }
            Err(e) => {
                return Err(err(DraftModelError::Load {
                    path: path.into(),
                    source: Arc::new(e),
                }))
            }
        };
        let draft_vocab = loaded.tokenizer.tokenizer.get_vocab(true);
        if &draft_vocab != target_vocab {
            return Err(err(DraftModelError::VocabularyMismatch {
                target: target_vocab.len(),
                draft: draft_vocab.len(),
            }));
        }
        let mc = loaded.model.config();
        let shape = CacheShape {
            num_layers: mc.num_layers,
            num_blocks: target_shape.num_blocks,
            block_size: target_shape.block_size,
            num_kv_heads: mc.num_kv_heads,
            head_dim: mc.head_dim,
        };
        let same_blocks = EngineConfig {
            num_blocks_override: Some(target_shape.num_blocks),
            ..config.clone()
        };
        let (attention, shape) =
            crate::kv_cache::build(&loaded.model, &same_blocks, shape, max_model_len)?;
        tracing::info!(
            path,
            blocks = shape.num_blocks,
            "draft model loaded; its KV cache shares the target's block tables"
        );
        Ok(Self {
            model: loaded.model,
            attention,
            block_size: shape.block_size,
            computed: HashMap::new(),
        })
    }

    /// Mirror the target's copy-on-write block copies.
    pub fn copy_blocks(&mut self, copies: &[(BlockId, BlockId)]) -> Result<(), ModelError> {
        self.attention.copy_blocks(copies)
    }

    /// Forget an ended sequence.
    pub fn forget(&mut self, seq: SeqId) {
        self.computed.remove(&seq);
    }

    /// Up to `k` greedy draft tokens per request: one forward pass catching every sequence up
    /// (its new tokens, or all of them after a new admission), then `k - 1` one-token passes.
    /// A sequence whose table has no slot for a position stops drafting there.
    pub fn propose(
        &mut self,
        requests: &[DraftRequest<'_>],
        k: usize,
    ) -> Result<Vec<Vec<u32>>, ModelError> {
        let mut drafts: Vec<Vec<u32>> = vec![Vec::new(); requests.len()];
        if requests.is_empty() || k == 0 {
            return Ok(drafts);
        }
        // Catch up: positions from what the draft last computed to the end of the history.
        let mut active = Vec::new();
        let mut batch = Batch::default();
        for (i, r) in requests.iter().enumerate() {
            let len = r.history.len();
            let from = match self.computed.get(&r.seq) {
                Some(&(admission, done)) if admission == r.admission => done.min(len - 1),
                _ => 0,
            };
            if batch.push(r.table, self.block_size, from, &r.history[from..]) {
                active.push(i);
            }
        }
        let mut rows = self.run(batch)?;
        for (&i, row) in active.iter().zip(&rows) {
            let r = &requests[i];
            self.computed.insert(r.seq, (r.admission, r.history.len()));
            drafts[i].extend(greedy_token(row));
        }
        // Then one token at a time.
        for step in 1..k {
            active.retain(|&i| drafts[i].len() == step);
            let mut batch = Batch::default();
            let mut next = Vec::new();
            for &i in &active {
                let r = &requests[i];
                let pos = r.history.len() + step - 1;
                if batch.push(r.table, self.block_size, pos, &drafts[i][step - 1..step]) {
                    next.push(i);
                }
            }
            if next.is_empty() {
                break;
            }
            active = next;
            rows = self.run(batch)?;
            for (&i, row) in active.iter().zip(&rows) {
                drafts[i].extend(greedy_token(row));
            }
        }
        Ok(drafts)
    }

    fn run(&mut self, batch: Batch) -> Result<Vec<Vec<f32>>, ModelError> {
        if batch.input.logit_rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut input = batch.input;
        input.attention = batch.metadata;
        let logits = self.model.forward(&input, self.attention.as_mut())?;
        Ok(logits.to_vec2::<f32>()?)
    }
}

/// A draft forward pass being built.
#[derive(Default)]
struct Batch {
    input: ForwardBatch,
    metadata: AttentionMetadata,
}

impl Batch {
    /// Add `tokens` of one sequence at positions `from..`, with a logits row for the last one;
    /// false (nothing added) if the table lacks a slot.
    fn push(&mut self, table: &BlockTable, block_size: usize, from: usize, tokens: &[u32]) -> bool {
        let slots: Option<Vec<u32>> = (from..from + tokens.len())
            .map(|pos| table.slot(pos, block_size).map(|s| s as u32))
            .collect();
        let (Some(slots), false) = (slots, tokens.is_empty()) else {
            return false;
        };
        let start = self.input.token_ids.len();
        self.input.token_ids.extend_from_slice(tokens);
        self.input
            .positions
            .extend((from..from + tokens.len()).map(|p| p as u32));
        self.metadata.slot_mapping.extend(slots);
        self.metadata.sequences.push(SequenceSlice {
            query_start: start,
            query_len: tokens.len(),
            context_len: from + tokens.len(),
            block_table: table.blocks.clone(),
        });
        self.input
            .logit_rows
            .push((self.input.token_ids.len() - 1) as u32);
        true
    }
}
